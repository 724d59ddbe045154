"""Atomic writes leave either the complete new output or the old one, never half a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.io.atomic import atomic_dir, atomic_path, write_text_atomic


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    write_text_atomic(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_suffix_for_libraries(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a" / "img.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "a" / "img.nii.gz").read_bytes() == b"x"


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "cohort"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(dest) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError("bad input")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]
    with atomic_dir(dest) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["c.txt"]


def test_atomic_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
