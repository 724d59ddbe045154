"""Prepare a dataset folder: detect its layout, cut slices, split by group, write OUT atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungcad import __version__
from lungcad.data.grouping import purge_split_boundaries
from lungcad.data.layouts.common import LAYOUT_HELP, SliceWriter, image_files, visible
from lungcad.data.layouts.groups_report import (
    BOUNDARY_SHEET,
    GROUPS_FILE,
    write_boundary_sheet,
    write_group_table,
)
from lungcad.data.layouts.images2d import (
    ScanOrdered,
    class_mapping,
    prepare_classfolders,
    prepare_imagemask,
)
from lungcad.data.layouts.settings import DEFAULT_BLOCK_SIZE, PrepareSettings
from lungcad.data.layouts.volumes import prepare_luna16, prepare_msd
from lungcad.data.manifest import (
    SPLITS,
    SliceRecord,
    assign_splits,
    check_no_group_leakage,
    group_labels_of,
    write_manifest,
)
from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import atomic_dir
from lungcad.io.folders import check_output_dir

log = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    """What ``prepare_dataset`` wrote: the records (with splits) and the summary dict."""

    out: Path
    records: list[SliceRecord]
    summary: dict


def detect_layout(data: str | Path) -> str:
    """Which of :data:`LAYOUTS` the folder ``data`` holds.

    Raises:
        MissingInputError: ``data`` does not exist or is not a folder.
        InputError: the folder is empty or matches no layout (the message lists them).
    """
    data = Path(data)
    if not data.exists():
        raise MissingInputError("dataset folder not found", data)
    if not data.is_dir():
        raise InputError("expected a dataset folder, got a file; " + LAYOUT_HELP, data)
    entries = visible(data.iterdir())
    if not entries:
        raise InputError("dataset folder is empty; " + LAYOUT_HELP, data)
    if (data / "dataset.json").is_file() and (data / "imagesTr").is_dir():
        return "msd"
    if (data / "annotations.csv").is_file() and any(
        p.is_dir() and p.name.startswith("subset") for p in entries
    ):
        return "luna16"
    if (data / "images").is_dir() and (data / "masks").is_dir():
        return "imagemask"
    if any(p.is_dir() and image_files(p) for p in entries):
        return "classfolders"
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10])
    hint = ""
    if len(entries) == 1 and entries[0].is_dir():  # e.g. an archive unpacked one level deeper
        hint = f"; did you mean --data {entries[0]}?"
    raise InputError(f"unknown dataset layout (found: {found}){hint}; " + LAYOUT_HELP, data)


def input_files_hash(data: Path, files: Iterable[Path]) -> str:
    """``summary.json``'s ``input_files_sha256``: SHA-256 of the files' paths (relative to
    ``data``) and sizes, so the same dataset folder can be recognised later."""
    return _file_list_hash(data, files)


def _file_list_hash(data: Path, files: Iterable[Path]) -> str:
    lines = sorted(f"{p.relative_to(data).as_posix()}\t{p.stat().st_size}" for p in set(files))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def count_table(records: Sequence[SliceRecord]) -> dict[str, dict[str, int]]:
    """Slices per split and label plus groups: ``{split: {"label_0": n, ..., "groups": g}}``."""
    table: dict[str, dict[str, int]] = {}
    labels = sorted({r.label for r in records})
    for split in (*SPLITS, "total"):
        rows = [r for r in records if split == "total" or r.split == split]
        counts = Counter(r.label for r in rows)
        table[split] = {f"label_{lab}": counts[lab] for lab in labels}
        table[split]["slices"] = len(rows)
        table[split]["groups"] = len({r.group_id for r in rows})
    return table


def _summary(
    records: list[SliceRecord],
    layout: str,
    data: Path,
    files: list[Path],
    settings: PrepareSettings,
    block_size: int | None,
    warnings: list[str],
    extra: dict,
) -> dict:
    group_labels = group_labels_of(records)
    groups_by_split = {s: sorted({r.group_id for r in records if r.split == s}) for s in SPLITS}
    sources: dict[str, dict[str, int]] = {}
    for source in sorted({r.source for r in records}):
        counts = Counter(r.label for r in records if r.source == source)
        sources[source] = {f"label_{k}": v for k, v in sorted(counts.items())}
    return {
        "lungcad_version": __version__,
        "layout": layout,
        "input": str(data.resolve()),
        "input_files": len(set(files)),
        "input_files_sha256": _file_list_hash(data, files),
        "settings": dataclasses.asdict(settings) | {"layout": layout, "block_size": block_size},
        "counts": count_table(records),
        "sources": sources,
        "groups": {
            s: {"n": len(g), "label_1": sum(group_labels[x] == 1 for x in g)}
            for s, g in groups_by_split.items()
        },
        "group_ids": groups_by_split,
        "with_mask": sum(r.has_mask for r in records),
        **extra,
        "warnings": warnings,
    }


def _report_and_purge(
    out: Path,
    scan: ScanOrdered,
    records: list[SliceRecord],
    settings: PrepareSettings,
    extra: dict,
) -> list[SliceRecord]:
    """Leave out files at split boundaries; write groups.csv and the boundary contact sheet.

    ``records`` are ``scan.records`` with their splits (same order). Returns the kept records;
    the slice files of the others are deleted from ``out``.
    """
    groups = [r.group_id for r in records]
    splits = {r.group_id: r.split for r in records}
    gap = settings.grouping_settings.gap if scan.method == "similarity" else 0
    drop = purge_split_boundaries(scan.order, groups, splits, gap)
    kept = [r for i, r in enumerate(records) if i not in drop]
    dropped = [records[i] for i in sorted(drop)]
    write_group_table(kept, dropped, out / GROUPS_FILE)
    pairs = []
    for sequence, similarity in zip(scan.order, scan.boundary_similarity or [], strict=False):
        for k in range(len(sequence) - 1):
            a, b = records[sequence[k]], records[sequence[k + 1]]
            if a.group_id == b.group_id:
                continue
            score = f" r={similarity[k]:.2f}" if similarity else ""
            caption = f"{a.slice_index}|{b.slice_index} {a.split[:2]}|{b.split[:2]}{score}"
            pairs.append((_load(out, a), _load(out, b), caption))
    sheet = write_boundary_sheet(pairs, out / BOUNDARY_SHEET)
    for r in dropped:
        for rel in (r.image_path, r.mask_path):
            if rel:
                (out / rel).unlink()
    sizes = Counter(r.group_id for r in kept)
    extra["grouping"] = {
        "method": scan.method,
        "n_groups": len(sizes),
        "group_size": {
            "min": min(sizes.values(), default=0),
            "median": float(np.median(list(sizes.values()))) if sizes else 0.0,
            "max": max(sizes.values(), default=0),
        },
        "left_out_at_split_boundaries": len(dropped),
        "groups_file": GROUPS_FILE,
        "boundary_sheet": sheet.name if sheet else None,
    }
    return kept


def _load(out: Path, record: SliceRecord) -> np.ndarray:
    """The prepared image of ``record`` (``(H, W)`` in [0, 1])."""
    return np.load(out / record.image_path)


def _check_layout(data: Path, layout: str, settings: PrepareSettings) -> None:
    """Raise when ``data`` does not have the structure of ``layout``."""
    if not data.is_dir():
        raise MissingInputError("dataset folder not found", data)
    needs = {
        "msd": ("dataset.json", "imagesTr"),
        "luna16": ("annotations.csv",),
        "imagemask": ("images", "masks"),
    }
    absent = [name for name in needs.get(layout, ()) if not (data / name).exists()]
    if absent:
        raise InputError(
            f"not a {layout} folder: {', '.join(absent)} missing; " + LAYOUT_HELP, data
        )
    if layout == "classfolders":
        class_mapping(data, settings)


def _check_out(data: Path, out: Path) -> None:
    data_r, out_r = data.resolve(), out.resolve()
    if out_r == data_r or out_r in data_r.parents:
        raise InputError(
            "the output folder would replace the input data; choose another --out", out
        )
    check_output_dir(out, "manifest.csv", "a prepared dataset")


def prepare_dataset(
    data: str | Path, out: str | Path, settings: PrepareSettings | None = None
) -> PreparedDataset:
    """Read a dataset layout and write OUT/manifest.csv, OUT/slices/*.npy, OUT/summary.json.

    Splits are made per group (patient or contiguous block), stratified by group label (and by
    class folder for class-folder sets) and seeded; no group is in two splits. ``out`` is
    replaced atomically: on any error it is left as it was (an earlier prepared folder stays
    intact, a new one is not created).

    Args:
        data: the dataset folder.
        out: the output folder (new, empty, or an earlier ``prepare`` output).
        settings: layout, class mapping, split fractions, seed, block size, slice selection.

    Returns:
        The records (with splits) and the summary written to ``summary.json``.
    """
    settings = settings or PrepareSettings()
    data, out = Path(data), Path(out)
    layout = detect_layout(data) if settings.layout == "auto" else settings.layout
    _check_layout(data, layout, settings)  # fail before anything is written
    _check_out(data, out)
    block_size = (
        settings.block_size or DEFAULT_BLOCK_SIZE[layout] if layout in DEFAULT_BLOCK_SIZE else None
    )
    warnings: list[str] = []
    extra: dict = {}
    strata: dict[str, str] | None = None
    with atomic_dir(out) as tmp:
        writer = SliceWriter(tmp)
        scan: ScanOrdered | None = None
        if layout == "msd":
            records, files = prepare_msd(data, writer, settings, warnings)
        elif layout == "luna16":
            records, files = prepare_luna16(data, writer, settings, warnings)
        else:
            reader = prepare_imagemask if layout == "imagemask" else prepare_classfolders
            scan = reader(data, writer, settings, warnings, extra)
            records, files, strata = scan.records, scan.files, scan.strata
        if not records:
            raise InputError("no slices found to prepare; " + LAYOUT_HELP, data)
        records = assign_splits(
            records,
            group_strata=strata,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
            seed=settings.seed,
        )
        check_no_group_leakage(records)
        if scan is not None:
            records = _report_and_purge(tmp, scan, records, settings, extra)
        for split in SPLITS:
            if not any(r.split == split for r in records) and (
                split == "train" or getattr(settings, f"{split}_fraction") > 0
            ):
                warnings.append(f"split {split!r} is empty: too few groups for the fractions")
        write_manifest(records, tmp / "manifest.csv")
        summary = _summary(records, layout, data, files, settings, block_size, warnings, extra)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for warning in warnings:
        log.warning("%s", warning)
    return PreparedDataset(out=out, records=records, summary=summary)
