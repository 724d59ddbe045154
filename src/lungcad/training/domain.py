"""The input domain a run was trained on: intensity kind and the physical size of a model pixel.

A model only knows the images it learnt from. The checkpoint records (``input_domain``):

- ``intensity``: ``"hu"`` when every training slice came from a CT in Hounsfield units (3D
  layouts: MSD Task06, LUNA16), mapped to [0, 1] through ``window`` (level, width in HU);
  ``"display"`` when the slices were images already windowed for display (2D layouts: JPEG or
  PNG slices such as IQ-OTH/NCCD or the MSD patches), whose window is unknown; ``"mixed"``
  when both;
- ``model_pixel_mm``: the in-plane size of one model-input pixel in mm, the median over the
  training slices of ``spacing * max(height, width) / image_size`` (the model input is the
  slice letterboxed into ``image_size``). None when the slices' spacing is unknown (2D images
  prepared without ``--pixel-spacing``): then no physical scale can be matched at prediction.
- ``field_of_view_mm``: the median extent (mm) of the training slices' longer side, so that
  a 2D image without a pixel spacing can be taken to span what the training images spanned
  (a 48-px MSD patch at 2 mm: 96 mm; a whole chest CT slice: about 350 mm).

A stage-"cls" run started from a segmentation run also records that run's domain
(``seg_input_domain``): its decoder segments at the segmentation run's scale, not at the
classifier's. Prediction maps every input into these domains and says so
(:mod:`lungcad.inference.predictor`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.manifest import SliceRecord
from lungcad.data.preprocessing import LUNG_WINDOW

__all__ = ["DISPLAY", "HU", "MIXED", "InputDomain", "domain_of_records", "layout_intensity"]

HU = "hu"
DISPLAY = "display"
MIXED = "mixed"
#: Layouts whose slices are cut from CT volumes in HU (``SliceRecord.source`` = "layout:...").
HU_LAYOUTS = ("msd", "luna16", "dicom", "nifti")


@dataclass(frozen=True)
class InputDomain:
    """Intensity kind, window and model-pixel size of a run's training inputs.

    Attributes:
        intensity: ``"hu"``, ``"display"`` or ``"mixed"``.
        window: (level, width) in HU through which HU were mapped to [0, 1]; None for
            ``"display"``.
        model_pixel_mm: in-plane mm per model-input pixel (median), or None when unknown.
        image_size: the model input side in pixels.
        resampled: True when training resampled every slice to ``model_pixel_mm``
            (``data.patch_pixel_mm`` patches or ``data.slice_pixel_mm`` whole slices), so
            inputs must be resampled likewise; False when slices were letterboxed (the pixel
            size is then the median of the training slices').
        field_of_view_mm: median ``max(spacing) * max(height, width)`` of the training
            slices in mm, or None when unknown (no spacing, or checkpoints written before it).
    """

    intensity: str
    window: tuple[float, float] | None
    model_pixel_mm: float | None
    image_size: int
    resampled: bool = False
    field_of_view_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON/checkpoint form."""
        return {
            "intensity": self.intensity,
            "window": None if self.window is None else list(self.window),
            "model_pixel_mm": self.model_pixel_mm,
            "image_size": self.image_size,
            "resampled": self.resampled,
            "field_of_view_mm": self.field_of_view_mm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InputDomain | None:
        """The domain stored by :meth:`to_dict`; None for checkpoints written before it."""
        if not data:
            return None
        window = data.get("window")
        pixel = data.get("model_pixel_mm")
        fov = data.get("field_of_view_mm")
        return cls(
            intensity=str(data.get("intensity", DISPLAY)),
            window=None if window is None else (float(window[0]), float(window[1])),
            model_pixel_mm=None if pixel is None else float(pixel),
            image_size=int(data.get("image_size", 0)),
            resampled=bool(data.get("resampled", False)),
            field_of_view_mm=None if fov is None else float(fov),
        )

    def describe(self) -> str:
        """One line for reports: what the model was trained on."""
        kind = {
            HU: f"HU through the window level {self.window[0]:g} / width {self.window[1]:g}"
            if self.window
            else "HU",
            DISPLAY: "display-windowed images (window unknown)",
            MIXED: "HU and display-windowed images",
        }.get(self.intensity, self.intensity)
        scale = (
            f"{self.model_pixel_mm:.2f} mm per model pixel"
            if self.model_pixel_mm
            else "unknown pixel size"
        )
        fit = "resampled to it" if self.resampled else "letterboxed"
        return f"{kind}; {scale} ({fit}); {self.image_size}x{self.image_size} input"


def layout_intensity(source: str) -> str:
    """``"hu"`` or ``"display"`` for a record's ``source`` (``"layout:dataset"``)."""
    layout = source.split(":", 1)[0].strip().lower()
    return HU if layout in HU_LAYOUTS else DISPLAY


def _slice_side(root: Path, record: SliceRecord) -> int | None:
    try:  # the header only: memory-mapped, nothing is read
        shape = np.load(root / record.image_path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    return int(max(shape[-2:])) if len(shape) >= 2 else None


def domain_of_records(
    records: Sequence[tuple[SliceRecord, Path]],
    image_size: int,
    *,
    pixel_mm: float | None = None,
) -> InputDomain:
    """The domain of a run's training slices.

    Args:
        records: ``(record, prepared folder)`` pairs of the training split.
        image_size: the model input side.
        pixel_mm: the model's pixel size when training resampled the slices to it (patch
            sampling, ``data.slice_pixel_mm``); None: derived from the slices' spacing and
            the letterbox.
    """
    kinds = {layout_intensity(r.source) for r, _ in records}
    intensity = kinds.pop() if len(kinds) == 1 else MIXED
    extents = []  # mm spanned by each slice's longer side
    for record, root in records:
        spacing = [s for s in (record.spacing_y, record.spacing_x) if math.isfinite(s) and s > 0]
        if len(spacing) != 2:
            continue
        side = _slice_side(root, record)
        if side:
            # Pixels are taken as square at the larger spacing (prepared slices have square
            # pixels in practice).
            extents.append(max(spacing) * side)
    # Unknown when most slices have no spacing: a scale from a minority would mislead.
    fov = float(np.median(extents)) if len(extents) * 2 > len(records) else None
    window = None if intensity == DISPLAY else LUNG_WINDOW
    if pixel_mm is not None:
        return InputDomain(
            intensity, window, float(pixel_mm), int(image_size), True, field_of_view_mm=fov
        )
    # The letterbox scales the longer side to image_size.
    pixel = None if fov is None else fov / image_size
    return InputDomain(intensity, window, pixel, int(image_size), field_of_view_mm=fov)
