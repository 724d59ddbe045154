"""Stage two: the cancer classifier on top of the segmentation network.

The head sees two things: the globally average-pooled bottleneck of the ResNet encoder (what the
image looks like) and three numbers that summarise the predicted tumour mask (what the
segmentation found). Both are per slice; study-level aggregation happens in inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Names of the mask-summary features, in the order :func:`mask_summary` returns them.
MASK_SUMMARY_FEATURES: tuple[str, ...] = ("area_fraction", "max_probability", "mean_probability")


def mask_summary(seg_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Summarise a predicted tumour mask by three per-sample numbers.

    Args:
        seg_logits: ``(B, 1, H, W)`` segmentation logits.
        threshold: probability above which a pixel counts as tumour for the area fraction.

    Returns:
        ``(B, 3)`` float tensor, columns as in :data:`MASK_SUMMARY_FEATURES`: the fraction of
        pixels with probability > ``threshold`` (0..1, unitless), the largest pixel probability and
        the mean pixel probability. All three lie in [0, 1], on the same scale as each other.
    """
    probs = torch.sigmoid(seg_logits.float()).flatten(1)
    area = (probs > threshold).float().mean(dim=1)
    return torch.stack([area, probs.amax(dim=1), probs.mean(dim=1)], dim=1)


class ClassificationHead(nn.Module):
    """MLP on pooled encoder features concatenated with the mask summary.

    ``Linear -> ReLU -> Dropout`` for every hidden width, then ``Linear(., 1)``; with the default
    ``hidden=(256, 64)`` that is three linear layers.

    Args:
        in_channels: channels of the encoder bottleneck (512 for ResNet18/34, 2048 for ResNet50).
        hidden: widths of the hidden layers (at least one).
        dropout: dropout probability after every hidden layer.
        n_summary: number of mask-summary features appended to the pooled features.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: Sequence[int] = (256, 64),
        dropout: float = 0.3,
        n_summary: int = len(MASK_SUMMARY_FEATURES),
    ) -> None:
        super().__init__()
        if len(hidden) == 0:
            raise ValueError("ClassificationHead needs at least one hidden layer; got hidden=()")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1); got {dropout}")
        self.in_channels = in_channels
        self.n_summary = n_summary
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers: list[nn.Module] = []
        width = in_channels + n_summary
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, bottleneck: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """Classify.

        Args:
            bottleneck: ``(B, C, h, w)`` last encoder stage.
            summary: ``(B, n_summary)`` mask summary (see :func:`mask_summary`).

        Returns:
            ``(B,)`` cancer logits.
        """
        pooled = self.pool(bottleneck).flatten(1)
        x = torch.cat([pooled, summary.to(pooled.dtype)], dim=1)
        return self.mlp(x).squeeze(1)
