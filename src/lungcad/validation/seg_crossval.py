"""``lungcad validate --folds K`` with a segmentation config: grouped k-fold CV of stage 1.

Each patient group is held out once; the fold's model is trained on the other groups (early
stopping on a validation share of them) and segments its held-out patients. Every figure is
computed from those out-of-fold masks, pooled over all patients, with patient-group bootstrap
CIs (:func:`lungcad.evaluation.scoring.segmentation_summary`): the mean Dice over tumour
slices (a missed tumour counts as Dice 0), the pooled Dice, HD95 and lesion sensitivity.

Output folder::

    OUT/folds.json               group -> fold, k, seed, the prepared manifest's sha256
    OUT/fold<i>/manifest.csv     the fold's splits (paths point at the prepared slices)
    OUT/fold<i>/run/             the fold's trained segmentation run
    OUT/oof_segmentation.csv     sample, group, fold, dice, iou, hd95, reference/predicted pixels
    OUT/seg_cv_metrics.json      the pooled out-of-fold metrics with CIs, and per fold
    OUT/results.md               the table
    OUT/ensemble.json            the k fold runs as one segmentation model
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungcad.data.manifest import manifest_csv, read_manifest
from lungcad.errors import InputError
from lungcad.evaluation.evaluate import evaluate_run
from lungcad.evaluation.scoring import SliceResult, segmentation_summary
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.io.folders import check_output_dir, removed_on_failure
from lungcad.provenance import utc_timestamp
from lungcad.training.config import Config, apply_overrides, config_hash, config_to_dict
from lungcad.training.ensemble import ENSEMBLE_FILE
from lungcad.training.loop import train
from lungcad.validation.folds import (
    assign_folds,
    fold_records,
    write_fold_manifest,
    write_folds_json,
)

__all__ = ["SegCrossValResult", "cross_validate_segmentation", "seg_results_markdown"]

#: The figures of the table, in order (see ``evaluation.scoring._segmentation_aggregate``).
TABLE_KEYS = ("dice", "dice_global", "iou", "hd95", "lesion_sensitivity")


@dataclass
class SegCrossValResult:
    """What :func:`cross_validate_segmentation` measured.

    Attributes:
        metrics: pooled out-of-fold metrics (with ``<key>_ci_low``/``_ci_high``).
        per_fold: one metrics dict per fold (no CIs), for the spread between folds.
        rows: the scored out-of-fold slices, each with its fold in ``split`` (``fold<i>``).
        out_dir: the folder written.
    """

    metrics: dict[str, float]
    per_fold: list[dict[str, float]]
    rows: list[SliceResult]
    out_dir: Path


def _oof_csv(rows: Sequence[SliceResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample_id", "group_id", "fold", "dice", "iou", "hd95_mm", "ref", "pred"])
    for r in rows:
        writer.writerow(
            [r.sample_id, r.group_id, r.split]
            + [
                "" if not math.isfinite(v) else f"{v:.6g}"
                for v in (r.dice, r.iou, r.hd95, r.ref_pixels, r.pred_pixels)
            ]
        )
    return buffer.getvalue()


def seg_results_markdown(metrics: dict[str, float], k: int, n_groups: int, n_slices: int) -> str:
    """The out-of-fold segmentation table (Markdown) with its 95% CIs."""

    def cell(key: str) -> str:
        value = metrics.get(key, math.nan)
        if not math.isfinite(value):
            return "n/a"
        low, high = metrics.get(f"{key}_ci_low", math.nan), metrics.get(f"{key}_ci_high", math.nan)
        ci = f" ({low:.3f}-{high:.3f})" if math.isfinite(low) and math.isfinite(high) else ""
        return f"{value:.3f}{ci}"

    lines = [
        f"# Segmentation, grouped {k}-fold cross-validation",
        "",
        f"{n_slices} slices of {n_groups} patient groups; every figure is out-of-fold (each "
        "patient segmented by the fold model that never saw it), 95% patient-group bootstrap "
        "CIs in brackets. Dice is the mean over slices with tumour (a missed tumour counts "
        "as 0); pooled Dice sums the pixels of all slices; HD95 in mm (pixels when the "
        "spacing is unknown), over slices with tumour and a prediction.",
        "",
        "| " + " | ".join(TABLE_KEYS) + " |",
        "|" + "---|" * len(TABLE_KEYS),
        "| " + " | ".join(cell(key) for key in TABLE_KEYS) + " |",
        "",
    ]
    return "\n".join(lines)


def cross_validate_segmentation(
    manifest: str | Path,
    out_dir: str | Path,
    config: Config,
    *,
    k: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> SegCrossValResult:
    """Grouped k-fold CV of the segmentation stage.

    Args:
        manifest: a prepared folder (or its manifest.csv); its own splits are ignored: every
            slice with a mask takes part, grouped by ``group_id``.
        out_dir: the output folder (new or empty); on any error or interruption it is left as
            it was found.
        config: the stage-"seg" training configuration (``data.manifest`` and
            ``train.out_dir`` are set per fold).
        k: number of folds (at most the number of groups).
        seed: seed of the folds and of the inner validation split.
        n_boot: patient-group bootstrap replicates for the CIs.
        progress: called with one line per fold.

    Returns:
        The :class:`SegCrossValResult`.

    Raises:
        InputError: the config is not a segmentation config, or no slice has a mask.
    """
    if config.train.stage != "seg":
        raise InputError("segmentation CV needs a seg config (train.stage: seg)", "--config")
    say = progress or (lambda _: None)
    csv_path = manifest_csv(manifest)
    root = csv_path.parent
    out = check_output_dir(out_dir, None)
    records = [r for r in read_manifest(csv_path) if r.has_mask]
    if not records:
        raise InputError("no slices with a tumour mask to cross-validate", csv_path)
    fold_of = assign_folds(records, k, seed, stratify=False)
    rows: list[SliceResult] = []
    per_fold: list[dict[str, float]] = []
    members: list[dict[str, Any]] = []
    with removed_on_failure(out):
        write_folds_json(out, csv_path, fold_of, k, seed)
        for f in range(k):
            folder = out / f"fold{f}"
            fold = fold_records(records, fold_of, f, seed=seed)
            fold_manifest = write_fold_manifest(fold, root, folder)
            cfg = apply_overrides(
                config,
                {
                    "data": {"manifest": [str(fold_manifest)]},
                    "train": {"out_dir": str(folder / "run")},
                },
            )
            run = train(cfg).run_dir
            result = evaluate_run(
                run, fold_manifest, None, split="test", n_boot=0, device=cfg.train.device
            )
            fold_rows = [r for r in result.rows if r.has_mask]
            for r in fold_rows:
                r.split = f"fold{f}"
            rows += fold_rows
            per_fold.append(segmentation_summary(fold_rows, n_boot=0))
            say(
                f"fold {f}: Dice {per_fold[-1]['dice']:.3f} over "
                f"{int(per_fold[-1]['n_tumour_slices'])} tumour slices"
            )
            members.append({"fold": f, "run": f"fold{f}/run"})
        metrics = segmentation_summary(rows, n_boot=n_boot, seed=seed)
        write_text_atomic(out / "oof_segmentation.csv", _oof_csv(rows))
        write_json_atomic(out / "seg_cv_metrics.json", {"pooled": metrics, "per_fold": per_fold})
        write_text_atomic(
            out / "results.md", seg_results_markdown(metrics, k, len(fold_of), len(rows))
        )
        write_json_atomic(
            out / ENSEMBLE_FILE,
            {
                "members": members,
                # A segmentation ensemble has no cancer decision; the value is never used
                # for one (the predictor reports "no classifier" for a seg-stage model).
                "threshold": 0.5,
                "threshold_source": "none: segmentation ensemble",
                "aggregation": "mean probability",
                "config_hash": config_hash(config),
                "config": config_to_dict(config),
                "created_at": utc_timestamp(),
            },
        )
    return SegCrossValResult(metrics=metrics, per_fold=per_fold, rows=rows, out_dir=out)
