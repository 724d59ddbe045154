"""The validation pass of every epoch, and the metrics it offers for model selection.

Each rank predicts its shard of the validation split (:func:`lungcad.models.forward
.forward_logits`, as evaluation and inference do); the per-slice results are gathered, so
every rank computes the same metrics and takes the same early-stopping decision.

* stage "seg": ``val_dice`` is the mean Dice over validation slices that show tumour,
  ``val_dice_global`` the Dice of the pooled pixel counts of all validation slices (a pixel
  is tumour where its logit is > 0, i.e. its probability > 0.5).
* stage "cls": accuracy, F1, MCC, AUC, sensitivity and specificity at probability 0.5, and
  the decision threshold chosen on these predictions (``train.threshold_method``) with the
  MCC and accuracy at it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lungcad.errors import InputError
from lungcad.metrics.classification import choose_threshold, classification_metrics
from lungcad.metrics.segmentation import dice_from_counts
from lungcad.models.forward import forward_logits, probabilities
from lungcad.training.choices import Stage, ThresholdMethod
from lungcad.training.distributed import DistInfo, all_gather_list
from lungcad.training.losses import BCEDiceLoss, classification_loss

__all__ = ["AUTO_MONITOR", "MONITORABLE_METRICS", "resolve_monitor", "validate"]

#: The metrics of each stage's validation pass that ``optim.monitor`` may name: model
#: selection and early stopping keep the epoch where it is highest.
MONITORABLE_METRICS: dict[Stage, tuple[str, ...]] = {
    "seg": ("val_dice", "val_dice_global"),
    "cls": ("val_mcc", "val_auc", "val_f1", "val_acc", "val_mcc_at_threshold"),
}

#: What ``optim.monitor: auto`` means for each stage.
AUTO_MONITOR: dict[Stage, str] = {"seg": "val_dice", "cls": "val_mcc"}


def resolve_monitor(monitor: str, stage: Stage) -> str:
    """The metric a run of ``stage`` selects its best epoch by.

    Args:
        monitor: ``optim.monitor`` ("auto" or a metric name).
        stage: the run's stage.

    Raises:
        InputError: the stage's validation pass does not compute that metric (a "seg" run
            monitoring "val_mcc" would otherwise keep its first epoch forever).
    """
    name = AUTO_MONITOR[stage] if monitor == "auto" else monitor
    if name not in MONITORABLE_METRICS[stage]:
        raise InputError(
            f"stage {stage!r} does not compute {name!r}; valid for it: "
            f"auto, {', '.join(MONITORABLE_METRICS[stage])}",
            path="optim.monitor",
        )
    return name


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    ddp: DistInfo,
    *,
    stage: Stage,
    amp: bool,
    threshold_method: ThresholdMethod,
    pos_weight: float | None,
) -> dict[str, float]:
    """Metrics of the whole validation split (predictions gathered from all ranks).

    Args:
        model: the network (unwrapped from DDP); put in eval mode here.
        loader: this rank's shard of the validation split (``SliceDataset`` batches).
        device: where the model is.
        ddp: this process's place among the ranks.
        stage: which metrics to compute (see the module docstring).
        amp: float16 autocast on CUDA (``train.amp``), as in the training step.
        threshold_method: stage "cls": how the decision threshold is chosen.
        pos_weight: stage "cls": the training loss's positive-class weight (for ``val_loss``).

    Returns:
        ``val_loss`` and the stage's metrics, plain floats, the same on every rank.
    """
    model.eval()
    seg_loss = BCEDiceLoss()
    rows: list[tuple[Any, ...]] = []  # one per slice
    losses: list[tuple[float, int]] = []  # (mean loss, slices it covers) per batch
    for batch in loader:
        logits = forward_logits(model, batch["image"], device, amp=amp)
        if stage == "seg":
            masks, has = batch["mask"].to(device), batch["has_mask"].to(device)
            pred, ref = logits.seg > 0, masks > 0.5
            counts = [
                (a & b).sum((1, 2, 3)).tolist()
                for a, b in ((pred, ref), (pred, ~ref), (~pred, ref))
            ]  # tp, fp, fn per slice
            losses.append((float(seg_loss(logits.seg, masks, has)), int(has.sum())))
            rows += list(zip(*counts, strict=True))
        else:
            labels = batch["label"].to(device)
            probs = probabilities(logits.cls).tolist()
            losses.append((float(classification_loss(logits.cls, labels, pos_weight)), len(probs)))
            rows += list(zip(probs, labels.long().tolist(), strict=True))
    rows, losses = all_gather_list(rows, ddp), all_gather_list(losses, ddp)
    n_loss = sum(n for _, n in losses)
    val_loss = sum(v * n for v, n in losses) / n_loss if n_loss else float("nan")
    if stage == "seg":
        return {"val_loss": val_loss, **_segmentation_metrics(rows)}
    return {"val_loss": val_loss, **_classification_metrics(rows, threshold_method)}


def _segmentation_metrics(rows: list[tuple[Any, ...]]) -> dict[str, float]:
    """Dice metrics from per-slice ``(tp, fp, fn)`` pixel counts."""
    tp, fp, fn = (np.array(column, dtype=np.float64) for column in zip(*rows, strict=True))
    # dice_from_counts is NaN for a slice without tumour: those are left out of the mean.
    per_slice = [dice_from_counts(*c) for c in zip(tp, fp, fn, strict=True)]
    with_tumour = [d for d in per_slice if not math.isnan(d)]
    return {
        "val_dice": float(np.mean(with_tumour)) if with_tumour else float("nan"),
        "val_dice_global": dice_from_counts(tp.sum(), fp.sum(), fn.sum()),
        "val_slices_with_tumour": float(len(with_tumour)),
    }


def _classification_metrics(
    rows: list[tuple[Any, ...]], threshold_method: ThresholdMethod
) -> dict[str, float]:
    """Metrics at 0.5 and at the chosen threshold from per-slice ``(probability, label)``."""
    y_prob = np.clip(np.array([r[0] for r in rows], dtype=np.float64), 0.0, 1.0)
    y_true = np.array([r[1] for r in rows], dtype=np.int64)
    at_half = classification_metrics(y_true, y_prob, 0.5)
    threshold = choose_threshold(y_true, y_prob, threshold_method)
    tuned = classification_metrics(y_true, y_prob, threshold)
    return {
        "val_acc": at_half["accuracy"],
        "val_f1": at_half["f1"],
        "val_mcc": at_half["mcc"],
        "val_auc": at_half["auc"],
        "val_sensitivity": at_half["sensitivity"],
        "val_specificity": at_half["specificity"],
        "val_threshold": threshold,
        "val_mcc_at_threshold": tuned["mcc"],
        "val_acc_at_threshold": tuned["accuracy"],
    }
