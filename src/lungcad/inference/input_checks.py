"""Input checks before any model: is this image something the model may assess at all?

:func:`check_input` runs on every study before the network sees it (``Predictor.predict_volume``,
so ``predict``, ``serve``, ``watch`` and ``listen`` all get it). It checks, in this order:

1. **Geometry**: finite, positive voxel spacing; an in-plane size of at least
   :data:`MIN_IN_PLANE` x :data:`MIN_IN_PLANE` pixels and at most :data:`MAX_IN_PLANE`. A study
   of fewer than :data:`MIN_STUDY_SLICES` slices is assessed, but its decision is flagged as a
   single-slice one (``single_slice``): it is the decision of those slices, not of a study.
2. **Values**: not constant; for CT, a plausible Hounsfield range (most voxels within
   :data:`HU_RANGE`, spread over more than :data:`MIN_HU_SPREAD` HU, so a windowed image or a
   mask saved as NIfTI is not taken for CT). The readers already refuse non-finite voxels and
   rescale parameters.
3. **Body part**: the classical lung mask (:func:`lungcad.data.lung_mask.lung_mask`) must find
   lung (:data:`MIN_LUNG_AREA_MM2` on its best slice, or :data:`MIN_LUNG_FRACTION` of the image
   when the pixel spacing is unknown). Without lung the study is not assessed: the finding is
   "cannot assess" with the reason "no lung in the image".
4. **Slice thickness**: above :data:`MAX_SLICE_THICKNESS_MM` a warning (small nodules blur
   into their neighbours), not a refusal.

Malformed input (1 and 2) raises :class:`lungcad.errors.InputError`, one line naming the file
and the problem. An image that is well formed but not a chest CT (3) gives an
:class:`InputCheck` whose ``assessable`` is False, so the caller reports "cannot assess" and no
probability. The check's record (:meth:`InputCheck.to_dict`) goes into findings.json and is
available to the DICOM SR writer as ``StudyResult.input_check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.lung_mask import lung_mask
from lungcad.errors import InputError
from lungcad.volume import Volume

__all__ = [
    "HU_RANGE",
    "MAX_IN_PLANE",
    "MAX_SLICE_THICKNESS_MM",
    "MIN_IN_PLANE",
    "MIN_LUNG_AREA_MM2",
    "MIN_LUNG_FRACTION",
    "MIN_STUDY_SLICES",
    "NO_LUNG",
    "InputCheck",
    "check_input",
]

#: Smallest in-plane size (pixels, each axis): below it there is no chest to see.
MIN_IN_PLANE = 32
#: Largest in-plane size (pixels, each axis): CT reconstructions are 512-1024, rarely 2048.
MAX_IN_PLANE = 4096
#: Fewer slices than this are too few for a study decision: it is flagged single-slice.
MIN_STUDY_SLICES = 3
#: Hounsfield units of CT tissue, air to dense bone (outside-field padding lies below).
HU_RANGE = (-1100.0, 3100.0)
#: At least this fraction of the voxels must lie in :data:`HU_RANGE` for values to be HU.
MIN_HU_FRACTION = 0.5
#: CT spans air (-1000) to soft tissue (40): the 1st-99th percentiles differ by far more.
MIN_HU_SPREAD = 200.0
#: Least lung area (mm^2) on the best slice for "lung found": bowel gas in an abdominal slice
#: is a few cm^2, one lung in a chest slice 50-150 cm^2.
MIN_LUNG_AREA_MM2 = 2500.0
#: The same for images of unknown pixel spacing (2D exports), as a fraction of the image:
#: lungs cover 10-30 % of a chest slice, but in exports in a soft-tissue window, where lung
#: and fat are equally black, the classical mask finds only part of them. Measured on 120
#: IQ-OTH/NCCD slices (40 per class): this fraction leaves 2 chest slices unassessed, 2 %
#: (with the field-of-view pixel size alone) left 18.
MIN_LUNG_FRACTION = 0.0025
#: Slices thicker than this (mm) get a warning: nodules under about twice it may be missed.
MAX_SLICE_THICKNESS_MM = 5.0
#: The lung mask of the body-part check is computed on pixels of about this size (mm), as in
#: the predictor: it only has to say whether there is lung.
LUNG_MASK_PIXEL_MM = 3.0
#: Field of view (mm) assumed for an image without pixel spacing (a 2D export): a typical
#: adult chest CT reconstruction, as the predictor assumes when it segments such images.
ASSUMED_FIELD_OF_VIEW_MM = 350.0
#: The reason of a "cannot assess" finding without lung.
NO_LUNG = "no lung in the image"
_SAMPLE = 1_000_000  # voxels sampled for the value percentiles


@dataclass(frozen=True)
class InputCheck:
    """What the input checks found in one study.

    Attributes:
        assessable: False when the model must not assess the study (``reason`` says why).
        reason: why it cannot be assessed (one line, no patient data); None when assessable.
        single_slice: fewer than :data:`MIN_STUDY_SLICES` slices: the decision is that of
            the slice(s) given, not a study's.
        warnings: notes for the reader (thick slices, ...).
        shape_zyx: the image size ``(z, y, x)`` in voxels.
        spacing_zyx_mm: the voxel size ``(z, y, x)`` in mm.
        intensity: ``"hu"`` or ``"windowed"``.
        value_range: 1st and 99th percentile of the voxel values (HU, or [0, 1] grey).
        lung_area_mm2: lung area on the slice with most lung (mm^2; pixels^2 when the
            spacing is unknown); None when no lung mask was made.
        lung_slices: slices with lung in the lung mask.
        lungs: the coarse lung mask ``(z, y', x')`` of the body-part check (subsampled in
            plane by ``lung_mask_step``), kept for callers that need it; not serialised.
        lung_mask_step: the in-plane subsampling factor of ``lungs``.
    """

    assessable: bool
    reason: str | None
    single_slice: bool
    warnings: tuple[str, ...]
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    intensity: str
    value_range: tuple[float, float]
    lung_area_mm2: float | None
    lung_slices: int
    lungs: np.ndarray | None = field(default=None, repr=False, compare=False)
    lung_mask_step: int = 1

    @property
    def status(self) -> str:
        """``"ok"``, ``"single slice"`` or ``"cannot assess"``."""
        if not self.assessable:
            return "cannot assess"
        return "single slice" if self.single_slice else "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for findings.json and the SR (no patient data, no file paths)."""
        return {
            "status": self.status,
            "assessable": self.assessable,
            "reason": self.reason,
            "single_slice": self.single_slice,
            "min_study_slices": MIN_STUDY_SLICES,
            "warnings": list(self.warnings),
            "shape_zyx": list(self.shape_zyx),
            "spacing_zyx_mm": list(self.spacing_zyx_mm),
            "intensity": self.intensity,
            "value_range": [round(v, 4) for v in self.value_range],
            "lung_area_mm2": None if self.lung_area_mm2 is None else round(self.lung_area_mm2, 1),
            "lung_slices": self.lung_slices,
            "limits": {
                "min_in_plane_px": MIN_IN_PLANE,
                "max_in_plane_px": MAX_IN_PLANE,
                "hu_range": list(HU_RANGE),
                "min_lung_area_mm2": MIN_LUNG_AREA_MM2,
                "max_slice_thickness_mm": MAX_SLICE_THICKNESS_MM,
            },
        }


