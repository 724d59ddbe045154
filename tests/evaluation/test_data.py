"""lungcad.evaluation.data: which rows of a prepared manifest are evaluated, and the errors that
say what to pass instead. (A raw dataset prepared on the fly is covered in test_evaluate.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.choices import SPLIT_CHOICES
from lungcad.evaluation.data import is_prepared, open_dataset, select_records


@pytest.fixture(scope="module")
def prepared(tiny_manifest: Callable[..., Path]) -> Path:
    return tiny_manifest({"train": 3, "val": 1, "test": 2})


def test_is_prepared(prepared: Path, tmp_path: Path) -> None:
    assert is_prepared(prepared) and is_prepared(prepared / "manifest.csv")
    assert not is_prepared(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert not is_prepared(tmp_path / "notes.txt")


def test_select_records_by_split(prepared: Path) -> None:
    assert SPLIT_CHOICES == ("train", "val", "test", "all")
    test = select_records(prepared, "test")
    assert len(test.records) == 4 and {r.split for r in test.records} == {"test"}
    assert len(test.all_records) == 12 and test.root == prepared
    assert test.manifest == prepared / "manifest.csv" and test.input == prepared
    assert not test.prepared and test.prepare_summary == {}
    every = select_records(prepared / "manifest.csv", "all", input_path="given")
    assert len(every.records) == 12 and every.input == Path("given")


def test_select_records_errors(prepared: Path, tiny_manifest: Callable[..., Path]) -> None:
    with pytest.raises(InputError, match="split must be one of"):
        select_records(prepared, "holdout")
    only_train = tiny_manifest({"train": 1})
    with pytest.raises(InputError, match=r"no 'test' rows \(splits present: train\)"):
        select_records(only_train, "test")


def test_summary_json_is_kept_as_provenance(tiny_manifest: Callable[..., Path]) -> None:
    folder = tiny_manifest({"test": 1})
    (folder / "summary.json").write_text(json.dumps({"layout": "msd"}))
    assert select_records(folder, "test").prepare_summary == {"layout": "msd"}


def test_open_dataset(prepared: Path, tmp_path: Path) -> None:
    with open_dataset(prepared) as data:  # prepared data: the test split by default
        assert data.split == "test" and len(data.records) == 4
    with open_dataset(prepared, "val") as data:
        assert data.split == "val" and len(data.records) == 2
    with pytest.raises(MissingInputError, match="evaluation data not found"):
        with open_dataset(tmp_path / "missing"):
            pass
