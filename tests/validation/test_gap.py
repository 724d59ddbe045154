"""The generalisation-gap table: exact Markdown/JSON from known metric dicts, and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lungcad.errors import InputError
from lungcad.validation.gap import gap_table, read_gap, write_gap

RESULTS = {
    "deep (resnet18)": {
        "train": {"accuracy": 0.98, "f1": 0.97, "mcc": 0.96, "kappa": 0.95, "dice": 0.81},
        "internal": {"accuracy": 0.9, "f1": 0.88, "mcc": 0.8, "kappa": 0.79, "dice": 0.7},
        "external": {"accuracy": 0.75, "f1": 0.7, "mcc": 0.5, "kappa": 0.45, "dice": 0.52},
    },
    "logreg": {
        "train": {"accuracy": 0.8, "f1": 0.78, "mcc": 0.6, "kappa": 0.6, "auc": 0.9},
        "internal": {"accuracy": 0.7, "f1": 0.65, "mcc": 0.4, "kappa": 0.38},
        "external": {"accuracy": 0.55, "f1": float("nan"), "mcc": 0.05, "kappa": 0.0},
    },
}

EXPECTED_MARKDOWN = (
    "| Model | Acc train | F1 train | MCC train | Kappa train | Dice train | Acc internal "
    "| F1 internal | MCC internal | Kappa internal | Dice internal | Acc external "
    "| F1 external | MCC external | Kappa external | Dice external | Acc drop (external) "
    "| F1 drop (external) | MCC drop (external) | Kappa drop (external) "
    "| Dice drop (external) |\n"
    "|---|" + "---:|" * 20 + "\n"
    "| deep (resnet18) | 0.980 | 0.970 | 0.960 | 0.950 | 0.810 | 0.900 | 0.880 | 0.800 "
    "| 0.790 | 0.700 | 0.750 | 0.700 | 0.500 | 0.450 | 0.520 | +0.150 | +0.180 | +0.300 "
    "| +0.340 | +0.180 |\n"
    "| logreg | 0.800 | 0.780 | 0.600 | 0.600 | n/a | 0.700 | 0.650 | 0.400 | 0.380 | n/a "
    "| 0.550 | n/a | 0.050 | 0.000 | n/a | +0.150 | n/a | +0.350 | +0.380 | n/a |\n"
    "\ndrop = internal - external (positive: worse on the external set); n/a: not applicable.\n"
)


def test_markdown_is_exact() -> None:
    table = gap_table(RESULTS)
    assert table.sets == ("train", "internal", "external")
    assert table.metrics == ("accuracy", "f1", "mcc", "kappa", "dice")
    assert table.to_markdown() == EXPECTED_MARKDOWN


def test_json_is_exact() -> None:
    data = json.loads(gap_table(RESULTS).to_json())
    assert data["reference"] == "internal"
    assert data["sets"] == ["train", "internal", "external"]
    deep, logreg = data["rows"]
    assert deep["model"] == "deep (resnet18)"
    assert deep["internal"] == RESULTS["deep (resnet18)"]["internal"]
    assert deep["drop"]["external"] == pytest.approx(
        {"accuracy": 0.15, "f1": 0.18, "mcc": 0.3, "kappa": 0.34, "dice": 0.18}
    )
    # Missing and NaN values are null (strict JSON), never 0.
    assert logreg["train"]["dice"] is None and logreg["external"]["f1"] is None
    assert logreg["drop"]["external"]["f1"] is None
    assert logreg["drop"]["external"]["kappa"] == pytest.approx(0.38)
    assert "auc" not in logreg["train"]  # only the requested metrics


def test_sets_order_metrics_and_several_externals() -> None:
    results = {
        "m": {"siteC": {"accuracy": 0.5}, "internal": {"accuracy": 0.9}, "siteB": {"accuracy": 0.6}}
    }
    table = gap_table(results)
    assert table.sets == ("internal", "siteC", "siteB")  # reference first, then first seen
    assert table.metrics == ("accuracy",)  # metrics nobody has are dropped
    assert table.drop_sets == ("siteC", "siteB")
    assert table.drop("m", "siteB", "accuracy") == pytest.approx(0.3)
    assert math.isnan(table.value("m", "train", "accuracy"))
    assert table.header() == [
        "Model",
        "Acc internal",
        "Acc siteC",
        "Acc siteB",
        "Acc drop (siteC)",
        "Acc drop (siteB)",
    ]


def test_bad_input() -> None:
    with pytest.raises(InputError, match="no results"):
        gap_table({})
    with pytest.raises(InputError, match="reference set"):
        gap_table(RESULTS, sets=["train", "external"])


def test_write_and_read_back(tmp_path: Path) -> None:
    table = gap_table(RESULTS)
    paths = write_gap(table, tmp_path)
    assert paths["markdown"].read_text().endswith(EXPECTED_MARKDOWN)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = read_gap(paths["json"])
    assert again.to_markdown() == EXPECTED_MARKDOWN
