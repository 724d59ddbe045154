"""Synthetic chest CT: phantoms with tumours, scanner sites, and cohorts in public layouts.

* :func:`make_phantom` -> :class:`Phantom` (HU volume, tumour/lung masks, nodules).
* :class:`SiteParams`, :data:`SITES` ("internal", "external"): the domain shift.
* :func:`write_cohort`: many phantoms as DICOM, MSD Task06, LUNA16, 2D class folders and
  2D image/mask patches, with ``cohort.json`` ground truth.
"""
