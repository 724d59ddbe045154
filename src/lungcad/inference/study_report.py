"""A one-file HTML report of a study's prediction, readable offline and safe to e-mail.

Everything is inside the file: pictures as base64 ``data:`` URIs, styles inline, no scripts
and no external links. Every value from the findings is HTML-escaped. The report leads with
the intended-use statement, because a probability without it invites over-reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lungcad.io.atomic import write_text_atomic
from lungcad.reports.html import (
    escape,
    html_image,
    html_kv,
    html_note,
    html_page,
    html_section,
    html_table,
)

__all__ = ["render_study_report", "write_study_report"]

#: The decision line, coloured by the decision (the page's CSS is the shared report CSS).
_DECISION_STYLE = "font-size:1.3em;font-weight:bold;color:{}"
_POSITIVE, _NEGATIVE, _UNDECIDED = "#b00020", "#1b5e20", "#5f6368"


def _num(value: Any, digits: int = 3) -> str:
    """A findings value as text: floats to ``digits`` decimals, coordinates as ``(x, y, z)``
    with one decimal, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_num(v, 1) for v in value) + ")"
    return str(value)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    # Values are formatted here (as text), so html_kv shows them as they are, escaped.
    return html_kv({key: _num(value) for key, value in pairs})


def _lesion_table(lesions: list[dict[str, Any]]) -> str:
    if not lesions:
        return "<p>No tumour region was segmented.</p>"
    header = [
        "#",
        "volume (mL)",
        "longest axial diameter (mm)",
        "slices",
        "centroid LPS (mm)",
        "mean HU",
        "max probability",
    ]
    rows = (
        [
            les["id"],
            _num(les["volume_ml"]),
            _num(les["longest_axial_diameter_mm"], 1),
            f"{les['slice_range'][0]}-{les['slice_range'][1]}",
            _num(les["centroid_lps_mm"]),
            _num(les.get("mean_hu"), 0),
            _num(les.get("max_probability")),
        ]
        for les in lesions
    )
    return html_table(rows, header)


def _slice_table(slices: dict[str, Any]) -> str:
    probs = slices.get("probabilities", [])
    ranked = sorted(((p, z) for z, p in enumerate(probs) if p is not None), reverse=True)[:10]
    if not ranked:
        return "<p>No slice was evaluated.</p>"
    return (
        f"<p>{len(slices.get('evaluated', []))} of {len(probs)} slices evaluated "
        "(slices without lung are skipped). Highest slice probabilities:</p>"
        + html_table(([z, f"{p:.3f}"] for p, z in ranked), ["slice", "probability"])
    )


def _caption(name: str) -> str:
    if name == "preview.png":
        return "Slices with the most predicted tumour (red)"
    return (
        f"Grad-CAM, slice {name[5:9].lstrip('0') or '0'}: where the classifier looked "
        "(left: slice, right: heat map)"
    )


def render_study_report(findings: Mapping[str, Any], pictures: Mapping[str, bytes]) -> str:
    """The HTML text of a study report.

    Built from the shared helpers of :mod:`lungcad.reports.html` (page, sections, tables,
    embedded images), so study and evaluation reports look alike.

    Args:
        findings: the findings.json document (``study_outputs.findings``).
        pictures: PNG name -> bytes (``preview.png``, ``cam_zNNNN.png``), embedded as base64.

    Returns:
        A complete, self-contained HTML document.
    """
    study, model, source = findings["study"], findings["model"], findings["input"]
    if study.get("probability") is not None and study.get("threshold") is not None:
        colour = _POSITIVE if study["is_cancer"] else _NEGATIVE
        decision = (
            f'<p style="{_DECISION_STYLE.format(colour)}">{escape(study["decision"])}'
            f" (probability {study['probability']:.3f}, threshold "
            f"{study['threshold']:.3f})</p>"
        )
    else:  # no decision: say why, in neither colour of a decision
        decision = (
            f'<p style="{_DECISION_STYLE.format(_UNDECIDED)}">{escape(study["decision"])}: '
            f"{escape(study.get('reason') or '')}</p><p>No cancer probability is reported.</p>"
        )
    check = findings.get("input_check") or {}
    if check.get("single_slice"):
        decision += (
            f"<p>Single-slice decision: fewer than {check.get('min_study_slices')} slices, so "
            "this is the decision of the slice(s) given, not of a whole study.</p>"
        )
    warnings = "".join(f"<li>{escape(w)}</li>" for w in findings.get("warnings", []))
    figures = "".join(
        html_image(data, name, caption=_caption(name)) for name, data in pictures.items()
    )
    study_rows = _rows(
        [
            ("study probability of cancer", study["probability"]),
            ("decision threshold", study["threshold"]),
            (
                "aggregation",
                f"{study['aggregation'].get('method')}, k={study['aggregation'].get('k')}",
            ),
            ("calibrated", "yes" if study["calibrated"] else "no"),
            ("lesions", study["n_lesions"]),
            ("total tumour volume (mL)", study["tumour_volume_ml"]),
        ]
    )
    input_rows = _rows(
        [
            ("format", source.get("format")),
            ("shape (z, y, x)", source.get("shape_zyx")),
            (
                "spacing (z, y, x) mm",
                source.get("spacing_zyx_mm")
                if source.get("spacing_known", True)
                else "unknown (2D image)",
            ),
            ("input SHA-256", source.get("input_sha256")),
            ("study UID", source.get("study_instance_uid")),
        ]
    )
    check_rows = _rows(
        [
            ("status", check.get("status")),
            ("reason", check.get("reason")),
            ("lung area on the best slice (mm^2)", check.get("lung_area_mm2")),
            ("slices with lung", check.get("lung_slices")),
            ("value range (1st-99th percentile)", check.get("value_range")),
        ]
    )
    model_rows = _rows(
        [
            ("model", model.get("model_name")),
            ("input size", model.get("image_size")),
            ("checkpoint SHA-256", model.get("checkpoint_sha256")),
            ("config hash", model.get("config_hash")),
            ("threshold source", model.get("threshold_source")),
            ("preprocessing", model.get("preprocessing")),
            ("lungcad version", findings.get("lungcad_version")),
            ("backend", model.get("backend")),
        ]
    )
    timing = ", ".join(f"{escape(k)} {v:.2f}" for k, v in findings.get("timings_s", {}).items())
    intended_use = findings.get("intended_use") or ""
    body = [
        html_note(f"Intended use. {intended_use}"),
        html_section(
            "Result", decision, study_rows, f"<p>Notes:</p><ul>{warnings}</ul>" if warnings else ""
        ),
        html_section("Lesions", _lesion_table(findings.get("lesions", []))),
        html_section("Images", figures or "<p>No pictures.</p>"),
        html_section("Slices", _slice_table(findings.get("slices", {}))),
        html_section("Input", input_rows),
        html_section("Input checks", check_rows) if check else "",
        html_section("Model", model_rows),
        f"<p>Created {escape(findings.get('created_utc') or '')} (UTC). Timings (s): {timing}.</p>",
    ]
    return html_page("lungcad study report", body)


def write_study_report(
    path: str | Path, findings: Mapping[str, Any], pictures: Mapping[str, bytes]
) -> Path:
    """Render the report and write it to ``path`` atomically (UTF-8)."""
    return write_text_atomic(path, render_study_report(findings, pictures))
