"""Tumour-aware training patches at one physical scale (stage 1, segmentation).

Whole slices squeezed into a small model input show a 10 mm nodule as a few pixels, and a
model trained that way learns to predict "no tumour" everywhere (Dice 0 on the demo's
synthetic slices). nnU-Net instead trains on patches at the data set's own spacing and
oversamples patches that contain foreground (a third of each batch). lungcad does the same in
2D: each slice (with a known pixel spacing) is resampled to ``pixel_mm`` per pixel and a
``size x size`` patch is cut from it, centred on a random tumour pixel with probability
``tumour_prob`` (when the slice has tumour), elsewhere at a random position inside the slice.
Inference then segments whole slices at the same scale with sliding windows
(:mod:`lungcad.models.sliding_window`), so training and prediction see one physical scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lungcad.errors import InputError

__all__ = ["PatchSampling", "resample_to_pixel"]


def resample_to_pixel(
    image: np.ndarray, spacing_yx: tuple[float, float], pixel_mm: float, *, mask: bool = False
) -> np.ndarray:
    """An ``(H, W)`` slice at ``spacing_yx`` mm resampled to ``pixel_mm`` mm per pixel.

    Images are interpolated bilinearly (antialiased when shrinking); masks the same way and
    then thresholded at 0.5, so they stay binary and aligned with the image.
    """
    height, width = image.shape
    target = (
        max(1, round(height * spacing_yx[0] / pixel_mm)),
        max(1, round(width * spacing_yx[1] / pixel_mm)),
    )
    if target == (height, width):
        return np.asarray(image, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    array = out.numpy()
    return (array > 0.5).astype(np.float32) if mask else array


@dataclass(frozen=True)
class PatchSampling:
    """How stage-1 training patches are cut.

    Attributes:
        pixel_mm: mm per patch pixel (the model's pixel size, recorded in the checkpoint).
        size: patch side in pixels (``model.image_size``).
        tumour_prob: probability that a slice with tumour gives a patch centred on it.
    """

    pixel_mm: float
    size: int
    tumour_prob: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pixel_mm) and self.pixel_mm > 0):
            raise InputError(
                f"patch pixel size must be > 0 mm; got {self.pixel_mm}", "data.patch_pixel_mm"
            )
        if not 0.0 <= self.tumour_prob <= 1.0:
            raise InputError(
                f"tumour patch probability must be in [0, 1]; got {self.tumour_prob}",
                "data.patch_tumour_prob",
            )

    def sample(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        spacing_yx: tuple[float, float],
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One patch of a slice.

        Args:
            image: ``(H, W)`` float32 in [0, 1].
            mask: ``(H, W)`` 0/1 tumour mask.
            spacing_yx: the slice's pixel spacing in mm.
            rng: where the patch's position comes from.

        Returns:
            ``(image, mask)`` patches, each ``(size, size)`` float32; outside the slice the
            image is 0 (air in the lung window, as the model-input letterbox pads) and the
            mask 0.
        """
        image = resample_to_pixel(image, spacing_yx, self.pixel_mm)
        mask = resample_to_pixel(mask, spacing_yx, self.pixel_mm, mask=True)
        tumour = np.argwhere(mask > 0)
        if len(tumour) and rng.random() < self.tumour_prob:
            cy, cx = tumour[rng.integers(len(tumour))]
            # Jitter within a quarter patch, so tumours do not always sit in the centre.
            jitter = self.size // 4
            cy += int(rng.integers(-jitter, jitter + 1))
            cx += int(rng.integers(-jitter, jitter + 1))
        else:
            cy, cx = int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))
        return _crop(image, cy, cx, self.size), _crop(mask, cy, cx, self.size)


def _crop(array: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """The ``size x size`` window centred on ``(cy, cx)``, zero outside ``array``."""
    out = np.zeros((size, size), dtype=np.float32)
    top, left = cy - size // 2, cx - size // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, array.shape[0]), min(left + size, array.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out
