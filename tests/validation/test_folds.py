"""Tests for lungcad.validation.folds: grouped folds, fold manifests and out-of-fold scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungcad.data.manifest import SliceRecord, read_manifest
from lungcad.errors import InputError
from lungcad.validation.folds import (
    OutOfFold,
    aligned_scores,
    assign_folds,
    fold_records,
    oof_metrics,
    write_fold_manifest,
)


def _records(n_groups: int = 12, per_group: int = 3) -> list[SliceRecord]:
    return [
        SliceRecord(
            sample_id=f"g{g}_{i}",
            group_id=f"g{g}",
            slice_index=i,
            image_path=f"slices/g{g}_{i}.npy",
            mask_path="",
            label=g % 2,
            spacing_y=1.0,
            spacing_x=1.0,
            source="test",
            split="train",
        )
        for g in range(n_groups)
        for i in range(per_group)
    ]


def test_every_group_is_held_out_once_and_folds_are_stratified() -> None:
    records = _records()
    fold_of = assign_folds(records, 3, seed=0)
    assert set(fold_of) == {f"g{g}" for g in range(12)} and set(fold_of.values()) == {0, 1, 2}
    for f in range(3):
        labels = [int(g[1:]) % 2 for g, fold in fold_of.items() if fold == f]
        assert labels.count(0) == labels.count(1) == 2
    assert assign_folds(records, 3, seed=0) == fold_of  # deterministic
    with pytest.raises(InputError, match="folds"):
        assign_folds(records, 7)  # only 6 groups per label
    with pytest.raises(InputError, match="2 or more"):
        assign_folds(records, 1)


def test_fold_records_keep_patients_apart(tmp_path: Path) -> None:
    records = _records()
    fold_of = assign_folds(records, 3)
    rows = fold_records(records, fold_of, 1)
    test_groups = {r.group_id for r in rows if r.split == "test"}
    assert test_groups == {g for g, f in fold_of.items() if f == 1}
    val_groups = {r.group_id for r in rows if r.split == "val"}
    assert val_groups and not val_groups & test_groups
    assert {r.split for r in rows} == {"train", "val", "test"}
    manifest = write_fold_manifest(rows, tmp_path / "prepared", tmp_path / "cv" / "fold1")
    back = read_manifest(manifest)
    assert back[0].image_path == "../../prepared/slices/g0_0.npy"
    assert (manifest.parent / back[0].image_path).resolve() == (
        tmp_path / "prepared" / "slices" / "g0_0.npy"
    ).resolve()


def test_aligned_scores_honour_each_threshold() -> None:
    p = np.array([0.05, 0.15, 0.6, 0.9])
    t = np.array([0.1, 0.1, 0.7, 0.7])
    a = aligned_scores(p, t)
    assert ((a >= 0.5) == (p >= t)).all()
    assert np.all(np.diff(aligned_scores(np.linspace(0, 1, 11), np.full(11, 0.3))) > 0)
    assert aligned_scores(np.array([0.0, 1.0]), np.array([0.4, 0.4])).tolist() == [0.0, 1.0]


def test_oof_metrics_use_fold_thresholds_for_decisions() -> None:
    # Fold 0 separates at 0.2, fold 1 at 0.8: with one global 0.5 both would err.
    rows = [
        OutOfFold("a", "ga", 1, 0, 0.3, 0.2),
        OutOfFold("b", "gb", 0, 0, 0.1, 0.2),
        OutOfFold("c", "gc", 1, 1, 0.9, 0.8),
        OutOfFold("d", "gd", 0, 1, 0.7, 0.8),
    ]
    m = oof_metrics(rows, n_boot=0)
    assert m["accuracy"] == 1.0 and m["n_folds"] == 2
    assert m["auc"] == pytest.approx(0.75)  # pooled probabilities: 0.7 (label 0) > 0.3
    with_ci = oof_metrics(rows, n_boot=50)
    assert with_ci["accuracy_ci_low"] <= 1.0 <= with_ci["accuracy_ci_high"] + 1e-9
    with pytest.raises(InputError):
        oof_metrics([])
