"""Output folders and small JSON files: the checks every command makes before it writes.

Commands write into a folder the user names with ``--out``. They may replace an earlier output
of the same command (recognised by its marker file) but never a folder holding anything else,
so a typo cannot wipe a data set.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lungcad.errors import InputError


def check_output_dir(out: str | Path, marker: str | None, what: str = "output") -> Path:
    """Refuse an output folder that holds something other than an earlier output.

    Args:
        out: the output folder.
        marker: the file that identifies an earlier output of the same command (e.g.
            ``evaluation.json``), or None when no earlier output may be replaced (the folder
            must be new or empty).
        what: how the refusal names an earlier output ("an evaluation", "a prepared dataset").

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: ``out`` is a file, or a non-empty folder without ``marker``.
    """
    out = Path(out)
    if not out.exists():
        return out
    if out.is_dir() and not any(out.iterdir()):
        return out
    if marker is not None and out.is_dir() and (out / marker).is_file():
        return out
    if marker is None:
        raise InputError("output exists and is not empty; choose a new or empty --out folder", out)
    raise InputError(
        f"output exists and is not {what} (no {marker}); refusing to replace it. "
        "Choose a new or empty --out folder",
        out,
    )


def read_json_or_empty(path: str | Path) -> Any:
    """The JSON document in ``path``, or ``{}`` when there is no such file.

    Used for optional side files of a run or output folder (``threshold.json``, ``run.json``);
    a file that exists but is not valid JSON still raises (it is damaged, not absent).
    """
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextmanager
def removed_on_failure(out: Path) -> Iterator[Path]:
    """Create ``out`` (new or empty, as :func:`check_output_dir` with no marker allows) and, if
    the body raises or is interrupted, leave it as it was found: a new folder is removed, an
    empty one is emptied. Nothing half-written stays behind.

    Yields:
        ``out``, now an existing folder.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
