"""The evaluation-time forward pass: autocast, float32 logits, probabilities.

Training's validation pass, ``lungcad evaluate``, ``lungcad calibrate`` and the inference
``Predictor`` all run the network on a batch and turn its logits into probabilities. They do
it through these three functions, so the same weights and slices give the same numbers, bit
for bit, wherever they are computed:

* :func:`autocast`: float16 autocast on CUDA when mixed precision is asked for, nothing
  elsewhere (CPU runs stay float32); the training step uses it too.
* :func:`forward_logits`: one batch through the network under ``torch.inference_mode``,
  logits returned as float32 :class:`Logits`.
* :func:`probabilities`: the sigmoid of logits (torch's, for tensors and NumPy arrays
  alike, so the ONNX backend's logits go through the same function), or a calibration's
  mapping when one is given.

Example::

    logits = forward_logits(model, images, torch.device("cpu"))
    tumour = probabilities(logits.seg)[:, 0]  # (B, H, W) float32 in [0, 1]
    cancer = probabilities(logits.cls, calibration.apply)  # (B,)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = ["Calibrate", "Logits", "autocast", "forward_logits", "probabilities", "sigmoid"]

#: Maps cancer logits (a NumPy array) to probabilities of the same shape, e.g.
#: ``lungcad.evaluation.calibration.Calibration.apply``.
Calibrate = Callable[[np.ndarray], np.ndarray]


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """float16 autocast on a CUDA device when ``enabled``; a no-op context otherwise.

    Args:
        device: where the forward pass runs.
        enabled: mixed precision asked for (``train.amp``, ``lungcad evaluate --amp``). CPU
            runs ignore it: bfloat16 CPU autocast would change results without speeding up
            the small CPU configurations.
    """
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class Logits(NamedTuple):
    """The network's outputs for one batch, as float32 on the model's device.

    Attributes:
        seg: ``(B, 1, H, W)`` tumour logits.
        cls: ``(B,)`` cancer logits.
    """

    seg: torch.Tensor
    cls: torch.Tensor


def forward_logits(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str,
    *,
    amp: bool = False,
    memory_format: torch.memory_format | None = None,
) -> Logits:
    """Run one batch through the network without autograd.

    The model is used in whatever mode it is in: callers put it in eval mode (dropout off,
    BatchNorm running statistics) once, before their loop.

    Args:
        model: a network returning ``{"seg_logits", "cls_logits"}`` (``LungCADNet``), already
            on ``device``.
        images: ``(B, 1, H, W)`` float32 inputs in [0, 1], on any device.
        device: the model's device; the images are copied there.
        amp: float16 autocast on CUDA (see :func:`autocast`).
        memory_format: e.g. ``torch.channels_last`` to match a model converted to NHWC;
            None keeps the images' layout.

    Returns:
        :class:`Logits` (float32; under autocast the float16 outputs are widened).
    """
    x = images.to(device, non_blocking=True)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    with torch.inference_mode(), autocast(device, amp):
        out = model(x)
        return Logits(out["seg_logits"].float(), out["cls_logits"].float())


def sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``torch.sigmoid`` in float32 (float16 logits are widened first), on their device."""
    return torch.sigmoid(logits.float())


def probabilities(
    logits: torch.Tensor | np.ndarray, calibrate: Calibrate | None = None
) -> np.ndarray:
    """Probabilities for logits, as a NumPy array of the same shape.

    Args:
        logits: a tensor (any device; the sigmoid runs there) or a NumPy array (e.g. ONNX
            Runtime's outputs; the sigmoid runs in torch on the CPU, in float32).
        calibrate: maps the logits, as a NumPy array of their own dtype, to probabilities
            (a run's ``calibration.json``); None: the sigmoid.

    Returns:
        float32 for the sigmoid; ``calibrate``'s dtype (float64 for lungcad's calibrations)
        otherwise.
    """
    if calibrate is not None:
        if isinstance(logits, torch.Tensor):
            return calibrate(logits.detach().cpu().numpy())
        return calibrate(np.asarray(logits))
    if not isinstance(logits, torch.Tensor):
        # A float32 copy: writable (torch.from_numpy warns on read-only arrays) and contiguous.
        logits = torch.from_numpy(np.array(logits, dtype=np.float32))
    return sigmoid(logits.detach()).cpu().numpy()
