"""Synthetic chest CT: phantoms with tumours, scanner sites, and cohorts in public layouts.

* :func:`make_phantom` -> :class:`Phantom` (HU volume, tumour/lung masks, nodules).
* :class:`SiteParams`, :data:`SITES` ("internal", "external"): the domain shift.
* :func:`write_cohort`: many phantoms as DICOM, MSD Task06, LUNA16, 2D class folders and
  2D image/mask patches, with ``cohort.json`` ground truth.
"""

from lungcad.synthetic.cohort import FORMATS, write_cohort
from lungcad.synthetic.nodules import DENSITIES, SHAPES, Nodule
from lungcad.synthetic.phantom import TISSUE_LABELS, Phantom, make_phantom
from lungcad.synthetic.sites import SITES, SiteParams, get_site

__all__ = [
    "DENSITIES",
    "FORMATS",
    "SHAPES",
    "SITES",
    "TISSUE_LABELS",
    "Nodule",
    "Phantom",
    "SiteParams",
    "get_site",
    "make_phantom",
    "write_cohort",
]
