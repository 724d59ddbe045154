"""Segmentation at the physical scale the model learnt: resample, sliding windows, resample back.

A segmentation model trained on 48x48 patches at 2 mm (letterboxed to 64x64, i.e. 1.5 mm per
model pixel) has learnt what a tumour looks like at 1.5 mm per pixel and over a 96 mm field.
Fitting a whole 350 mm slice into 64 pixels would show it tumours five times smaller than any
it saw. So, as nnU-Net does, each slice (or its lung box) is resampled to the model's pixel
size, segmented by overlapping windows of the model's input size (MONAI's
``sliding_window_inference`` with Gaussian weighting, so window borders do not show), and the
probability map is resampled back onto the slice's own grid.

:func:`segment_at_scale` needs the slices' spacing and the model's pixel size
(:class:`lungcad.training.domain.InputDomain`); when either is unknown the predictor falls back
to whole-slice inference and says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

__all__ = ["DEFAULT_OVERLAP", "resampled_shape", "segment_at_scale"]

#: Overlap of neighbouring windows (fraction of the window side), MONAI's and nnU-Net's 0.25-0.5.
DEFAULT_OVERLAP = 0.25

#: ``windows (N, 1, S, S) float32 -> tumour probabilities (N, 1, S, S)``.
WindowPredictor = Callable[[torch.Tensor], torch.Tensor]


def resampled_shape(
    shape: tuple[int, int], spacing_yx: tuple[float, float], pixel_mm: float
) -> tuple[int, int]:
    """The ``(height, width)`` of a ``shape`` image at ``spacing_yx`` mm once resampled to
    ``pixel_mm`` mm per pixel (at least 1 pixel each way)."""
    return (
        max(1, round(shape[0] * spacing_yx[0] / pixel_mm)),
        max(1, round(shape[1] * spacing_yx[1] / pixel_mm)),
    )


def segment_at_scale(
    images: np.ndarray,
    spacing_yx: tuple[float, float],
    pixel_mm: float,
    window: int,
    predict: WindowPredictor,
    *,
    overlap: float = DEFAULT_OVERLAP,
    windows_per_batch: int = 16,
) -> np.ndarray:
    """Tumour probabilities of a stack of slices, segmented at the model's pixel size.

    Args:
        images: ``(B, H, W)`` float32 in [0, 1] (the model's intensity domain), all one size.
        spacing_yx: the slices' in-plane spacing in mm.
        pixel_mm: the model's pixel size in mm (``InputDomain.model_pixel_mm``).
        window: the model's input side in pixels (its training input size).
        predict: the network on a batch of windows, returning probabilities.
        overlap: overlap of neighbouring windows.
        windows_per_batch: windows per forward pass.

    Returns:
        ``(B, H, W)`` float32 probabilities in [0, 1] on the input grid.
    """
    height, width = images.shape[1:]
    target = resampled_shape((height, width), spacing_yx, pixel_mm)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    if target != (height, width):
        # Antialiased when shrinking: a 0.7 mm slice at 1.5 mm must not alias fine texture.
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        # Slices smaller than a window are padded with 0 (air in the lung window, and what
        # the training letterbox pads with), then cropped back by MONAI.
        out = sliding_window_inference(
            x,
            roi_size=(window, window),
            sw_batch_size=windows_per_batch,
            predictor=predict,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
        )
    assert isinstance(out, torch.Tensor)  # one tensor in, one tensor out
    if target != (height, width):
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return np.clip(out[:, 0].numpy(), 0.0, 1.0).astype(np.float32, copy=False)
