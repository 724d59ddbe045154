"""Grouped k-fold cross-validation: folds of patients, fold manifests, out-of-fold scores.

Every patient group is held out exactly once, so each figure is computed from out-of-fold
predictions over all patients instead of a 5-group test split (nnU-Net's 5-fold protocol).

* :func:`assign_folds`: group -> fold, stratified by group label (scikit-learn's
  ``StratifiedGroupKFold``), seeded;
* :func:`fold_records`: the records of one fold as a manifest: the held-out fold is ``test``,
  a label-stratified share of the remaining groups is ``val`` (early stopping and the
  decision threshold are chosen there, never on the held-out fold), the rest ``train``;
* :func:`write_fold_manifest`: writes that manifest beside the prepared folder, its paths
  pointing at the prepared slices (nothing is copied);
* :func:`aligned_scores` / :func:`oof_metrics`: scores of all folds on one scale, and the
  metrics with patient-group bootstrap CIs. Each fold's decisions use that fold's own
  threshold; AUC is computed on the pooled probabilities.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lungcad.data.manifest import (
    SliceRecord,
    check_no_group_leakage,
    group_labels_of,
    split_groups,
    write_manifest,
)
from lungcad.errors import InputError
from lungcad.io.atomic import write_json_atomic
from lungcad.metrics.bootstrap import classification_metrics_with_ci
from lungcad.metrics.classification import classification_metrics
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import file_sha256

#: Share of each fold's training groups kept for validation (early stopping, threshold).
DEFAULT_VAL_FRACTION = 0.2


def assign_folds(
    records: Sequence[SliceRecord], k: int, seed: int = 0, *, stratify: bool = True
) -> dict[str, int]:
    """Assign every group to one of ``k`` folds, stratified by group label.

    Args:
        records: manifest records (any split; ``split`` is ignored).
        k: number of folds (2 or more, at most the number of groups of the rarer label).
        seed: seed of the shuffle.
        stratify: balance the group labels across folds. False for segmentation, whose
            groups are nearly all tumour patients: then only ``k <= number of groups`` holds.

    Returns:
        group id -> fold index ``0..k-1``.

    Raises:
        InputError: ``k`` is below 2 or larger than a label's number of groups.
    """
    labels = group_labels_of(records)
    groups = sorted(labels)
    counts = Counter(1 if labels[g] == 1 else 0 for g in groups)
    if k < 2:
        raise InputError(f"folds must be 2 or more; got {k}", "--folds")
    if not stratify:
        if len(groups) < k:
            raise InputError(
                f"{k} folds need at least {k} groups; found {len(groups)}. Use fewer folds",
                "--folds",
            )
        counts = Counter({0: k, 1: k})  # every label is taken as one below
    if min(counts[0], counts[1]) < k:
        raise InputError(
            f"{k} folds need at least {k} groups of each label; found {counts[1]} cancerous "
            f"and {counts[0]} other groups. Use fewer folds",
            "--folds",
        )
    y = np.array([1 if labels[g] == 1 and stratify else 0 for g in groups])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(groups)), y, groups)):
        for i in held:
            fold_of[groups[i]] = fold
    return fold_of


def fold_records(
    records: Sequence[SliceRecord],
    fold_of: Mapping[str, int],
    fold: int,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
) -> list[SliceRecord]:
    """The records with splits for one fold: held-out fold ``test``, the rest ``train``/``val``.

    Raises:
        InputError: a record's group has no fold.
    """
    missing = sorted({r.group_id for r in records} - set(fold_of))
    if missing:
        raise InputError(f"groups without a fold: {', '.join(missing[:5])}", "folds")
    rest = [r for r in records if fold_of[r.group_id] != fold]
    inner = split_groups(
        group_labels_of(rest),
        group_sizes=Counter(r.group_id for r in rest),
        val_fraction=val_fraction,
        test_fraction=0.0,
        seed=seed + fold,
    )
    out = [
        replace(r, split="test" if fold_of[r.group_id] == fold else inner[r.group_id])
        for r in records
    ]
    check_no_group_leakage(out)
    return out


def write_folds_json(
    out: Path, csv_path: Path, fold_of: Mapping[str, int], k: int, seed: int
) -> None:
    """Write ``out/folds.json``: group -> fold, k, seed and the manifest with its sha256, so a
    reader can check which patients each fold held out."""
    write_json_atomic(
        out / "folds.json",
        {
            "k": k,
            "seed": seed,
            "manifest": str(csv_path),
            "manifest_sha256": file_sha256(csv_path),
            "fold_of": dict(fold_of),
            "created_at": utc_timestamp(),
        },
    )


def write_fold_manifest(records: Sequence[SliceRecord], root: Path, folder: Path) -> Path:
    """Write ``folder/manifest.csv`` whose paths point at the files under ``root``.

    Args:
        records: the fold's records, paths relative to ``root`` (the prepared folder).
        root: the prepared folder holding the slices.
        folder: where the fold's manifest goes.

    Returns:
        The manifest path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(root.resolve(), folder.resolve()))

    def moved(path: str) -> str:
        return (rel / path).as_posix() if path else ""

    rows = [
        replace(r, image_path=moved(r.image_path), mask_path=moved(r.mask_path)) for r in records
    ]
    return write_manifest(rows, folder / "manifest.csv")


@dataclass(frozen=True)
class OutOfFold:
    """One slice's prediction by the model that did not see its patient.

    Attributes:
        sample_id: the slice.
        group_id: its patient group.
        label: 0/1.
        fold: the fold that held it out.
        probability: the held-out model's probability of cancer.
        threshold: that model's decision threshold (chosen on its own validation groups).
    """

    sample_id: str
    group_id: str
    label: int
    fold: int
    probability: float
    threshold: float


def aligned_scores(probability: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Map each probability so that its model's threshold lands at 0.5, order kept.

    Piecewise linear: ``[0, t] -> [0, 0.5]`` and ``[t, 1] -> [0.5, 1]``. Thresholding the
    result at 0.5 gives exactly each fold's own decisions, so pooled decision metrics honour
    the per-fold thresholds.
    """
    p = np.asarray(probability, dtype=np.float64)
    t = np.clip(np.asarray(threshold, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.where(p < t, 0.5 * p / t, 0.5 + 0.5 * (p - t) / (1 - t))


def oof_metrics(rows: Sequence[OutOfFold], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Metrics over all out-of-fold predictions, with patient-group bootstrap CIs.

    Decision metrics (accuracy, F1, MCC, kappa, sensitivity, specificity) use each fold's own
    threshold; ``auc`` (and its CI), ``pr_auc``, ``brier`` and ``ece`` are computed on the
    pooled probabilities.
    """
    if not rows:
        raise InputError("no out-of-fold predictions to score", "folds")
    y = np.array([r.label for r in rows])
    p = np.array([r.probability for r in rows])
    t = np.array([r.threshold for r in rows])
    groups = np.array([r.group_id for r in rows])

    def score(values: np.ndarray) -> dict[str, float]:
        if n_boot <= 0:  # point estimates only
            return classification_metrics(y, values, threshold=0.5)
        return classification_metrics_with_ci(
            y, values, groups, threshold=0.5, n_boot=n_boot, seed=seed
        )

    decisions, pooled = score(aligned_scores(p, t)), score(p)
    # Threshold-free metrics come from the probabilities themselves.
    for key in ("auc", "auc_ci_low", "auc_ci_high", "pr_auc", "brier", "ece"):
        if key in pooled:
            decisions[key] = pooled[key]
    decisions["n_folds"] = len({r.fold for r in rows})
    return decisions
