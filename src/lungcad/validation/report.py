"""Self-contained HTML reports of training runs, evaluations and external validations.

``write_report(folder, out)`` looks at what ``folder`` holds and renders one HTML page with
every image embedded as base64 (the file can be mailed or archived on its own):

* an evaluation folder (``lungcad evaluate``; ``evaluation.json``): metric tables with
  patient-level CIs, confusion/ROC/calibration/Dice plots, example overlays, the most
  confident errors, and provenance (library versions, config hash, checkpoint, manifest
  hashes, split summary);
* a validation folder (``lungcad validate``; ``validation.json``): the generalisation-gap
  table and plot, each evaluated set in brief, the baselines, the training runs, provenance;
* a training run folder (``lungcad train``; ``run.json``/``best.pt``): configuration,
  learning curves, decision threshold, provenance.

The pages are built from the generic helpers of :mod:`lungcad.reports.html`. Nothing here
imports torch.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.folder import EVALUATION_FILE, METRICS_FILE, PREDICTIONS_FILE
from lungcad.io.atomic import write_text_atomic
from lungcad.io.folders import read_json_or_empty
from lungcad.reports.html import (
    escape,
    format_value,
    html_image,
    html_kv,
    html_note,
    html_page,
    html_pre,
    html_section,
    html_table,
)

#: Classification metrics in the order the tables show them.
CLASSIFICATION_ROWS = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision (PPV)"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("kappa", "Cohen's kappa"),
    ("auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("brier", "Brier score"),
    ("ece", "Expected calibration error"),
)
SEGMENTATION_ROWS = (
    ("dice", "Dice (mean over tumour slices)"),
    ("dice_global", "Dice (pooled pixels)"),
    ("iou", "IoU (mean over tumour slices)"),
    ("hd95", "HD95"),
    ("lesion_sensitivity", "Lesion sensitivity"),
)
PLOTS = (
    ("confusion_matrix", "Confusion matrix"),
    ("roc", "ROC curve"),
    ("calibration", "Calibration"),
    ("dice", "Dice distribution"),
)


# --------------------------------------------------------------------------- reading folders


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def folder_kind(folder: str | Path) -> str:
    """``"evaluation"``, ``"validation"`` or ``"run"`` for a lungcad output folder.

    Raises:
        MissingInputError: the folder does not exist.
        InputError: it is none of the three.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(
            "report input not found; pass a run, evaluation or validation folder", folder
        )
    if (folder / "validation.json").is_file():
        return "validation"
    if (folder / EVALUATION_FILE).is_file():
        return "evaluation"
    if (folder / "run.json").is_file() or (folder / "best.pt").is_file():
        return "run"
    raise InputError(
        "not a lungcad output folder: expected evaluation.json (lungcad "
        "evaluate), validation.json (lungcad validate) or run.json/best.pt "
        "(lungcad train)",
        folder,
    )


# --------------------------------------------------------------------------- evaluation


def _count(value: Any) -> str:
    """A count stored as a float in metrics.json, as an integer ("n/a" when missing)."""
    number = _nan(value)
    return str(int(number)) if math.isfinite(number) else "n/a"


def _metric_rows(
    metrics: Mapping[str, Any],
    spec: Sequence[tuple[str, str]],
    unit: Mapping[str, str] | None = None,
) -> list[list[Any]]:
    rows = []
    for key, name in spec:
        if key not in metrics:
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        ci = (
            f"{format_value(_nan(low))} - {format_value(_nan(high))}"
            if f"{key}_ci_low" in metrics
            else ""
        )
        rows.append(
            [
                name + ((" (" + unit[key] + ")") if unit and key in unit else ""),
                _nan(metrics[key]),
                ci,
            ]
        )
    return rows


def _counts_table(table: Mapping[str, Mapping[str, int]], caption: str) -> str:
    if not table:
        return ""
    columns = list(next(iter(table.values())))
    return html_table(
        ([split, *(row.get(c, 0) for c in columns)] for split, row in table.items()),
        ["split", *columns],
        caption=caption,
    )


