"""Scanner sites: the acquisition and reconstruction settings that shift a CT's appearance.

A model trained on one hospital's scans meets another hospital's noise level, reconstruction
kernel, HU calibration, slice thickness and pixel spacing. :class:`SiteParams` holds those
settings; :data:`SITES` has an ``"internal"`` (training) and an ``"external"`` (validation)
site that differ in all of them, so synthetic cohorts show a generalisation gap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lungcad.errors import InputError


@dataclass(frozen=True)
class SiteParams:
    """Acquisition settings of one (synthetic) scanner site.

    Attributes:
        name: site name, used in case ids and metadata.
        noise_hu: standard deviation of the image noise in HU.
        blur_mm: in-plane Gaussian sigma (mm) of the reconstruction kernel; through-plane the
            slice profile (FWHM = slice thickness) is added.
        hu_offset: calibration error, ``measured = hu_scale * true + hu_offset`` (HU).
        hu_scale: calibration gain (1 = perfect).
        slice_thickness_mm: slice thickness and spacing (contiguous slices), mm.
        fov_mm: reconstructed field of view (width of the image), mm.
        matrix: in-plane matrix size (columns = rows); pixel spacing is ``fov_mm / matrix``.
        scan_length_mm: cranio-caudal coverage; the slice count is its ratio to the thickness.
        institution: InstitutionName written into DICOM headers.
        kernel: ConvolutionKernel written into DICOM headers.
    """

    name: str
    noise_hu: float = 18.0
    blur_mm: float = 1.0
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    slice_thickness_mm: float = 2.5
    fov_mm: float = 360.0
    matrix: int = 128
    scan_length_mm: float = 150.0
    institution: str = "lungcad synthetic site"
    kernel: str = "STANDARD"

    def __post_init__(self) -> None:
        for key in ("slice_thickness_mm", "fov_mm", "scan_length_mm", "hu_scale"):
            if not getattr(self, key) > 0:
                raise InputError(f"must be positive; got {getattr(self, key)!r}", f"site.{key}")
        for key in ("noise_hu", "blur_mm"):
            if getattr(self, key) < 0:
                raise InputError(f"must be >= 0; got {getattr(self, key)!r}", f"site.{key}")
        if not 16 <= int(self.matrix) <= 1024:
            raise InputError(f"matrix must be 16..1024 pixels; got {self.matrix!r}", "site.matrix")

    @property
    def pixel_spacing_mm(self) -> float:
        """In-plane pixel spacing (mm), the same along rows and columns."""
        return self.fov_mm / self.matrix

    @property
    def n_slices(self) -> int:
        """Number of axial slices covering ``scan_length_mm``."""
        return max(1, round(self.scan_length_mm / self.slice_thickness_mm))

    def with_matrix(self, matrix: int) -> SiteParams:
        """The same site reconstructed on another matrix (same field of view)."""
        return dataclasses.replace(self, matrix=int(matrix))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready), including the derived pixel spacing and slice count."""
        out = dataclasses.asdict(self)
        out["pixel_spacing_mm"] = self.pixel_spacing_mm
        out["n_slices"] = self.n_slices
        return out


#: The built-in sites. ``external`` is noisier, reconstructed with a smoother kernel,
#: miscalibrated by +25 HU and 3% gain, with thicker slices and a larger field of view.
SITES: dict[str, SiteParams] = {
    "internal": SiteParams(
        name="internal",
        noise_hu=18.0,
        blur_mm=1.0,
        slice_thickness_mm=2.5,
        fov_mm=360.0,
        institution="Internal Teaching Hospital (synthetic)",
        kernel="B30f",
    ),
    "external": SiteParams(
        name="external",
        noise_hu=40.0,
        blur_mm=1.8,
        hu_offset=25.0,
        hu_scale=0.97,
        slice_thickness_mm=3.75,
        fov_mm=400.0,
        institution="External Regional Hospital (synthetic)",
        kernel="SOFT",
    ),
}


def get_site(site: SiteParams | str) -> SiteParams:
    """Look up a site by name (or pass a SiteParams through).

    Raises:
        InputError: unknown site name; the message lists the known ones.
    """
    if isinstance(site, SiteParams):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise InputError(
            f"unknown site {site!r}; expected one of {sorted(SITES)} or a SiteParams", "site"
        ) from None
