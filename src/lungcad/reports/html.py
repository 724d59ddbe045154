"""Self-contained HTML pages: inline CSS, escaped text, tables, PNGs embedded as base64.

No lungcad specifics, so the run, evaluation and validation reports
(:mod:`lungcad.validation.report`) and the study report (:mod:`lungcad.inference.study_report`)
share one look. Every value put into a page goes through :func:`escape`; pages reference no
external resources, so a file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lungcad import __version__
from lungcad.provenance import utc_now

#: The stylesheet of every page, inlined into ``<style>``.
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:70rem;
color:#212121;line-height:1.4;padding:0 1rem}
h1{border-bottom:2px solid #1976d2;padding-bottom:.3rem}
h2{margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f6f9}
td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2rem 0}
figure{display:inline-block;margin:.4rem .8rem .8rem 0;vertical-align:top}
figcaption{font-size:.8rem;color:#555}
pre{background:#f6f8fa;padding:.7rem;overflow-x:auto;font-size:.8rem}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.4rem .8rem;margin:.5rem 0}
.muted{color:#666;font-size:.85rem}
"""


def escape(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def format_value(value: Any, digits: int = 3) -> str:
    """Floats to ``digits`` decimals (tiny ones in e-notation, NaN/None as "n/a"), booleans
    as yes/no, others as text."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        # Tiny values (learning rates) would all read 0.000.
        return f"{value:.2e}" if 0 < abs(value) < 10**-digits else f"{value:.{digits}f}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def html_table(
    rows: Iterable[Sequence[Any]],
    header: Sequence[str] | None = None,
    *,
    caption: str | None = None,
    digits: int = 3,
) -> str:
    """A table; numbers are right-aligned and formatted with :func:`format_value`.

    Args:
        rows: cell values per row (strings are escaped; numbers formatted).
        header: column titles.
        caption: table caption.
        digits: decimals for floats.
    """
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{escape(caption)}</caption>")
    if header:
        parts.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{escape(format_value(value, digits))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def html_kv(mapping: Mapping[str, Any], *, caption: str | None = None) -> str:
    """A two-column key/value table (nested values shown as JSON)."""
    return html_table(([k, v] for k, v in mapping.items()), caption=caption)


def html_pre(text: str) -> str:
    """Preformatted, escaped text (configs, logs)."""
    return f"<pre>{escape(text)}</pre>"


def html_note(text: str) -> str:
    """A highlighted note."""
    return f'<div class="note">{escape(text)}</div>'


def html_image(
    source: str | Path | bytes, alt: str, *, caption: str | None = None, width: int | None = None
) -> str:
    """A PNG embedded as a base64 data URI inside a ``<figure>``.

    Args:
        source: a PNG file or PNG bytes.
        alt: alternative text.
        caption: figure caption (default: none).
        width: display width in CSS pixels (default: the image's own).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    size = f' width="{int(width)}"' if width else ""
    img = f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}"{size}>'
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{img}{cap}</figure>"


def html_section(title: str, *parts: str, level: int = 2, anchor: str | None = None) -> str:
    """A heading followed by already-rendered HTML parts."""
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return (
        f"<section{ident}><h{level}>{escape(title)}</h{level}>\n"
        + "\n".join(p for p in parts if p)
        + "\n</section>"
    )


def html_page(title: str, body: Iterable[str], *, subtitle: str | None = None) -> str:
    """A complete, self-contained HTML document (inline CSS, no external resources)."""
    stamp = utc_now().strftime("%Y-%m-%d %H:%M UTC")
    sub = f'<p class="muted">{escape(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{sub}\n"
        + "\n".join(body)
        + f'\n<p class="muted">Generated by lungcad {escape(__version__)} on {stamp}. '
        "Research software: not a medical device; results need review by a radiologist.</p>"
        "\n</body>\n</html>\n"
    )
