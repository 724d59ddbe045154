"""``lungcad report``: one self-contained HTML page for a run, evaluation or validation folder.

Images are embedded (base64), so the page can be archived or mailed on its own.
"""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "render a run, evaluation or validation folder as a self-contained HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad report``."""
    parser.add_argument(
        "folder",
        metavar="RUN_OR_EVAL_DIR",
        help="folder written by lungcad train, evaluate or validate",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE.html",
        help="HTML file to write (default: FOLDER/report.html)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path; 0 on success."""
    from pathlib import Path

    from lungcad.validation.report import folder_kind, write_report

    kind = folder_kind(args.folder)
    out = Path(args.out) if args.out else Path(args.folder) / "report.html"
    write_report(args.folder, out)
    print(f"wrote {kind} report {out}")
    return 0
