"""Tests of lungcad.validation.baselines.pipelines and ``lungcad baselines``: grouped tuning,
thresholds chosen on training data only, metrics for every set, and the CLI end to end on a
tiny manifest."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest

from lungcad.cli import main
from lungcad.data.manifest import SliceRecord, read_manifest, write_manifest
from lungcad.errors import InputError
from lungcad.metrics.classification import choose_threshold
from lungcad.validation.baselines.choices import MODEL_NAMES
from lungcad.validation.baselines.features import feature_table
from lungcad.validation.baselines.pipelines import (
    evaluate_baselines,
    fit_baseline,
    fit_baselines,
    make_cv,
    run_baselines,
)

# Tiny grids keep the tests fast; each still has a choice to make for most models.
SMALL_GRIDS = {
    "logreg": {"clf__C": [0.1, 1.0]},
    "svm": {"clf__estimator__C": [1.0]},
    "rf": {"clf__n_estimators": [20], "clf__max_depth": [3, None]},
    "gb": {"clf__max_iter": [20], "clf__min_samples_leaf": [5]},
    "knn": {"clf__n_neighbors": [5, 15]},
}


def _cohort(n_groups: int, shift: float, seed: int, prefix: str):
    """Patients with 3-6 correlated slices; features 0-2 carry the label; ``shift`` moves
    every feature (a scanner/site change)."""
    rng = np.random.default_rng(seed)
    X, y, groups = [], [], []
    for k in range(n_groups):
        label = k % 2
        patient = rng.normal(0, 0.5, 8)
        for _ in range(rng.integers(3, 7)):
            x = patient + rng.normal(0, 1, 8)
            x[:3] += 1.5 * label
            X.append(x + shift)
            y.append(label)
            groups.append(f"{prefix}{k}")
    return np.array(X), np.array(y), np.array(groups)


@pytest.fixture(scope="module")
def sets():
    return {
        "train": _cohort(30, 0.0, 1, "a"),
        "internal": _cohort(12, 0.0, 2, "b"),
        "external": _cohort(12, 2.0, 3, "c"),
    }


def test_cv_keeps_patients_whole_and_both_classes(sets):
    X, y, groups = sets["train"]
    cv = make_cv(y, groups, n_splits=5, seed=0)
    folds = list(cv.split(X, y, groups))
    assert len(folds) == 5
    seen = []
    for train_idx, test_idx in folds:
        assert not set(groups[train_idx]) & set(groups[test_idx])
        assert set(y[test_idx]) == {0, 1}
        seen.extend(groups[test_idx])
    assert sorted(seen) == sorted(groups)  # every slice tested exactly once
    with pytest.raises(InputError, match="2 patients"):
        make_cv(y[:4], np.array(["p", "p", "q", "q"]), 5)


def test_fit_baseline_tunes_on_grouped_folds(sets):
    X, y, groups = sets["train"]
    model = fit_baseline("logreg", sets["train"], param_grid=SMALL_GRIDS["logreg"])
    assert [name for name, _ in model.pipeline.steps] == [
        "impute",
        "variance",
        "scale",
        "select",
        "clf",
    ]
    assert model.best_params["clf__C"] in (0.1, 1.0)
    for train_idx, test_idx in model.cv_folds:
        assert not set(groups[train_idx]) & set(groups[test_idx])
    # Threshold from the out-of-fold training predictions, nothing else.
    assert model.oof_prob.shape == y.shape
    assert model.threshold == choose_threshold(y, model.oof_prob, "mcc")
    assert model.pipeline.named_steps["scale"].n_samples_seen_ == len(y)
    assert 0.5 < model.cv_score <= 1.0


def test_nan_features_are_imputed_inside_the_pipeline(sets):
    X, y, groups = sets["train"]
    X = X.copy()
    X[::7, 2] = np.nan
    X[:, 5] = 1.0  # constant: dropped by VarianceThreshold
    model = fit_baseline("knn", (X, y, groups), param_grid=SMALL_GRIDS["knn"])
    assert np.isfinite(model.predict_proba(X)).all()


def test_run_baselines_all_models_and_domain_shift(sets):
    results = run_baselines(
        sets["train"],
        {"internal": sets["internal"], "external": sets["external"]},
        models=MODEL_NAMES,
        seed=0,
        param_grids=SMALL_GRIDS,
    )
    assert set(results) == set(MODEL_NAMES)
    for model, per_set in results.items():
        assert set(per_set) == {"train", "train_cv", "internal", "external"}
        for metrics in per_set.values():
            assert {"accuracy", "f1", "mcc", "kappa", "auc", "tp", "n", "n_groups"} <= set(metrics)
        assert per_set["internal"]["n"] == len(sets["internal"][1])
        # The site shift moves every feature: the fixed model degrades on the external set.
        assert per_set["external"]["accuracy"] < per_set["internal"]["accuracy"], model
        assert per_set["internal"]["auc"] > 0.7, model


def test_evaluated_sets_do_not_change_the_model(sets):
    fitted = fit_baselines(sets["train"], ["logreg"], param_grids=SMALL_GRIDS)
    threshold = fitted["logreg"].threshold
    X, y, groups = sets["external"]
    a = evaluate_baselines(fitted, sets["train"], {"ext": (X, y, groups)})
    b = evaluate_baselines(fitted, sets["train"], {"ext": (X, 1 - y, groups)}, n_boot=50)
    assert fitted["logreg"].threshold == threshold == a["logreg"]["ext"]["threshold"]
    assert a["logreg"]["train"] == b["logreg"]["train"]
    assert a["logreg"]["ext"]["accuracy"] == pytest.approx(1 - b["logreg"]["ext"]["accuracy"])
    assert "accuracy_ci_low" in b["logreg"]["ext"] and "accuracy_ci_low" not in a["logreg"]["ext"]
    with pytest.raises(InputError, match="reserved"):
        evaluate_baselines(fitted, sets["train"], {"train_cv": sets["internal"]})
    with pytest.raises(InputError, match="features"):
        evaluate_baselines(fitted, sets["train"], {"ext": (X[:, :3], y, groups)})
    with pytest.raises(InputError, match="unknown"):
        fit_baselines(sets["train"], ["xgboost"])


# ---------------------------------------------------------------------------- CLI


def _slice(rng: np.random.Generator, label: int, brightness: float) -> np.ndarray:
    image = 0.3 + brightness + rng.normal(0, 0.05, (48, 48))
    if label:  # a bright, textured nodule
        yy, xx = np.mgrid[:48, :48]
        cy, cx = rng.integers(14, 34, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        image[blob] = 0.8 + rng.normal(0, 0.1, blob.sum())
    return np.clip(image, 0, 1).astype(np.float32)


def _manifest(folder: Path, n_patients: int, brightness: float, seed: int, test_from: int):
    rng = np.random.default_rng(seed)
    (folder / "slices").mkdir(parents=True)
    records = []
    for p in range(n_patients):
        for s in range(3):
            label = p % 2
            sid = f"{folder.name}_p{p}_s{s}"
            np.save(folder / "slices" / f"{sid}.npy", _slice(rng, label, brightness))
            records.append(
                SliceRecord(
                    sample_id=sid,
                    group_id=f"p{p}",
                    slice_index=s,
                    image_path=f"slices/{sid}.npy",
                    mask_path="",
                    label=label,
                    spacing_y=0.8,
                    spacing_x=0.8,
                    source="tiny",
                    split="test" if p >= test_from else "train",
                )
            )
    records.append(
        SliceRecord(  # an unknown label: must be left out
            sample_id=f"{folder.name}_unknown",
            group_id="p0",
            slice_index=9,
            image_path=records[0].image_path,
            mask_path="",
            label=-1,
            spacing_y=0.8,
            spacing_x=0.8,
            source="tiny",
            split="train",
        )
    )
    write_manifest(records, folder / "manifest.csv")
    return records


def test_cli_end_to_end(tmp_path, capsys):
    _manifest(tmp_path / "hosp_a", 16, 0.0, seed=0, test_from=12)
    _manifest(tmp_path / "hosp_b", 8, 0.15, seed=1, test_from=99)
    out = tmp_path / "out"
    code = main(
        [
            "baselines",
            "--train",
            str(tmp_path / "hosp_a"),
            "--eval",
            f"hosp_b={tmp_path / 'hosp_b'}",
            "--out",
            str(out),
            "--features",
            "handcrafted",
            "--roi",
            "whole",
            "--models",
            "logreg,knn",
            "--n-boot",
            "20",
        ]
    )
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["metrics"]) == {
        f"{m}/{s}" for m in ("logreg", "knn") for s in ("train", "train_cv", "internal", "hosp_b")
    }
    assert summary["data"]["train"] == {
        "manifest": str(tmp_path / "hosp_a"),
        "n": 36,
        "n_groups": 12,
        "n_positive": 18,
    }
    assert summary["data"]["internal"]["n"] == 12 and summary["data"]["hosp_b"]["n"] == 24
    internal = summary["metrics"]["logreg/internal"]
    assert internal["accuracy_ci_low"] <= internal["accuracy"] <= internal["accuracy_ci_high"]
    table = (out / "metrics.md").read_text()
    assert "| logreg | hosp_b |" in table and "| knn | internal |" in table
    assert "| logreg | hosp_b |" in capsys.readouterr().out

    saved = joblib.load(out / "models" / "logreg.joblib")
    records = [r for r in read_manifest(tmp_path / "hosp_b") if r.label >= 0]
    X, names = feature_table(records, tmp_path / "hosp_b", kind="handcrafted", roi="whole")
    assert names == saved["feature_names"]
    prob = saved["pipeline"].predict_proba(X)[:, 1]
    pred = (prob >= saved["threshold"]).astype(int)
    expected = summary["metrics"]["logreg/hosp_b"]
    assert pred.sum() == expected["tp"] + expected["fp"]
    assert list((out / "feature_cache").iterdir())  # features cached for the next run
    assert not [p for p in out.rglob("*.tmp*")]  # nothing half-written left behind


def test_cli_bad_input(tmp_path):
    _manifest(tmp_path / "hosp_a", 8, 0.0, seed=0, test_from=6)
    base = ["baselines", "--train", str(tmp_path / "hosp_a"), "--out", str(tmp_path / "o")]
    assert main([*base, "--eval", "no_equals_sign"]) == 2
    assert main([*base, "--eval", f"internal={tmp_path / 'hosp_a'}"]) == 2
    assert main([*base, "--models", "logreg,deepnet"]) == 2
    assert (
        main(["baselines", "--train", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    )
    assert not (tmp_path / "o" / "metrics.json").exists()
