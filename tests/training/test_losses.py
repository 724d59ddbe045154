"""Tests for lungcad.training.losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lungcad.training.losses import BCEDiceLoss, classification_loss

LN2 = math.log(2.0)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _bce(z: float, y: float) -> float:
    p = _sigmoid(z)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# Two 2x2 samples with known logits and masks (B, 1, 2, 2).
LOGITS = [[[2.0, -1.0], [0.0, 3.0]], [[-2.0, 1.0], [0.5, -0.5]]]
MASKS = [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]


def _flat(sample: list[list[float]]) -> list[float]:
    return [v for row in sample for v in row]


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS)[:, None], torch.tensor(MASKS)[:, None]


def test_all_zero_logits_full_mask_literal_values() -> None:
    # p = 0.5 everywhere, mask all ones: BCE = ln 2; Dice = 1 - (2*2) / (2 + 4) = 1/3.
    loss = BCEDiceLoss(smooth=0.0)
    terms = loss.terms(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert terms["bce"].item() == pytest.approx(LN2, abs=1e-6)
    assert terms["dice"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == pytest.approx(
        LN2 + 1 / 3, abs=1e-6
    )


def test_bce_dice_matches_hand_computation() -> None:
    zs = [_flat(s) for s in LOGITS]
    ys = [_flat(s) for s in MASKS]
    pairs = [(z, y) for zz, yy in zip(zs, ys, strict=True) for z, y in zip(zz, yy, strict=True)]
    bce = sum(_bce(z, y) for z, y in pairs) / 8
    smooth = 1e-5

    def dice(zz: list[float], yy: list[float]) -> float:
        ps = [_sigmoid(z) for z in zz]
        inter = sum(p * y for p, y in zip(ps, yy, strict=True))
        return 1 - (2 * inter + smooth) / (sum(ps) + sum(yy) + smooth)

    batch_dice = dice(zs[0] + zs[1], ys[0] + ys[1])
    sample_dice = (dice(zs[0], ys[0]) + dice(zs[1], ys[1])) / 2
    logits, masks = _tensors()

    got = BCEDiceLoss(bce_weight=0.7, dice_weight=0.3, smooth=smooth)(logits, masks)
    assert got.item() == pytest.approx(0.7 * bce + 0.3 * batch_dice, abs=1e-6)
    got = BCEDiceLoss(smooth=smooth, batch_dice=False).terms(logits, masks)
    assert got["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert got["dice"].item() == pytest.approx(sample_dice, abs=1e-6)
    assert abs(batch_dice - sample_dice) > 1e-3  # the two options really differ here


def test_samples_without_mask_are_ignored() -> None:
    logits, masks = _tensors()
    # Sample 1 of 3 has no mask: garbage logits and an all-zero "mask".
    noisy = torch.cat([logits[:1], torch.full((1, 1, 2, 2), 9.0), logits[1:]]).requires_grad_()
    noisy_masks = torch.cat([masks[:1], torch.zeros(1, 1, 2, 2), masks[1:]])
    has_mask = torch.tensor([True, False, True])
    loss = BCEDiceLoss()
    got = loss(noisy, noisy_masks, has_mask)
    assert got.item() == pytest.approx(loss(logits, masks).item(), abs=1e-6)
    got.backward()
    assert torch.all(noisy.grad[1] == 0)
    assert noisy.grad[0].abs().sum() > 0 and noisy.grad[2].abs().sum() > 0


def test_no_masks_gives_zero_with_grad() -> None:
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    got = BCEDiceLoss()(logits, torch.zeros(2, 1, 4, 4), torch.tensor([False, False]))
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert torch.all(logits.grad == 0)


def test_bce_dice_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        BCEDiceLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 2))
    with pytest.raises(ValueError, match="has_mask"):
        BCEDiceLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([True]))


def test_classification_loss_ignores_unknown_labels() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0])
    # label 1 at logit 0: ln 2; label 0 at logit -1: ln(1 + e^-1); the unknown one is skipped.
    expected = (LN2 + math.log(1 + math.exp(-1))) / 2
    got = classification_loss(logits, labels)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.backward()
    assert logits.grad[1] == 0
    weighted = classification_loss(logits, labels, pos_weight=3.0)
    assert weighted.item() == pytest.approx((3 * LN2 + math.log(1 + math.exp(-1))) / 2, abs=1e-6)


def test_classification_loss_all_unknown() -> None:
    logits = torch.randn(4, requires_grad=True)
    got = classification_loss(logits, torch.full((4,), -1.0))
    assert got.item() == 0.0 and got.requires_grad
    with pytest.raises(ValueError, match="3 logits for 4 labels"):
        classification_loss(torch.zeros(3), torch.zeros(4))
