"""`lungcad demo`'s output folder: a second run replaces the first, a foreign folder is refused
before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.cli import main as cli_main
from lungcad.cli.demo import DEMO_MARKER, demo_output_folder
from lungcad.errors import InputError


def test_an_earlier_demo_output_is_replaced(tmp_path: Path) -> None:
    out = demo_output_folder(tmp_path / "demo")
    assert (out / DEMO_MARKER).is_file()
    (out / "validation").mkdir()
    (out / "validation" / "old.txt").write_text("from the first run")
    again = demo_output_folder(out)
    assert sorted(p.name for p in again.iterdir()) == [DEMO_MARKER]


def test_a_foreign_folder_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a demo")
    with pytest.raises(InputError, match="not an earlier demo output"):
        demo_output_folder(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "not a demo"
    # Through the CLI: exit 2 at once, nothing written.
    assert cli_main(["demo", "--out", str(tmp_path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