def _top_errors(folder: Path, limit: int = 10) -> str:
    path = folder / PREDICTIONS_FILE
    if not path.is_file():
        return ""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["prediction"] and r["label"] in ("0", "1")]
    errors = [r for r in rows if r["prediction"] != r["label"]]
    errors.sort(key=lambda r: -abs(float(r["probability"]) - 0.5))
    if not errors:
        return "<p>No misclassified slices.</p>" if rows else ""
    return html_table(
        (
            [
                r["sample_id"],
                r["group_id"],
                int(r["label"]),
                float(r["probability"]),
                int(r["prediction"]),
            ]
            for r in errors[:limit]
        ),
        ["sample", "patient/group", "label", "probability", "prediction"],
        caption=f"Most confident errors ({min(limit, len(errors))} of {len(errors)})",
    )


def evaluation_sections(folder: str | Path, *, brief: bool = False, level: int = 2) -> list[str]:
    """HTML sections of an evaluation folder (``brief``: metrics, plots and examples only)."""
    folder = Path(folder)
    info = read_json_or_empty(folder / EVALUATION_FILE)
    metrics = read_json_or_empty(folder / METRICS_FILE)
    data, ckpt, threshold = (
        info.get("data", {}),
        info.get("checkpoint", {}),
        info.get("threshold", {}),
    )
    tasks = info.get("tasks", {})
    sections = []
    summary = {
        "checkpoint": ckpt.get("path"),
        "model": f"{ckpt.get('model')} (stage {ckpt.get('stage')}, epoch {ckpt.get('epoch')})",
        "data": data.get("input"),
        "split evaluated": data.get("split"),
        "slices / patients (groups)": f"{data.get('n_slices')} / {data.get('n_groups')}",
        "labelled slices (cancer)": f"{data.get('n_labelled')} ({data.get('n_positive')})",
        "slices with a tumour mask": data.get("n_with_mask"),
        "decision threshold": (
            f"{format_value(threshold.get('value'))} (from "
            f"{threshold.get('source')}, chosen on "
            f"{threshold.get('chosen_on')}"
            + {True: "; chosen on this data)", False: "; not tuned on this data)"}.get(
                threshold.get("tuned_on_evaluated_data"), "; whether on this data is not recorded)"
            )
            if threshold.get("value") is not None
            else "n/a"
        ),
    }
    calibration = info.get("calibration", {})
    if calibration.get("applied"):
        summary["probabilities"] = (
            f"calibrated ({calibration.get('method')}, "
            f"{calibration.get('file')}), as `lungcad predict` does"
        )
    notes = [html_note(n) for n in info.get("notes", [])]
    if threshold.get("tuned_on_evaluated_data") or calibration.get("fitted_on_evaluated_data"):
        notes.append(
            html_note(
                "The decision threshold or the calibration was chosen on these slices "
                f"(split {data.get('split')!r}): not a held-out result."
            )
        )
    if data.get("overlaps_training_data"):
        notes.append(
            html_note(
                "These slices come from the manifest the model was trained on "
                f"(split {data.get('split')!r}): not a held-out result."
            )
        )
    sections.append(html_section("Summary", html_kv(summary), *notes, level=level))
    ci_note = (
        f"Brackets: {int(100 * info.get('settings', {}).get('ci_level', 0.95))}% "
        "percentile bootstrap CI resampling patients (groups)."
        if info.get("settings", {}).get("n_boot")
        else ""
    )
    if tasks.get("classification"):
        counts = ", ".join(
            f"{k.upper()} {_count(metrics.get(k))}" for k in ("tp", "fp", "fn", "tn")
        )
        sections.append(
            html_section(
                "Classification (per slice)",
                html_table(
                    _metric_rows(metrics, CLASSIFICATION_ROWS), ["metric", "value", "95% CI"]
                ),
                f'<p class="muted">{escape(counts)}. {escape(ci_note)}</p>',
                level=level,
            )
        )
    if tasks.get("segmentation"):
        unit = {"hd95": info.get("hd95_unit") or "mm"}
        counts = (
            f"{_count(metrics.get('n_tumour_slices'))} tumour slices of "
            f"{_count(metrics.get('n_mask_slices'))} with masks; lesions found "
            f"{_count(metrics.get('n_detected_lesions'))} of "
            f"{_count(metrics.get('n_ref_lesions'))}, false-positive components "
            f"{_count(metrics.get('n_fp_lesions'))}"
        )
        sections.append(
            html_section(
                "Segmentation (per slice)",
                html_table(
                    _metric_rows(metrics, SEGMENTATION_ROWS, unit), ["metric", "value", "95% CI"]
                ),
                f'<p class="muted">{escape(counts)}. {escape(ci_note)}</p>',
                level=level,
            )
        )
    plots = info.get("plots", {})
    figures = [
        html_image(folder / plots[key], title, caption=title, width=360)
        for key, title in PLOTS
        if key in plots and (folder / plots[key]).is_file()
    ]
    if figures:
        sections.append(html_section("Plots", *figures, level=level))
    examples = [
        html_image(
            folder / e["file"],
            e["sample_id"],
            caption=f"{e['category']}: {e['sample_id']}",
            width=240,
        )
        for e in info.get("examples", [])
        if (folder / e["file"]).is_file()
    ]
    if examples:
        sections.append(
            html_section(
                "Example cases",
                '<p class="muted">Green: reference tumour contour; red: '
                "predicted contour. TP/FP/FN/TN by the decision threshold (or, for a "
                "segmentation-only run, by whether each mask is empty).</p>",
                *examples,
                level=level,
            )
        )
    if brief:
        return sections
    sections.append(html_section("Errors", _top_errors(folder), level=level))
    sections.append(_provenance(info, data, ckpt, threshold, level))
    return sections


