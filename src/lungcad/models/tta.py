"""Averaging network outputs: flip test-time augmentation, and the rule fold ensembles share.

Outputs are averaged as probabilities, then returned as logits again (the logit of the mean
probability), so everything downstream of the network (sigmoid, thresholds, masks) works
unchanged whether one network, a flip-averaged one or an ensemble produced them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Probabilities are clipped this far from 0 and 1 before the logit, so it stays finite.
_EPS = 1e-7
_KEYS = ("seg_logits", "cls_logits")


def mean_probability_logits(outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"seg_logits", "cls_logits"}``: logits of the mean probability over ``outputs``."""
    result = {}
    for key in _KEYS:
        mean = torch.stack([torch.sigmoid(o[key].float()) for o in outputs]).mean(0)
        result[key] = torch.logit(mean.clamp(_EPS, 1 - _EPS))
    return result


class FlipTTA(nn.Module):
    """A network evaluated on the slice and its left-right mirror, outputs averaged.

    The mirrored tumour map is flipped back before averaging. Left-right is the flip the
    training augmentation uses (``augmentation.flip_lr_prob``), so both views are ones the
    network learnt.

    Args:
        model: a network returning ``{"seg_logits": (B, 1, H, W), "cls_logits": (B,)}``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 1, H, W)`` -> averaged ``{"seg_logits", "cls_logits"}``."""
        plain = self.model(x)
        mirrored = self.model(torch.flip(x, dims=[-1]))
        mirrored = {**mirrored, "seg_logits": torch.flip(mirrored["seg_logits"], dims=[-1])}
        return mean_probability_logits([plain, mirrored])
