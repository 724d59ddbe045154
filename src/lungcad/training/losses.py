"""Losses for the two-stage network: BCE + Dice on masks, BCE on cancer labels.

Both are aware of missing supervision, because the datasets mix it: segmentation sets have
masks (MSD Lung), classification sets only labels (IQ-OTH/NCCD, label -1 = unknown). A sample
without a mask adds nothing to the segmentation loss; one without a label adds nothing to the
classification loss; a batch with neither gives a zero that still backpropagates (so DDP and
optimisers see the graph they expect).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


def _zero_with_grad(t: torch.Tensor) -> torch.Tensor:
    """A float32 zero connected to ``t``'s graph."""
    return t.float().sum() * 0.0


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * soft Dice`` on segmentation logits, mask-aware.

    BCE is the mean over all pixels of the samples that have a mask. Dice is MONAI's
    ``DiceLoss(sigmoid=True)``: ``1 - (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)``
    with ``p = sigmoid(logits)``. With ``batch_dice=True`` (default, nnU-Net's "batch Dice")
    the sums run over all masked samples of the batch at once; per-sample Dice would give every
    tumour-free slice a loss near 1 however small its predicted probabilities, which drowns the
    signal from the slices that do show a tumour.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: added to Dice's numerator and denominator.
        batch_dice: pool the Dice sums over the batch (True) or average per-sample Dice (False).
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1e-5,
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch_dice)

    def terms(
        self,
        seg_logits: torch.Tensor,
        masks: torch.Tensor,
        has_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted BCE and Dice terms.

        Args:
            seg_logits: ``(B, 1, H, W)`` logits.
            masks: ``(B, 1, H, W)`` 0/1 targets (any dtype; zeros where there is no mask).
            has_mask: optional ``(B,)`` bool; only samples where it is True count.

        Returns:
            ``{"bce": scalar, "dice": scalar}``; both zero (with grad) if no sample has a mask.
        """
        if seg_logits.shape != masks.shape:
            raise ValueError(
                f"seg_logits {tuple(seg_logits.shape)} and masks {tuple(masks.shape)} must have "
                "the same shape (B, 1, H, W)"
            )
        if has_mask is not None:
            has_mask = has_mask.reshape(-1).to(device=seg_logits.device, dtype=torch.bool)
            if has_mask.numel() != seg_logits.shape[0]:
                raise ValueError(
                    f"has_mask has {has_mask.numel()} entries for a batch of {seg_logits.shape[0]}"
                )
            if not bool(has_mask.any()):
                zero = _zero_with_grad(seg_logits)
                return {"bce": zero, "dice": zero}
            seg_logits, masks = seg_logits[has_mask], masks[has_mask]
        logits = seg_logits.float()
        targets = masks.to(dtype=logits.dtype)
        return {
            "bce": F.binary_cross_entropy_with_logits(logits, targets),
            "dice": self.dice(logits, targets),
        }

    def forward(
        self,
        seg_logits: torch.Tensor,
        masks: torch.Tensor,
        has_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted sum of :meth:`terms` (a scalar)."""
        t = self.terms(seg_logits, masks, has_mask)
        return self.bce_weight * t["bce"] + self.dice_weight * t["dice"]


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with logits over the samples whose label is known.

    Args:
        logits: ``(B,)`` cancer logits.
        labels: ``(B,)`` 1 cancerous, 0 not, -1 unknown (ignored; any negative value is).
        pos_weight: weight of the positive class (e.g. ``n_negative / n_positive`` for imbalanced
            sets), as in ``torch.nn.BCEWithLogitsLoss``.

    Returns:
        Scalar mean over the known samples; zero (with grad) if none is known.
    """
    logits = logits.reshape(-1).float()
    labels = labels.reshape(-1).to(device=logits.device)
    if logits.numel() != labels.numel():
        raise ValueError(f"{logits.numel()} logits for {labels.numel()} labels")
    known = labels >= 0
    if not bool(known.any()):
        return _zero_with_grad(logits)
    weight = None
    if pos_weight is not None:
        weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(
        logits[known], labels[known].to(logits.dtype), pos_weight=weight
    )
