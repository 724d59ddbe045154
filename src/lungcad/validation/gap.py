"""The generalisation-gap table: each model on its training data, internally and externally.

A model that scores well on its own hospital's held-out patients can still fail on another
hospital's scanners. The table puts, for every model (the deep model and each traditional-ML
baseline), the same metrics side by side on the ``train`` data (how well it fits),
the ``internal`` test split (unseen patients, same site) and each ``external`` set (another
site), plus the **drop** from internal to external: ``drop = internal - external``, so a
positive drop means the model is worse at the other site.

Input is plain metric dicts, ``{model: {set: {metric: value}}}`` (as written by
``lungcad evaluate`` and ``lungcad.validation.baselines.pipelines.run_baselines``); output is
Markdown, JSON and a grouped bar chart (PNG).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungcad.errors import InputError
from lungcad.io.atomic import write_text_atomic

GAP_METRICS = ("accuracy", "f1", "mcc", "kappa", "dice")
METRIC_LABELS = {
    "accuracy": "Acc",
    "f1": "F1",
    "mcc": "MCC",
    "kappa": "Kappa",
    "dice": "Dice",
    "auc": "AUC",
    "sensitivity": "Sens",
    "specificity": "Spec",
}
TRAIN_SET, REFERENCE_SET = "train", "internal"
DROP_DEFINITION = "drop = internal - external (positive: worse on the external set)"
MISSING = "n/a"


@dataclass(frozen=True)
class GapTable:
    """Metrics of several models on several sets.

    Attributes:
        models: row order.
        sets: column-group order, e.g. ``("train", "internal", "external")``.
        metrics: metric keys shown (a metric no model has is dropped).
        values: ``{model: {set: {metric: value}}}``; NaN where unknown (e.g. Dice of a
            classifier-only baseline).
        reference: the set the drops are measured from ("internal").
    """

    models: tuple[str, ...]
    sets: tuple[str, ...]
    metrics: tuple[str, ...]
    values: Mapping[str, Mapping[str, Mapping[str, float]]]
    reference: str = REFERENCE_SET

    @property
    def drop_sets(self) -> tuple[str, ...]:
        """The sets a drop is reported for: all but ``train`` and the reference."""
        return tuple(s for s in self.sets if s not in (TRAIN_SET, self.reference))

    def value(self, model: str, set_name: str, metric: str) -> float:
        """The metric of a model on a set (NaN when unknown)."""
        return float(self.values.get(model, {}).get(set_name, {}).get(metric, math.nan))

    def drop(self, model: str, set_name: str, metric: str) -> float:
        """``reference - set_name`` value of the metric (NaN when either is unknown)."""
        return self.value(model, self.reference, metric) - self.value(model, set_name, metric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings plus one entry per model with values and drops."""
        rows = []
        for model in self.models:
            row: dict[str, Any] = {"model": model}
            for set_name in self.sets:
                row[set_name] = {m: _none(self.value(model, set_name, m)) for m in self.metrics}
            row["drop"] = {
                s: {m: _none(self.drop(model, s, m)) for m in self.metrics} for s in self.drop_sets
            }
            rows.append(row)
        return {
            "reference": self.reference,
            "sets": list(self.sets),
            "metrics": list(self.metrics),
            "drop_definition": DROP_DEFINITION,
            "rows": rows,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented strict JSON (NaN as null)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def header(self) -> list[str]:
        """Column titles: Model, then ``<Metric> <set>`` per set, then ``<Metric> drop
        (<set>)`` per external set."""
        cols = ["Model"]
        cols += [f"{label(m)} {s}" for s in self.sets for m in self.metrics]
        cols += [f"{label(m)} drop ({s})" for s in self.drop_sets for m in self.metrics]
        return cols

    def cells(self) -> list[list[str]]:
        """One row of formatted cells per model, matching :meth:`header`."""
        rows = []
        for model in self.models:
            row = [model]
            row += [_fmt(self.value(model, s, m)) for s in self.sets for m in self.metrics]
            row += [
                _fmt(self.drop(model, s, m), signed=True)
                for s in self.drop_sets
                for m in self.metrics
            ]
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """A Markdown table (rows = models), followed by the definition of the drop."""
        header = self.header()
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.cells()]
        return "\n".join(lines) + f"\n\n{DROP_DEFINITION}; {MISSING}: not applicable.\n"