def _where(volume: Volume, path: str | Path | None) -> str | Path:
    return path if path is not None else volume.meta.get("source_path") or "the input image"


def _check_geometry(volume: Volume, where: str | Path) -> None:
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise InputError(
            f"voxel spacing (z, y, x) {tuple(float(s) for s in spacing)} mm is not finite and "
            "positive; the image's geometry is damaged. Re-export it.",
            where,
        )
    z, y, x = volume.shape
    if min(y, x) < MIN_IN_PLANE:
        raise InputError(
            f"the image is {y}x{x} pixels in plane; a chest CT slice has at least "
            f"{MIN_IN_PLANE}x{MIN_IN_PLANE} (usually 512x512). This is not a CT slice.",
            where,
        )
    if max(y, x) > MAX_IN_PLANE:
        raise InputError(
            f"the image is {y}x{x} pixels in plane, more than the {MAX_IN_PLANE} a CT "
            "reconstruction has; this is not a CT slice, or it is a mosaic of several.",
            where,
        )
    if z < 1:
        raise InputError("the image has no slices.", where)


def _value_sample(array: np.ndarray) -> np.ndarray:
    """About :data:`_SAMPLE` voxels on a regular grid (a strided view: a reshape of a
    non-contiguous volume would copy all of it)."""
    step = max(1, int(np.ceil((array.size / _SAMPLE) ** (1 / 3))))
    return np.asarray(array[::step, ::step, ::step]).ravel()


