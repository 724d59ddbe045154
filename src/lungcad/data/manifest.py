"""The slice manifest: records, reading and writing, patient-level splits and group checks.

A prepared dataset is a folder written by ``lungcad prepare`` (see
:mod:`lungcad.data.layouts`)::

    OUT/manifest.csv          one row per 2D axial slice (columns: MANIFEST_COLUMNS)
    OUT/slices/<id>.npy       image, float32 (H, W) in [0, 1] (lung-windowed intensity)
    OUT/masks/<id>.npy        tumour mask, uint8 (H, W) 0/1 (absent for sets without masks)
    OUT/summary.json          counts, settings and a hash of the input file list

Paths in the manifest are relative to the manifest's folder so the folder can be moved.
Slices of one patient (or, where the data has no patient ids, one contiguous block of files)
share a ``group_id``; splits are made per group so no patient is in two splits, which would
inflate validation scores.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import atomic_path

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = (
    "sample_id",
    "group_id",
    "slice_index",
    "image_path",
    "mask_path",
    "label",
    "spacing_y",
    "spacing_x",
    "source",
    "split",
)
SPLITS = ("train", "val", "test")
LABELS = (-1, 0, 1)  # unknown, not cancerous, cancerous


@dataclass(frozen=True)
class SliceRecord:
    """One row of the manifest: a 2D axial slice and where its files are.

    Attributes:
        sample_id: unique id of the slice.
        group_id: patient id, or a contiguous-block id where the data has no patient ids.
        slice_index: index of the slice in its source (z in the canonical LPS volume, or the
            file number for 2D sets).
        image_path: ``.npy`` float32 ``(H, W)`` in [0, 1], relative to the manifest folder.
        mask_path: ``.npy`` uint8 ``(H, W)`` 0/1 relative to the manifest folder, or ``""``.
        label: 1 cancerous, 0 not, -1 unknown.
        spacing_y: row spacing in mm (NaN when unknown).
        spacing_x: column spacing in mm (NaN when unknown).
        source: dataset name / layout the slice came from.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    sample_id: str
    group_id: str
    slice_index: int
    image_path: str
    mask_path: str
    label: int
    spacing_y: float
    spacing_x: float
    source: str
    split: str

    @property
    def has_mask(self) -> bool:
        """True when the slice has a tumour mask file."""
        return bool(self.mask_path)


def _parse_row(row: dict[str, str], path: Path, line: int) -> SliceRecord:
    where = f"{path} (line {line})"
    try:
        slice_index = int(row["slice_index"])
        label = int(float(row["label"]))
        spacing_y = float(row["spacing_y"]) if row["spacing_y"].strip() else math.nan
        spacing_x = float(row["spacing_x"]) if row["spacing_x"].strip() else math.nan
    except ValueError as exc:
        raise InputError(
            f"bad number in the manifest ({exc}); slice_index and label must be integers and "
            "spacing_y/spacing_x numbers in mm (or empty/NaN). Re-run `lungcad prepare`.",
            where,
        ) from exc
    if label not in LABELS:
        raise InputError(
            f"label must be one of {LABELS} (1 cancerous, 0 not, -1 unknown); got {label}", where
        )
    split = row["split"].strip()
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}; got {split!r}", where)
    if not row["sample_id"].strip() or not row["image_path"].strip():
        raise InputError("sample_id and image_path must not be empty", where)
    return SliceRecord(
        sample_id=row["sample_id"].strip(),
        group_id=row["group_id"].strip(),
        slice_index=slice_index,
        image_path=row["image_path"].strip(),
        mask_path=row["mask_path"].strip(),
        label=label,
        spacing_y=spacing_y,
        spacing_x=spacing_x,
        source=row["source"].strip(),
        split=split,
    )


def read_manifest(path: str | Path) -> list[SliceRecord]:
    """Read a manifest CSV written by ``lungcad prepare`` (or by hand, same columns).

    Args:
        path: the ``manifest.csv`` file, or the prepared folder that holds it.

    Returns:
        The records in file order.

    Raises:
        MissingInputError: the file does not exist.
        InputError: a column is missing, a value is malformed, or a sample_id repeats.
    """
    path = manifest_csv(path)
    if not path.is_file():
        raise MissingInputError(
            "manifest not found; expected a manifest.csv written by `lungcad prepare --out DIR`",
            path,
        )
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for column in MANIFEST_COLUMNS:
            if column not in header:
                raise InputError(
                    f"manifest has no column {column!r}; expected columns "
                    f"{', '.join(MANIFEST_COLUMNS)} (found {', '.join(header) or 'none'})",
                    path,
                )
        records = [_parse_row(row, path, i + 2) for i, row in enumerate(reader)]
    duplicates = [sid for sid, n in Counter(r.sample_id for r in records).items() if n > 1]
    if duplicates:
        raise InputError(f"sample_id must be unique; repeated: {', '.join(duplicates[:5])}", path)
    return records