def _provenance(
    info: Mapping[str, Any],
    data: Mapping[str, Any],
    ckpt: Mapping[str, Any],
    threshold: Mapping[str, Any],
    level: int,
) -> str:
    versions = info.get("versions", {})
    trained = ckpt.get("training_manifests", [])
    return html_section(
        "Provenance",
        html_kv(
            {
                "evaluated at": info.get("created_at"),
                "checkpoint sha256": ckpt.get("sha256"),
                "config hash (sha256)": ckpt.get("config_hash"),
                "model / input size": f"{ckpt.get('model')} / {ckpt.get('image_size')} px",
                "initialised from": ckpt.get("init_from"),
                "evaluated manifest": data.get("manifest"),
                "manifest sha256": data.get("manifest_sha256"),
                "prepared for this evaluation": data.get("prepared_for_evaluation"),
                "input files sha256": data.get("input_files_sha256"),
                "same manifest as training": data.get("same_manifest_as_training"),
                "threshold": json.dumps(threshold),
                "settings": json.dumps(info.get("settings", {})),
            },
            caption="Evaluation",
        ),
        html_table(
            ([m.get("path"), m.get("sha256")] for m in trained), ["training manifest", "sha256"]
        )
        if trained
        else "",
        html_table(
            sorted(versions.items()),
            ["library", "version"],
            caption="Library versions (evaluation)",
        ),
        html_table(
            sorted(ckpt.get("trained_with", {}).items()),
            ["library", "version"],
            caption="Library versions (training)",
        )
        if ckpt.get("trained_with")
        else "",
        _counts_table(
            data.get("split_summary", {}),
            "Split summary of the evaluated manifest (slices per label, groups)",
        ),
        level=level,
    )


# --------------------------------------------------------------------------- run


def _curves_png(rows: list[dict[str, str]]) -> bytes | None:
    from lungcad.reports.figures import figure_bytes, new_figure

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]

    if not rows:
        return None
    epochs = series("epoch")
    keys = [
        k
        for k in ("val_dice", "val_dice_global", "val_mcc", "val_auc", "val_acc", "val_f1")
        if k in rows[0]
    ]
    fig = new_figure(8.5, 3.2)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        if key in rows[0]:
            loss_ax.plot(epochs, series(key), "o-", label=key)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize=8)
    for key in keys:
        metric_ax.plot(epochs, series(key), "o-", label=key)
    metric_ax.set_xlabel("epoch")
    metric_ax.set_title("validation metrics")
    if keys:
        metric_ax.legend(fontsize=8)
    return figure_bytes(fig)