def _check_values(volume: Volume, where: str | Path) -> tuple[float, float]:
    low, high = float(volume.array.min()), float(volume.array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError("the image holds NaN or infinite values; it is corrupt.", where)
    if low == high:
        raise InputError(
            f"every voxel has the value {low:g}: the image is blank, not a scan.", where
        )
    sample = _value_sample(volume.array)
    p1, p99 = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if volume.intensity != "hu":
        return p1, p99
    inside = float(np.mean((sample >= HU_RANGE[0]) & (sample <= HU_RANGE[1])))
    if inside < MIN_HU_FRACTION:
        raise InputError(
            f"only {inside:.0%} of the voxels lie in the CT range {HU_RANGE[0]:g} to "
            f"{HU_RANGE[1]:g} HU (values {low:g} to {high:g}); the values are not CT "
            "Hounsfield units (wrong rescale, or not a CT).",
            where,
        )
    if p99 - p1 < MIN_HU_SPREAD:
        raise InputError(
            f"the values span only {p1:g} to {p99:g} (1st-99th percentile); CT in HU spans "
            "air (-1000) to tissue. This looks like a windowed image or a mask saved as a "
            "volume, not CT in Hounsfield units.",
            where,
        )
    return p1, p99


def _lungs(volume: Volume, assume_fov: bool = False) -> tuple[np.ndarray, int]:
    """The coarse lung mask and its in-plane step (HU volumes subsampled to ~3 mm pixels).

    With ``assume_fov`` an image of unknown pixel spacing is taken to span
    :data:`ASSUMED_FIELD_OF_VIEW_MM` (the mask's settings are in mm); otherwise its pixels
    count as 1 mm, the scale the mask was tuned on for 512-pixel exports.
    """
    spacing = volume.spacing
    if assume_fov:
        pixel = ASSUMED_FIELD_OF_VIEW_MM / max(volume.shape[1:])
        spacing = (spacing[0], pixel, pixel)
    step = 1
    if volume.intensity == "hu":
        step = max(1, int(LUNG_MASK_PIXEL_MM / min(spacing[1:])))
    small = Volume(
        array=volume.array[:, ::step, ::step],
        spacing=(spacing[0], spacing[1] * step, spacing[2] * step),
        intensity=volume.intensity,
    )
    return lung_mask(small), step


def check_input(volume: Volume, path: str | Path | None = None) -> InputCheck:
    """Check a study before any model sees it (see the module docstring).

    Args:
        volume: the canonical Volume as read (HU, or windowed [0, 1] for 2D images).
        path: the file or folder named in errors; default ``volume.meta["source_path"]``.

    Returns:
        The :class:`InputCheck`; ``assessable`` is False when no lung is found.

    Raises:
        InputError: malformed geometry or values (one line naming the file and the problem).
    """
    where = _where(volume, path)
    _check_geometry(volume, where)
    value_range = _check_values(volume, where)
    z, height, width = volume.shape
    warnings: list[str] = []
    spacing_known = bool(volume.meta.get("spacing_known", True))
    thickness = max(float(volume.spacing[0]), float(volume.meta.get("slice_thickness_mm") or 0))
    if z > 1 and spacing_known and thickness > MAX_SLICE_THICKNESS_MM:
        warnings.append(
            f"slices are {thickness:g} mm thick (more than {MAX_SLICE_THICKNESS_MM:g} mm): "
            "nodules smaller than about twice that may be blurred or missed"
        )
    single = z < MIN_STUDY_SLICES
    if single:
        warnings.append(
            f"only {z} slice(s): the decision is that of the slice(s) given, not of a whole study"
        )
    lungs, step = _lungs(volume)
    per_slice = lungs.reshape(z, -1).sum(axis=1)
    best = float(per_slice.max()) if per_slice.size else 0.0
    if spacing_known:
        area = best * volume.spacing[1] * volume.spacing[2] * step * step
        found = area >= MIN_LUNG_AREA_MM2
    else:  # pixels of unknown size: the share of the image instead of mm^2
        found = best >= MIN_LUNG_FRACTION * lungs.shape[1] * lungs.shape[2]
        if not found:  # a small export: its pixels are several mm, not 1
            lungs, step = _lungs(volume, assume_fov=True)
            per_slice = lungs.reshape(z, -1).sum(axis=1)
            best = float(per_slice.max()) if per_slice.size else 0.0
            found = best >= MIN_LUNG_FRACTION * lungs.shape[1] * lungs.shape[2]
        area = best
    return InputCheck(
        assessable=found,
        reason=None if found else NO_LUNG,
        single_slice=single,
        warnings=tuple(warnings),
        shape_zyx=(z, height, width),
        spacing_zyx_mm=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
        intensity=volume.intensity,
        value_range=value_range,
        lung_area_mm2=float(area),
        lung_slices=int(np.count_nonzero(per_slice)),
        lungs=lungs,
        lung_mask_step=step,
    )