def label(metric: str) -> str:
    """Short column label of a metric key (``"accuracy"`` -> ``"Acc"``)."""
    return METRIC_LABELS.get(metric, metric)


def _none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return MISSING
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def gap_table(
    results: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    *,
    sets: Sequence[str] | None = None,
    metrics: Sequence[str] = GAP_METRICS,
    reference: str = REFERENCE_SET,
) -> GapTable:
    """Build the gap table from ``{model: {set: metrics}}``.

    Args:
        results: per model and set, a flat metrics dict (``None``/missing -> NaN).
        sets: column groups in order; default ``train``, ``internal``, then every other set
            found, in first-seen order.
        metrics: metric keys, in order; metrics no model has on any set are left out.
        reference: the set drops are measured from.

    Returns:
        The :class:`GapTable`.

    Raises:
        InputError: no models, or ``reference`` not among the sets.
    """
    if not results:
        raise InputError("no results to tabulate; pass {model: {set: metrics}}", "results")
    if sets is None:
        found: list[str] = []
        for per_set in results.values():
            found += [s for s in per_set if s not in found]
        head = [s for s in (TRAIN_SET, reference) if s in found]
        sets = head + [s for s in found if s not in head]
    if reference not in sets:
        raise InputError(
            f"reference set {reference!r} is not among the sets {list(sets)}", "reference"
        )
    values = {
        model: {s: {m: _float(per_set.get(s, {}).get(m)) for m in metrics} for s in sets}
        for model, per_set in results.items()
    }
    shown = tuple(
        m
        for m in metrics
        if any(math.isfinite(values[model][s][m]) for model in values for s in sets)
    )
    return GapTable(
        models=tuple(results), sets=tuple(sets), metrics=shown, values=values, reference=reference
    )


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def plot_gap(table: GapTable, path: str | Path) -> Path:
    """Grouped bar chart: one panel per metric, models on the x axis, one bar per set."""
    import numpy as np

    from lungcad.reports.figures import new_figure, save_figure

    n_panels = max(1, len(table.metrics))
    fig = new_figure(
        max(4.0, 0.9 * len(table.models) + 1.5) * min(n_panels, 3), 3.4 * math.ceil(n_panels / 3)
    )
    x = np.arange(len(table.models))
    width = 0.8 / max(1, len(table.sets))
    colours = ["#90a4ae", "#1976d2", "#e64a19", "#7b1fa2", "#388e3c", "#fbc02d"]
    for k, metric in enumerate(table.metrics):
        ax = fig.add_subplot(math.ceil(n_panels / 3), min(n_panels, 3), k + 1)
        for j, set_name in enumerate(table.sets):
            heights = [table.value(model, set_name, metric) for model in table.models]
            ax.bar(
                x + (j - (len(table.sets) - 1) / 2) * width,
                [h if math.isfinite(h) else 0.0 for h in heights],
                width,
                label=set_name,
                color=colours[j % len(colours)],
            )
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, table.models, rotation=30, ha="right", fontsize=8)
        shown = [table.value(mo, s, metric) for mo in table.models for s in table.sets]
        ax.set_ylim(min([0.0, *(v for v in shown if math.isfinite(v))]) - 0.05, 1.05)
        ax.set_title(label(metric))
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Generalisation gap: train vs internal vs external", fontsize=10)
    return save_figure(fig, path)


def write_gap(table: GapTable, out_dir: str | Path, stem: str = "gap") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    title = "# Generalisation gap\n\n"
    return {
        "markdown": write_text_atomic(out_dir / f"{stem}.md", title + table.to_markdown()),
        "json": write_text_atomic(out_dir / f"{stem}.json", table.to_json()),
        "plot": plot_gap(table, out_dir / f"{stem}.png"),
    }


def read_gap(path: str | Path) -> GapTable:
    """Rebuild a :class:`GapTable` from its ``gap.json``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = {row["model"]: {s: row[s] for s in data["sets"]} for row in data["rows"]}
    return gap_table(
        results, sets=data["sets"], metrics=data["metrics"], reference=data["reference"]
    )