def run_sections(folder: str | Path, *, level: int = 2) -> list[str]:
    """HTML sections of a training run folder."""
    folder = Path(folder)
    run = read_json_or_empty(folder / "run.json")
    threshold = read_json_or_empty(folder / "threshold.json")
    rows: list[dict[str, str]] = []
    if (folder / "metrics.csv").is_file():
        with (folder / "metrics.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    summary = {
        k: run.get(k)
        for k in (
            "stage",
            "status",
            "epochs_completed",
            "best_epoch",
            "monitor",
            "best_metric",
            "train_slices",
            "val_slices",
            "device",
            "world_size",
            "started_at",
            "finished_at",
            "init_from",
            "pretrained",
        )
        if k in run
    }
    if threshold:
        summary["decision threshold"] = (
            f"{format_value(threshold.get('threshold'))} "
            f"({threshold.get('method')}, chosen on "
            f"{threshold.get('chosen_on')}, epoch "
            f"{threshold.get('epoch')})"
        )
    curves = _curves_png(rows)
    sections = [html_section("Training run", html_kv(summary), level=level)]
    if curves:
        sections.append(
            html_section("Learning curves", html_image(curves, "learning curves"), level=level)
        )
    if rows:
        sections.append(
            html_section(
                "Per-epoch metrics",
                html_table(([_num(r[c]) for c in rows[0]] for r in rows), list(rows[0])),
                level=level,
            )
        )
    config = folder / "config.yaml"
    sections.append(
        html_section(
            "Provenance",
            html_kv(
                {
                    "config hash (sha256)": run.get("config_hash"),
                    "run folder": str(folder.resolve()),
                }
            ),
            html_table(
                ([m.get("path"), m.get("sha256")] for m in run.get("manifests", [])),
                ["training manifest", "sha256"],
            )
            if run.get("manifests")
            else "",
            html_table(
                sorted(run.get("versions", {}).items()),
                ["library", "version"],
                caption="Library versions",
            )
            if run.get("versions")
            else "",
            f"<h{level + 1}>config.yaml</h{level + 1}>"
            + html_pre(config.read_text(encoding="utf-8"))
            if config.is_file()
            else "",
            level=level,
        )
    )
    return sections


def _num(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------- validation


def validation_sections(folder: str | Path) -> list[str]:
    """HTML sections of a ``lungcad validate`` folder."""
    from lungcad.validation.gap import DROP_DEFINITION, read_gap

    folder = Path(folder)
    info = read_json_or_empty(folder / "validation.json")
    sections = []
    gap_json = folder / "gap.json"
    if gap_json.is_file():
        table = read_gap(gap_json)
        parts = [
            html_table(table.cells(), table.header()),
            f'<p class="muted">{escape(DROP_DEFINITION)}. Deep model: threshold from '
            "its validation split; baselines: threshold from out-of-fold training "
            "predictions. Nothing is tuned on the internal or external sets.</p>",
        ]
        if (folder / "gap.png").is_file():
            parts.append(html_image(folder / "gap.png", "generalisation gap"))
        sections.append(html_section("Generalisation gap", *parts))
    for set_name, sub in info.get("evaluations", {}).items():
        path = folder / sub
        if (path / EVALUATION_FILE).is_file():
            sections.append(
                html_section(
                    f"Deep model on '{set_name}'", *evaluation_sections(path, brief=True, level=3)
                )
            )
    baselines = folder / "baselines" / "metrics.md"
    if baselines.is_file():
        sections.append(
            html_section("Baselines (all sets)", html_pre(baselines.read_text(encoding="utf-8")))
        )
    for stage, sub in info.get("runs", {}).items():
        path = folder / sub
        if path.is_dir():
            sections.append(html_section(f"Training run: {stage}", *run_sections(path, level=3)))
    sections.append(
        html_section(
            "Provenance",
            html_kv({k: v for k, v in info.items() if k not in ("evaluations", "runs")}),
        )
    )
    return sections


# --------------------------------------------------------------------------- entry points


def build_report(folder: str | Path) -> str:
    """The HTML page for a run, evaluation or validation folder (see the module docs)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind == "evaluation":
        info = read_json_or_empty(folder / EVALUATION_FILE)
        data = info.get("data", {})
        return html_page(
            "lungcad evaluation",
            evaluation_sections(folder),
            subtitle=f"{info.get('checkpoint', {}).get('run_dir')} on "
            f"{data.get('input')} (split {data.get('split')})",
        )
    if kind == "validation":
        info = read_json_or_empty(folder / "validation.json")
        return html_page(
            "lungcad external validation",
            validation_sections(folder),
            subtitle=f"trained on {info.get('train_manifest')}; external: "
            f"{', '.join(info.get('externals', {}))}",
        )
    return html_page("lungcad training run", run_sections(folder), subtitle=str(folder))


def write_report(folder: str | Path, out: str | Path) -> Path:
    """Render :func:`build_report` to ``out`` (atomically) and return ``out``."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError("report file must end in .html", out)
    return write_text_atomic(out, build_report(folder))
