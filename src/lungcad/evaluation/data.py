"""Which slices to evaluate: a prepared manifest, or a raw dataset prepared on the fly.

A raw dataset folder in any layout ``lungcad prepare`` reads is prepared with
:func:`lungcad.data.layouts.prepare.prepare_dataset` into a temporary folder that is removed
afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungcad.data.layouts.prepare import prepare_dataset
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.manifest import SliceRecord, filter_records, manifest_csv, read_manifest
from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.choices import SPLIT_CHOICES

log = logging.getLogger(__name__)


@dataclass
class EvaluationData:
    """The slices to evaluate and where they came from.

    Attributes:
        records: the selected manifest rows.
        root: the manifest's folder (record paths are relative to it).
        manifest: path of the manifest.csv.
        split: the split evaluated ("train", "val", "test" or "all").
        all_records: every row of the manifest (for the split summary).
        prepared: True when ``data`` was a raw dataset prepared for this evaluation.
        input: what the user passed.
        prepare_summary: the ``summary.json`` of the prepared folder (empty if absent).
    """

    records: list[SliceRecord]
    root: Path
    manifest: Path
    split: str
    all_records: list[SliceRecord]
    prepared: bool
    input: Path
    prepare_summary: dict[str, Any] = field(default_factory=dict)


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` is a manifest.csv or a folder holding one (``lungcad prepare``)."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".csv") or (path / "manifest.csv").is_file()


def select_records(
    manifest: str | Path,
    split: str,
    *,
    input_path: str | Path | None = None,
    prepared: bool = False,
) -> EvaluationData:
    """The rows of a prepared manifest to evaluate.

    Args:
        manifest: manifest.csv or its folder.
        split: one of :data:`lungcad.evaluation.choices.SPLIT_CHOICES` ("all" takes every row).
        input_path: what the user passed (recorded as provenance).
        prepared: whether the manifest was made on the fly from a raw dataset.

    Raises:
        InputError: unknown split, or no rows in it.
    """
    if split not in SPLIT_CHOICES:
        raise InputError(f"split must be one of {SPLIT_CHOICES}; got {split!r}", "--split")
    manifest = Path(manifest)
    csv_path = manifest_csv(manifest)
    all_records = read_manifest(csv_path)
    records = filter_records(all_records, None if split == "all" else split)
    if not records:
        present = sorted({r.split for r in all_records})
        raise InputError(
            f"the manifest has no {split!r} rows (splits present: "
            f"{', '.join(present) or 'none'}); pass --split all to evaluate every "
            "slice, e.g. for an external dataset",
            csv_path,
        )
    summary_path = csv_path.parent / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return EvaluationData(
        records=records,
        root=csv_path.parent,
        manifest=csv_path,
        split=split,
        all_records=all_records,
        prepared=prepared,
        input=Path(input_path or manifest),
        prepare_summary=summary,
    )


@contextlib.contextmanager
def open_dataset(
    data: str | Path,
    split: str | None = None,
    settings: PrepareSettings | None = None,
) -> Iterator[EvaluationData]:
    """Yield the slices of ``data``: a prepared manifest, or a raw dataset prepared on the fly.

    A raw dataset folder (any layout ``lungcad prepare`` reads) is prepared into a temporary
    folder with :func:`lungcad.data.layouts.prepare.prepare_dataset`, removed on exit. With
    ``split`` "all" (the default for raw data) it is prepared without val/test fractions so
    every slice is evaluated; another split uses the settings' fractions and seed.

    Args:
        data: manifest.csv, prepared folder, or raw dataset folder.
        split: one of :data:`lungcad.evaluation.choices.SPLIT_CHOICES`; None means "test" for
            prepared data and "all" for raw data.
        settings: how to prepare raw data (layout, class folders, ...).
    """
    data = Path(data)
    if not data.exists():
        raise MissingInputError(
            "evaluation data not found; pass a folder written by "
            "`lungcad prepare` (or its manifest.csv) or a dataset folder",
            data,
        )
    if is_prepared(data):
        yield select_records(data, split or "test", input_path=data)
        return
    split = split or "all"
    settings = settings or PrepareSettings()
    if split == "all":
        settings = dataclasses.replace(settings, val_fraction=0.0, test_fraction=0.0)
    with tempfile.TemporaryDirectory(prefix="lungcad-eval-") as tmp:
        log.info("preparing %s (layout %s) into a temporary folder", data, settings.layout)
        prepared = prepare_dataset(data, Path(tmp) / "prepared", settings)
        yield select_records(prepared.out, split, input_path=data, prepared=True)
