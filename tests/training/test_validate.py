"""The per-epoch validation pass and the monitorable metrics (lungcad.training.validate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungcad.errors import InputError
from lungcad.training.distributed import DistInfo
from lungcad.training.validate import (
    AUTO_MONITOR,
    MONITORABLE_METRICS,
    resolve_monitor,
    validate,
)


class _Oracle(nn.Module):
    """Predicts from the batch's own images: seg logit +5 where the image is > 0.5, cancer
    logit from the image's mean (so the test controls every prediction)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg_logits": (x > 0.5).float() * 10 - 5, "cls_logits": x.mean((1, 2, 3)) * 8 - 4}


def _batch(images: torch.Tensor, masks: torch.Tensor, labels: list[int]) -> dict:
    return {
        "image": images,
        "mask": masks,
        "has_mask": masks.flatten(1).any(1),
        "label": torch.tensor(labels, dtype=torch.float32),
    }


def test_resolve_monitor() -> None:
    assert resolve_monitor("auto", "seg") == AUTO_MONITOR["seg"] == "val_dice"
    assert resolve_monitor("auto", "cls") == "val_mcc"
    assert resolve_monitor("val_auc", "cls") == "val_auc"
    with pytest.raises(InputError, match=r"optim\.monitor: stage 'seg' does not compute 'val_mcc'"):
        resolve_monitor("val_mcc", "seg")
    for stage, names in MONITORABLE_METRICS.items():
        assert AUTO_MONITOR[stage] in names


def test_seg_metrics_from_pixel_counts() -> None:
    images = torch.zeros(3, 1, 2, 2)
    images[0, 0, 0, :] = 1.0  # predicts 2 pixels
    masks = torch.zeros(3, 1, 2, 2)
    masks[0, 0, 0, 0] = 1.0  # 1 of them is tumour: Dice 2 * 1 / (2 + 1)
    masks[1, 0, 1, 1] = 1.0  # a missed tumour pixel: Dice 0
    loader = [_batch(images[:2], masks[:2], [1, 1]), _batch(images[2:], masks[2:], [0])]
    metrics = validate(
        _Oracle(),
        loader,  # any iterable of batches serves as the loader
        torch.device("cpu"),
        DistInfo(),
        stage="seg",
        amp=False,
        threshold_method="mcc",
        pos_weight=None,
    )
    assert list(metrics) == ["val_loss", "val_dice", "val_dice_global", "val_slices_with_tumour"]
    assert metrics["val_dice"] == pytest.approx((2 / 3 + 0) / 2)  # slice 2 has no tumour
    assert metrics["val_dice_global"] == pytest.approx(2 * 1 / (2 + 2))
    assert metrics["val_slices_with_tumour"] == 2.0


def test_cls_metrics_and_threshold() -> None:
    means = torch.tensor([0.1, 0.2, 0.6, 0.9])  # probabilities sigmoid(8 * mean - 4)
    images = means[:, None, None, None].expand(4, 1, 2, 2).clone()
    loader = [_batch(images, torch.zeros(4, 1, 2, 2), [0, 1, 1, 1])]
    metrics = validate(
        _Oracle(),
        loader,
        torch.device("cpu"),
        DistInfo(),
        stage="cls",
        amp=False,
        threshold_method="mcc",
        pos_weight=2.0,
    )
    assert metrics["val_acc"] == 0.75 and metrics["val_auc"] == 1.0  # slice 1 is missed at 0.5
    assert metrics["val_mcc_at_threshold"] == pytest.approx(1.0)  # a lower threshold fixes it
    assert torch.sigmoid(torch.tensor(0.1 * 8 - 4)) < metrics["val_threshold"]
    assert metrics["val_threshold"] <= torch.sigmoid(torch.tensor(0.2 * 8 - 4)) + 1e-6
    for name in MONITORABLE_METRICS["cls"]:
        assert name in metrics