def _format_float(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def write_manifest(records: Iterable[SliceRecord], path: str | Path) -> Path:
    """Write records as a manifest CSV (columns :data:`MANIFEST_COLUMNS`), atomically.

    Args:
        records: the slices to write, in the order given.
        path: destination ``manifest.csv``.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            writer.writerow(
                [
                    r.sample_id,
                    r.group_id,
                    r.slice_index,
                    r.image_path,
                    r.mask_path,
                    r.label,
                    _format_float(r.spacing_y),
                    _format_float(r.spacing_x),
                    r.source,
                    r.split,
                ]
            )
    return path


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise InputError unless both fractions are in [0, 1) and leave data for training."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{name} must be in [0, 1); got {value}", name)
    if val_fraction + test_fraction >= 1.0:
        raise InputError(
            f"val_fraction + test_fraction must leave some training data; got "
            f"{val_fraction} + {test_fraction} >= 1",
            "val_fraction",
        )


def split_groups(
    group_labels: Mapping[str, int],
    *,
    group_sizes: Mapping[str, int] | None = None,
    group_strata: Mapping[str, str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, str]:
    """Assign whole groups (patients / blocks) to train, val and test.

    Stratified by group label (and, optionally, a finer stratum such as the class folder, so
    benign and normal cases of label 0 both reach every split): each stratum's groups are
    split on their own, so every split gets cancerous and non-cancerous patients where there
    are enough of them. Within a stratum the groups are shuffled with ``seed`` and then,
    largest first, given to the split that is furthest below its target number of slices
    (``group_sizes``). Deterministic for a given input and seed, independent of the order of
    ``group_labels``.

    Args:
        group_labels: group id -> label of the group (max of its slice labels).
        group_sizes: group id -> number of slices (default 1 each: split by group count).
        group_strata: group id -> stratum name within its label (default: one per label).
        val_fraction: target fraction of slices in val.
        test_fraction: target fraction of slices in test.
        seed: random seed of the shuffle.

    Returns:
        group id -> ``"train"``, ``"val"`` or ``"test"``.
    """
    check_split_fractions(val_fraction, test_fraction)
    fractions = {
        "train": 1.0 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    sizes = {g: int((group_sizes or {}).get(g, 1)) for g in group_labels}
    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for group, label in group_labels.items():
        strata[(int(label), str((group_strata or {}).get(group, "")))].append(group)
    assignment: dict[str, str] = {}
    grand_total = sum(sizes.values())
    overall = dict.fromkeys(SPLITS, 0)
    for label, stratum in sorted(strata):
        groups = sorted(strata[(label, stratum)])
        rng = np.random.default_rng([seed, label + 1, zlib.crc32(stratum.encode())])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        # Stable sort keeps the shuffled order among equal sizes; placing big groups first
        # keeps the slice fractions close to the targets.
        groups.sort(key=lambda g: -sizes[g])
        total = sum(sizes[g] for g in groups)
        filled = dict.fromkeys(SPLITS, 0)
        for group in groups:
            # The split furthest below its target in this stratum; ties (e.g. val and test in
            # a stratum of 3 groups) go to the split furthest below its overall target, so
            # small strata take turns feeding val and test; then SPLITS order.
            split = max(
                SPLITS,
                key=lambda s: (
                    round(fractions[s] * total - filled[s], 9),
                    fractions[s] * grand_total - overall[s],
                ),
            )
            assignment[group] = split
            filled[split] += sizes[group]
            overall[split] += sizes[group]
    return assignment


def group_labels_of(records: Iterable[SliceRecord]) -> dict[str, int]:
    """Label of each group: the max of its slice labels (a patient with a tumour slice is 1)."""
    labels: dict[str, int] = {}
    for r in records:
        labels[r.group_id] = max(labels.get(r.group_id, -1), r.label)
    return labels


def assign_splits(
    records: Sequence[SliceRecord],
    *,
    group_strata: Mapping[str, str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> list[SliceRecord]:
    """Records with ``split`` set by :func:`split_groups` (group-level, stratified, seeded)."""
    sizes = Counter(r.group_id for r in records)
    splits = split_groups(
        group_labels_of(records),
        group_sizes=sizes,
        group_strata=group_strata,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    return [dataclasses.replace(r, split=splits[r.group_id]) for r in records]


def filter_records(
    records: Iterable[SliceRecord],
    split: str | Sequence[str] | None = None,
    *,
    require_mask: bool = False,
    labels: Sequence[int] | None = None,
    sources: Sequence[str] | None = None,
) -> list[SliceRecord]:
    """The records of the given split(s), optionally only those with a mask / label / source.

    Args:
        records: manifest records.
        split: ``"train"``, ``"val"``, ``"test"``, a list of them, or None for all.
        require_mask: keep only slices with a tumour mask (segmentation training).
        labels: keep only these labels (e.g. ``(0, 1)`` drops unknown labels).
        sources: keep only these sources.
    """
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    if wanted is not None and not wanted <= set(SPLITS):
        raise InputError(f"split must be among {SPLITS}; got {sorted(wanted)}", "split")
    return [
        r
        for r in records
        if (wanted is None or r.split in wanted)
        and (not require_mask or r.has_mask)
        and (labels is None or r.label in labels)
        and (sources is None or r.source in sources)
    ]


def check_no_group_leakage(records: Iterable[SliceRecord]) -> None:
    """Raise InputError if any group appears in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in records:
        seen[r.group_id].add(r.split)
    leaked = sorted(g for g, s in seen.items() if len(s) > 1)
    if leaked:
        raise InputError(
            f"groups found in more than one split (patient leakage): {', '.join(leaked[:5])}; "
            "re-run `lungcad prepare` to split by group",
            "manifest",
        )


def manifest_csv(path: str | Path) -> Path:
    """The manifest file of ``path``: ``path/manifest.csv`` for a prepared folder, else ``path``."""
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path
