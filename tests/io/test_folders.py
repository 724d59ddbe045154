"""Tests for lungcad.io.folders: output-folder checks and optional JSON side files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.errors import InputError
from lungcad.io.folders import check_output_dir, read_json_or_empty


def test_new_empty_and_earlier_outputs_are_accepted(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new", "marker.json") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "marker.json") == tmp_path / "empty"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "marker.json").write_text("{}")
    (earlier / "other.png").write_bytes(b"x")
    assert check_output_dir(earlier, "marker.json", "an evaluation") == earlier


def test_foreign_folders_and_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="is not an evaluation \\(no marker.json\\)") as info:
        check_output_dir(foreign, "marker.json", "an evaluation")
    assert str(foreign) in str(info.value)
    with pytest.raises(InputError, match="not empty"):
        check_output_dir(foreign, None)  # nothing may be replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError):
        check_output_dir(tmp_path / "file", "marker.json")


def test_read_json_or_empty(tmp_path: Path) -> None:
    assert read_json_or_empty(tmp_path / "absent.json") == {}
    (tmp_path / "a.json").write_text('{"threshold": 0.4}')
    assert read_json_or_empty(tmp_path / "a.json") == {"threshold": 0.4}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError):  # damaged, not absent
        read_json_or_empty(tmp_path / "bad.json")
