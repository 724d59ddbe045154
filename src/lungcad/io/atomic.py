"""Atomic writes: nothing is ever half-written.

Writers produce their output under a temporary name in the destination folder and rename it
into place only when complete (a rename within one file system is atomic on POSIX). A failure
or interruption leaves the old file (or no file), never a truncated one.

JSON documents are written with :func:`write_json_atomic`: indented, strict JSON (NaN and
infinities become ``null``, which other tools accept), one writer for every module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` if the block succeeds.

    Args:
        dest: final file path. Its parent folder is created if needed.
        suffix: suffix for the temporary file (defaults to dest's full suffix, e.g. ".nii.gz",
            so libraries that dispatch on the extension still work).

    Yields:
        The temporary path to write to. On an exception it is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions an ordinary open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; move it to ``dest`` if the block succeeds.

    An existing ``dest`` is replaced only after the new folder is complete.

    Args:
        dest: final folder path.

    Yields:
        The temporary folder to fill. On an exception it is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(dest: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``dest`` atomically and return ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def json_safe(value: Any) -> Any:
    """``value`` as strict-JSON-ready Python: NaN/inf -> None, numpy scalars -> Python,
    tuples -> lists, Paths -> str, mapping keys -> str (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value: Any) -> str:
    """Indented strict JSON of ``value`` (see :func:`json_safe`), with a final newline."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def write_json_atomic(dest: str | Path, value: Any) -> Path:
    """Write ``value`` as :func:`to_json` text to ``dest`` atomically and return ``dest``."""
    return write_text_atomic(dest, to_json(value))
