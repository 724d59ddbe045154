"""A one-file HTML report of a study's prediction, readable offline and safe to e-mail.

Everything is inside the file: pictures as base64 ``data:`` URIs, styles inline, no scripts
and no external links. Every value from the findings is HTML-escaped. The report leads with
the intended-use statement, because a probability without it invites over-reading.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lungcad.io.atomic import write_text_atomic

__all__ = ["render_study_report", "write_study_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;max-width:70em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f2f2f2}td.l,th.l{text-align:left}
.warn{background:#fff4e5;border:1px solid #f0a040;padding:.6em 1em}
.decision{font-size:1.3em;font-weight:bold}.pos{color:#b00020}.neg{color:#1b5e20}
img{max-width:100%;border:1px solid #999;margin:.3em 0}
figure{display:inline-block;margin:.3em}figcaption{font-size:.85em;color:#555}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_num(v, 1) for v in value) + ")"
    return _e(value)


def _img(name: str, data: bytes, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_num(v)}</td></tr>'
                   for k, v in pairs)


def _lesion_table(lesions: list[dict[str, Any]]) -> str:
    if not lesions:
        return "<p>No tumour region was segmented.</p>"
    head = ("<tr><th>#</th><th>volume (mL)</th><th>longest axial diameter (mm)</th>"
            "<th>slices</th><th>centroid LPS (mm)</th><th>mean HU</th>"
            "<th>max probability</th></tr>")
    body = "".join(
        f"<tr><td>{_e(les['id'])}</td><td>{_num(les['volume_ml'])}</td>"
        f"<td>{_num(les['longest_axial_diameter_mm'], 1)}</td>"
        f"<td>{_e(les['slice_range'][0])}-{_e(les['slice_range'][1])}</td>"
        f"<td>{_num(les['centroid_lps_mm'])}</td><td>{_num(les.get('mean_hu'), 0)}</td>"
        f"<td>{_num(les.get('max_probability'))}</td></tr>"
        for les in lesions
    )
    return f"<table>{head}{body}</table>"


def _slice_table(slices: dict[str, Any]) -> str:
    probs = slices.get("probabilities", [])
    ranked = sorted(((p, z) for z, p in enumerate(probs) if p is not None), reverse=True)[:10]
    if not ranked:
        return "<p>No slice was evaluated.</p>"
    body = "".join(f"<tr><td>{z}</td><td>{p:.3f}</td></tr>" for p, z in ranked)
    return (f"<p>{len(slices.get('evaluated', []))} of {len(probs)} slices evaluated "
            "(slices without lung are skipped). Highest slice probabilities:</p>"
            f"<table><tr><th>slice</th><th>probability</th></tr>{body}</table>")


def render_study_report(findings: Mapping[str, Any], pictures: Mapping[str, bytes]) -> str:
    """The HTML text of a study report.

    Args:
        findings: the findings.json document (``study_outputs.findings``).
        pictures: PNG name -> bytes (``preview.png``, ``cam_zNNNN.png``), embedded as base64.

    Returns:
        A complete, self-contained HTML document.
    """
    study, model, source = findings["study"], findings["model"], findings["input"]
    positive = bool(study["is_cancer"])
    decision = (f'<p class="decision {"pos" if positive else "neg"}">{_e(study["decision"])}'
                f" (probability {study['probability']:.3f}, threshold "
                f"{study['threshold']:.3f})</p>")
    warnings = "".join(f"<li>{_e(w)}</li>" for w in findings.get("warnings", []))
    figures = "".join(
        _img(name, data, "Slices with the most predicted tumour (red)" if name == "preview.png"
             else f"Grad-CAM, slice {name[5:9].lstrip('0') or '0'}: where the classifier "
                  "looked (left: slice, right: heat map)")
        for name, data in pictures.items()
    )
    study_rows = _rows([
        ("study probability of cancer", study["probability"]),
        ("decision threshold", study["threshold"]),
        ("aggregation", f"{study['aggregation'].get('method')}, k="
                        f"{study['aggregation'].get('k')}"),
        ("calibrated", "yes" if study["calibrated"] else "no"),
        ("lesions", study["n_lesions"]),
        ("total tumour volume (mL)", study["tumour_volume_ml"]),
    ])
    input_rows = _rows([
        ("file", source.get("path")), ("format", source.get("format")),
        ("shape (z, y, x)", source.get("shape_zyx")),
        ("spacing (z, y, x) mm", source.get("spacing_zyx_mm")
         if source.get("spacing_known", True) else "unknown (2D image)"),
        ("input SHA-256", source.get("input_sha256")),
        ("study UID", source.get("study_instance_uid")),
    ])
    model_rows = _rows([
        ("model", model.get("model_name")), ("input size", model.get("image_size")),
        ("checkpoint SHA-256", model.get("checkpoint_sha256")),
        ("config hash", model.get("config_hash")),
        ("threshold source", model.get("threshold_source")),
        ("preprocessing", model.get("preprocessing")),
        ("lungcad version", findings.get("lungcad_version")),
        ("backend", model.get("backend")),
    ])
    timing = ", ".join(f"{_e(k)} {v:.2f}" for k, v in findings.get("timings_s", {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lungcad study report</title><style>{_STYLE}</style></head>
<body>
<h1>lungcad study report</h1>
<div class="warn"><strong>Intended use.</strong> {_e(findings.get("intended_use"))}</div>
<h2>Result</h2>
{decision}
<table>{study_rows}</table>
{f"<p>Notes:</p><ul>{warnings}</ul>" if warnings else ""}
<h2>Lesions</h2>
{_lesion_table(findings.get("lesions", []))}
<h2>Images</h2>
{figures or "<p>No pictures.</p>"}
<h2>Slices</h2>
{_slice_table(findings.get("slices", {}))}
<h2>Input</h2>
<table>{input_rows}</table>
<h2>Model</h2>
<table>{model_rows}</table>
<p>Created {_e(findings.get("created_utc"))} (UTC). Timings (s): {timing}.</p>
</body></html>
"""


def write_study_report(path: str | Path, findings: Mapping[str, Any],
                       pictures: Mapping[str, bytes]) -> Path:
    """Render the report and write it to ``path`` atomically (UTF-8)."""
    return write_text_atomic(path, render_study_report(findings, pictures))
