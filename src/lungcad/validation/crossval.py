"""``lungcad validate --folds K``: the deep model, the baselines and a shortcut audit on one set
of grouped folds, scored out-of-fold, plus the fold ensemble.

For each fold the deep model is trained on the other folds' groups (early stopping and the
threshold on a validation share of those groups) and predicts its held-out fold; the five
traditional baselines are tuned and thresholded by grouped CV inside the same training groups;
the **shortcut audit** fits the same models on acquisition metadata alone (image height,
width, aspect ratio, mean and spread of intensity). If metadata alone scores close to the
deep model, the data carries a shortcut the model may be using.

Output folder::

    OUT/folds.json              group -> fold, k, seed, the prepared manifest's sha256
    OUT/fold<i>/manifest.csv    the fold's splits (paths point at the prepared slices)
    OUT/fold<i>/run/            the fold's trained run (a checkpoint folder)
    OUT/oof_predictions.csv     model, fold, sample, group, label, probability, threshold
    OUT/cv_metrics.json         per model: out-of-fold metrics with patient-group CIs
    OUT/results.md              the table
    OUT/ensemble.json           the k fold runs as one model (see lungcad.training.ensemble)
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.manifest import SliceRecord, manifest_csv, read_manifest
from lungcad.errors import InputError
from lungcad.evaluation.evaluate import evaluate_run
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.io.folders import check_output_dir, removed_on_failure
from lungcad.io.images import load_slice_array
from lungcad.metrics.classification import choose_threshold
from lungcad.provenance import utc_timestamp
from lungcad.training.config import Config, apply_overrides, config_hash, config_to_dict
from lungcad.training.loop import train
from lungcad.validation.baselines.choices import MODEL_NAMES
from lungcad.validation.baselines.features import feature_table
from lungcad.validation.baselines.pipelines import fit_baseline
from lungcad.validation.folds import (
    OutOfFold,
    assign_folds,
    fold_records,
    oof_metrics,
    write_fold_manifest,
    write_folds_json,
)

log = logging.getLogger(__name__)

DEEP = "deep"
SHORTCUT_PREFIX = "shortcut_"
#: Models the shortcut audit fits on metadata (a linear and a non-linear one).
SHORTCUT_MODELS = ("logreg", "rf")
METADATA_FEATURES = ("height", "width", "aspect", "mean_intensity", "std_intensity")
ENSEMBLE_FILE = "ensemble.json"
TABLE_KEYS = ("accuracy", "f1", "mcc", "kappa", "auc", "sensitivity", "specificity")


@dataclass
class CrossValResult:
    """What :func:`cross_validate` measured.

    Attributes:
        metrics: model name -> out-of-fold metrics (``deep``, baseline names, and
            ``shortcut_<model>`` for the audit).
        predictions: model name -> its out-of-fold predictions.
        out_dir: the folder written.
    """

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, list[OutOfFold]]
    out_dir: Path


def metadata_table(records: Sequence[SliceRecord], root: Path) -> np.ndarray:
    """``(N, 5)`` acquisition metadata per slice: height, width, aspect, mean and std intensity.

    What an image carries besides its anatomy; a classifier on these alone measures how much
    of a label can be read off the acquisition (a shortcut).
    """
    rows = []
    for r in records:
        image = load_slice_array(root / r.image_path, r.sample_id, "image")
        h, w = image.shape
        rows.append([h, w, w / h, float(image.mean()), float(image.std())])
    return np.asarray(rows, dtype=np.float64)


def _fold_baselines(
    name: str,
    X: np.ndarray,
    records: Sequence[SliceRecord],
    fold_of: dict[str, int],
    k: int,
    seed: int,
) -> list[OutOfFold]:
    """One baseline fitted per fold on the other folds, predicting the held-out fold."""
    y = np.array([r.label for r in records])
    groups = np.array([r.group_id for r in records])
    fold = np.array([fold_of[r.group_id] for r in records])
    rows: list[OutOfFold] = []
    for f in range(k):
        fit, held = fold != f, fold == f
        model = fit_baseline(name, (X[fit], y[fit], groups[fit]), seed=seed)
        prob = model.predict_proba(X[held])
        for r, p in zip((r for r, h in zip(records, held, strict=True) if h), prob, strict=True):
            rows.append(OutOfFold(r.sample_id, r.group_id, r.label, f, float(p), model.threshold))
    return rows


def _fold_deep(
    records: Sequence[SliceRecord],
    root: Path,
    fold_of: dict[str, int],
    k: int,
    config: Config,
    out: Path,
    seed: int,
    progress: Callable[[str], None],
) -> tuple[list[OutOfFold], list[dict[str, Any]]]:
    """Train the deep model once per fold and predict each held-out fold."""
    rows: list[OutOfFold] = []
    members: list[dict[str, Any]] = []
    for f in range(k):
        folder = out / f"fold{f}"
        manifest = write_fold_manifest(fold_records(records, fold_of, f, seed=seed), root, folder)
        cfg = apply_overrides(
            config,
            {"data": {"manifest": [str(manifest)]}, "train": {"out_dir": str(folder / "run")}},
        )
        run = train(cfg).run_dir
        result = evaluate_run(run, manifest, None, split="test", n_boot=0, device=cfg.train.device)
        threshold = float(result.info["threshold"]["value"])
        fold_rows = [
            OutOfFold(r.sample_id, r.group_id, r.label, f, float(r.probability), threshold)
            for r in result.rows
        ]
        rows += fold_rows
        m = oof_metrics(fold_rows, n_boot=0)
        progress(f"fold {f}: deep accuracy {m['accuracy']:.3f}, AUC {m['auc']:.3f}")
        members.append({"fold": f, "run": f"fold{f}/run", "threshold": threshold})
    return rows, members


def _predictions_csv(predictions: dict[str, list[OutOfFold]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "fold", "sample_id", "group_id", "label", "probability", "threshold"])
    for name, rows in predictions.items():
        for r in rows:
            writer.writerow(
                [
                    name,
                    r.fold,
                    r.sample_id,
                    r.group_id,
                    r.label,
                    f"{r.probability:.6f}",
                    f"{r.threshold:.6f}",
                ]
            )
    return buffer.getvalue()


def results_markdown(metrics: dict[str, dict[str, float]], k: int, n_groups: int) -> str:
    """The out-of-fold table: one row per model, point estimate and 95% CI per metric."""

    def cell(m: dict[str, float], key: str) -> str:
        value = m.get(key, float("nan"))
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
        return f"{value:.3f}{ci}"

    lines = [
        f"Grouped {k}-fold cross-validation over {n_groups} patient groups; every figure is "
        "out-of-fold (each slice scored by the model that never saw its patient), with "
        "patient-group bootstrap 95% CIs. Thresholds come from each fold's own training groups.",
        "",
        "| model | " + " | ".join(TABLE_KEYS) + " |",
        "|---|" + "---|" * len(TABLE_KEYS),
    ]
    for name, m in metrics.items():
        label = (
            f"shortcut audit ({name[len(SHORTCUT_PREFIX) :]}, metadata only)"
            if name.startswith(SHORTCUT_PREFIX)
            else name
        )
        lines.append(f"| {label} | " + " | ".join(cell(m, key) for key in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def cross_validate(
    manifest: str | Path,
    out_dir: str | Path,
    config: Config,
    *,
    k: int = 5,
    seed: int = 0,
    baselines: Sequence[str] = MODEL_NAMES,
    features: str = "handcrafted",
    deep: bool = True,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> CrossValResult:
    """Grouped k-fold CV of the deep model, the baselines and the shortcut audit.

    Args:
        manifest: a prepared folder (or its manifest.csv); its own splits are ignored: every
            labelled (0/1) slice takes part, grouped by ``group_id``.
        out_dir: the output folder (new or empty); on any error or interruption it is left
            as it was found (nothing half-written).
        config: the deep model's training configuration (``data.manifest`` and
            ``train.out_dir`` are set per fold).
        k: number of folds.
        seed: seed of the folds, the inner validation split and the baselines.
        baselines: baseline model names (empty: none).
        features: baseline features (``"handcrafted"``, ``"radiomics"``, ``"both"``).
        deep: train the deep model (False: baselines and audit only, e.g. for a quick look).
        n_boot: patient-group bootstrap replicates for the CIs.
        progress: called with one line per step.

    Returns:
        The :class:`CrossValResult`.
    """
    say = progress or (lambda _: None)
    csv_path = manifest_csv(manifest)
    root = csv_path.parent
    out = check_output_dir(out_dir, None)
    records = [r for r in read_manifest(csv_path) if r.label in (0, 1)]
    if not records:
        raise InputError("no labelled (0/1) slices to cross-validate", csv_path)
    unknown = sorted(set(baselines) - set(MODEL_NAMES))
    if unknown:
        raise InputError(f"unknown baselines {unknown}; choose from {MODEL_NAMES}", "--baselines")
    fold_of = assign_folds(records, k, seed)
    with removed_on_failure(out):
        write_folds_json(out, csv_path, fold_of, k, seed)
        predictions: dict[str, list[OutOfFold]] = {}
        members: list[dict[str, Any]] = []
        if deep:
            predictions[DEEP], members = _fold_deep(
                records, root, fold_of, k, config, out, seed, say
            )
        if baselines:
            say(f"baselines: {features} features of {len(records)} slices")
            X, _ = feature_table(records, root, kind=features, roi="lung")
            for name in baselines:
                predictions[name] = _fold_baselines(name, X, records, fold_of, k, seed)
                say(f"baseline {name}: done")
        meta = metadata_table(records, root)
        for name in SHORTCUT_MODELS:
            predictions[SHORTCUT_PREFIX + name] = _fold_baselines(
                name, meta, records, fold_of, k, seed
            )
        metrics = {
            name: oof_metrics(rows, n_boot=n_boot, seed=seed) for name, rows in predictions.items()
        }
        write_text_atomic(out / "oof_predictions.csv", _predictions_csv(predictions))
        write_json_atomic(out / "cv_metrics.json", metrics)
        n_groups = len(fold_of)
        write_text_atomic(out / "results.md", results_markdown(metrics, k, n_groups))
        if members:
            deep_rows = predictions[DEEP]
            # The ensemble's own threshold: chosen on the pooled out-of-fold probabilities (each
            # patient once). Figures above never use it; held-back patients test it.
            pooled = choose_threshold(
                np.array([r.label for r in deep_rows]),
                np.array([r.probability for r in deep_rows]),
                method=config.train.threshold_method,
            )
            write_json_atomic(
                out / ENSEMBLE_FILE,
                {
                    "members": members,
                    "threshold": pooled,
                    "threshold_source": "out-of-fold",
                    "aggregation": "mean probability",
                    "config_hash": config_hash(config),
                    "config": config_to_dict(config),
                    "created_at": utc_timestamp(),
                },
            )
    return CrossValResult(metrics=metrics, predictions=predictions, out_dir=out)
