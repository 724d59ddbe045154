"""Stage two: the cancer classifier on top of the segmentation network.

The head sees two things: the globally average-pooled bottleneck of the ResNet encoder (what the
image looks like) and three numbers that summarise the predicted tumour mask (what the
segmentation found). Both are per slice; study-level aggregation happens in inference.

The mask summary reaches the logit twice: through the MLP, beside the pooled features, and
through a direct logistic term of its own (:attr:`ClassificationHead.mask_evidence`). Why: among
512 (ResNet18) or 2048 (ResNet50) pooled features, three summary numbers are drowned, and on
the demo's synthetic studies an MLP trained for a few hundred steps ignored a mask summary
that on its own separated tumour from tumour-free slices (largest tumour probability > 0.5 in
85-92% of tumour slices and 10-16% of the others; measured, docs/results.md). The direct term is
off unless asked for (``mask_term``; ``model.cls_mask_prior`` in the config): on IQ-OTH/NCCD,
whose stage 1 comes from another data set (the MSD patches), it was not measured to help.
When on, it starts at "the logit of the largest tumour probability times ``mask_prior``", so
a classifier trained from a segmentation run that finds this data's tumours starts from
what that segmentation says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Names of the mask-summary features, in the order :func:`mask_summary` returns them.
MASK_SUMMARY_FEATURES: tuple[str, ...] = ("area_fraction", "max_probability", "mean_probability")


def mask_evidence_features(summary: torch.Tensor) -> torch.Tensor:
    """The mask summary on logit-like scales, for the direct logistic term.

    Args:
        summary: ``(B, 3)`` from :func:`mask_summary`.

    Returns:
        ``(B, 3)``: the logits of the largest and of the mean tumour probability, clamped to
        +-8, and ``log10`` of the tumour area fraction (floored at 1e-5), each roughly in
        [-8, 8], so one weight of order 1 turns any of them into a decision.
    """
    eps = 1e-4
    probs = summary[:, 1:].clamp(eps, 1 - eps)
    logits = torch.log(probs) - torch.log1p(-probs)
    area = torch.log10(summary[:, :1].clamp_min(1e-5))
    return torch.cat([area, logits.clamp(-8.0, 8.0)], dim=1)


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
        mask_term: add the direct logistic term on the mask summary to the logit (its
            weights exist either way, so checkpoints of both kinds have the same keys).
        mask_prior: initial weight of the direct term on the logit of the largest tumour
            probability; see the module docstring.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: Sequence[int] = (256, 64),
        dropout: float = 0.3,
        n_summary: int = len(MASK_SUMMARY_FEATURES),
        mask_term: bool = False,
        mask_prior: float = 0.0,
    ) -> None:
        super().__init__()
        if len(hidden) == 0:
            raise ValueError("ClassificationHead needs at least one hidden layer; got hidden=()")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1); got {dropout}")
        self.in_channels = in_channels
        self.n_summary = n_summary
        self.mask_term = bool(mask_term)
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers: list[nn.Module] = []
        width = in_channels + n_summary
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        # The direct logistic term on the mask summary (mask_evidence_features' columns).
        self.mask_evidence = nn.Linear(n_summary, 1)
        self.reset_mask_evidence(mask_prior)

    def reset_mask_evidence(self, mask_prior: float = 0.0) -> None:
        """Start the direct term at ``mask_prior * logit(largest tumour probability)``."""
        with torch.no_grad():
            self.mask_evidence.weight.zero_()
            self.mask_evidence.bias.zero_()
            if self.n_summary == len(MASK_SUMMARY_FEATURES):
                self.mask_evidence.weight[0, 1] = float(mask_prior)

    def forward(self, bottleneck: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """Classify.

        Args:
            bottleneck: ``(B, C, h, w)`` last encoder stage.
            summary: ``(B, n_summary)`` mask summary (see :func:`mask_summary`).

        Returns:
            ``(B,)`` cancer logits.
        """
        pooled = self.pool(bottleneck).flatten(1)
        summary = summary.to(pooled.dtype)
        x = torch.cat([pooled, summary], dim=1)
        logits = self.mlp(x)
        if self.mask_term:
            logits = logits + self.mask_evidence(mask_evidence_features(summary))
        return logits.squeeze(1)
