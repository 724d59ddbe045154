"""2D layouts: class folders (e.g. IQ-OTH/NCCD) and image/mask folders (e.g. MSD patches).

These sets have no patient ids. Files are numbered in scan order, so neighbouring numbers are
usually the same patient. Groups are found per folder in one of two ways
(``PrepareSettings.grouping``):

* ``"similarity"`` (class folders' default): a group ends where neighbouring images stop
  resembling each other or the image size changes (:mod:`lungcad.data.grouping`);
* ``"blocks"`` (image/mask patches' default, whose neighbouring crops need not look alike):
  contiguous blocks of ``block_size`` file numbers.

Either way, groups holding byte-identical files or near-duplicates (perceptual hash) are
merged so a copy can never sit in two splits, and the files are returned in scan order so the
split can keep groups of different splits apart
(:func:`lungcad.data.grouping.purge_split_boundaries`).
Splitting by group, never per image, keeps validation scores honest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcad.data.grouping import (
    near_duplicate_pairs,
    perceptual_hash,
    scan_runs,
    thumbnail,
)
from lungcad.data.layouts.common import (
    IMAGE_SUFFIXES,
    LAYOUT_HELP,
    SliceWriter,
    UnionFind,
    image_files,
    read_slice,
    slug,
    visible,
)
from lungcad.data.layouts.settings import DEFAULT_BLOCK_SIZE, PrepareSettings
from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError


@dataclass
class ScanOrdered:
    """What a 2D layout reader returns: records, their files, and the scan order.

    Attributes:
        records: one record per image, with its group.
        files: the input files read (images and masks), for the input hash.
        strata: group id -> class folder, to split each folder on its own (None: by label).
        order: per folder, indices into ``records`` in scan order.
        method: the grouping used, ``"similarity"`` or ``"blocks"``.
        boundary_similarity: per folder, the similarity at each cut between consecutive files
            (empty with block grouping).
    """

    records: list[SliceRecord]
    files: list[Path]
    strata: dict[str, str] | None
    order: list[list[int]]
    method: str
    boundary_similarity: list[list[float]] = field(default_factory=list)


def parse_file_number(name: str) -> int | None:
    """The scan-order number in a file name: the last run of digits in its stem.

    ``"Malignant case (214).jpg"`` -> 214, ``"patch_007.png"`` -> 7, ``"img.png"`` -> None.
    """
    numbers = re.findall(r"\d+", Path(name).stem)
    return int(numbers[-1]) if numbers else None


def _numbered(files: list[Path], warnings: list[str]) -> list[tuple[Path, int]]:
    """Each file with its scan-order number; unnumbered files go after the numbered ones."""
    numbers = [parse_file_number(f.name) for f in files]
    top = max((n for n in numbers if n is not None), default=0)
    unnumbered = [f for f, n in zip(files, numbers, strict=True) if n is None]
    if unnumbered:
        warnings.append(
            f"{len(unnumbered)} file(s) without a number in {files[0].parent.name}/ "
            f"(e.g. {unnumbered[0].name}) placed after the numbered ones"
        )
    extra = {f: top + 1 + i for i, f in enumerate(unnumbered)}
    numbered = [(f, n if n is not None else extra[f]) for f, n in zip(files, numbers, strict=True)]
    return sorted(numbered, key=lambda item: (item[1], item[0].name))


def _block_ids(numbered: list[tuple[Path, int]], prefix: str, block_size: int) -> list[str]:
    start = min(n for _, n in numbered)
    return [f"{prefix}b{(n - start) // block_size:03d}" for _, n in numbered]


def _merge_duplicates(
    files: list[Path], hashes: list[int], groups: list[str], max_distance: int, summary: dict
) -> list[str]:
    """Merge the groups of byte-identical and near-duplicate files (perceptual ``hashes``)."""
    uf = UnionFind()
    by_bytes: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        by_bytes[hashlib.sha256(f.read_bytes()).hexdigest()].append(i)
    identical = [idx for idx in by_bytes.values() if len(idx) > 1]
    pairs = [(idx[0], i) for idx in identical for i in idx[1:]]
    near = [(i, j) for i, j in near_duplicate_pairs(hashes, max_distance) if groups[i] != groups[j]]
    for i, j in pairs + near:
        uf.union(groups[i], groups[j])

    def name(i: int) -> str:
        return str(files[i].relative_to(files[i].parents[1]))

    merged = [uf.find(g) for g in groups]
    summary["duplicate_files"] = sorted([name(i) for i in idx] for idx in identical)
    summary["near_duplicate_pairs"] = sorted([name(i), name(j)] for i, j in near)
    summary["merged_groups"] = sorted(
        sorted(members) for members in _invert(groups, merged).values() if len(members) > 1
    )
    return merged


def _invert(groups: list[str], merged: list[str]) -> dict[str, set[str]]:
    members: dict[str, set[str]] = defaultdict(set)
    for g, m in zip(groups, merged, strict=True):
        members[m].add(g)
    return members


def class_mapping(data: Path, settings: PrepareSettings) -> dict[str, int]:
    folders = [p.name for p in visible(data.iterdir()) if p.is_dir() and image_files(p)]
    found = ", ".join(f'"{f}"' for f in folders)
    example = '--positive "Malignant cases" --negative "Normal cases,Bengin cases"'
    if not settings.positive and not settings.negative:
        raise InputError(
            f"class folders need a mapping to labels; found folders {found}. "
            f"Name them with --positive/--negative, e.g. {example}",
            data,
        )
    both = set(settings.positive) & set(settings.negative)
    if both:
        raise InputError(f"folder(s) {sorted(both)} given as both positive and negative", data)
    mapping = {name: 1 for name in settings.positive} | {name: 0 for name in settings.negative}
    absent = [name for name in mapping if name not in folders]
    if absent:
        raise InputError(
            f"class folder(s) {absent} named in --positive/--negative not found; "
            f"found folders {found}",
            data,
        )
    unmapped = [name for name in folders if name not in mapping]
    if unmapped:
        raise InputError(
            f"class folder(s) {unmapped} are not mapped to a label; found folders "
            f"{found}. Add each to --positive or --negative, e.g. {example}",
            data,
        )
    return mapping


@dataclass
class _Looks:
    """What grouping needs of each image of a folder, kept instead of the images themselves
    (a 512x512 slice is 1 MB; its thumbnail 16 kB, its hash 8 bytes)."""

    thumbs: list[np.ndarray] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)

    def add(self, image: np.ndarray, with_thumbnail: bool) -> None:
        if with_thumbnail:
            self.thumbs.append(thumbnail(image))
        self.shapes.append(image.shape)
        self.hashes.append(perceptual_hash(image))


def _group_folder(
    looks: _Looks,
    numbered: list[tuple[Path, int]],
    prefix: str,
    grouping: str,
    settings: PrepareSettings,
    block_size: int,
) -> tuple[list[str], list[float]]:
    """Group ids for one folder's images (in scan order) and the similarity at each cut."""
    if grouping == "blocks":
        return _block_ids(numbered, prefix, block_size), []
    thumbs = np.stack(looks.thumbs)
    runs, similarity = scan_runs(thumbs, looks.shapes, settings.grouping_settings)
    return [f"{prefix}g{run:03d}" for run in runs], similarity


def grouping_method(settings: PrepareSettings, default: str) -> str:
    """The 2D grouping: the setting, else blocks when a block size is given, else ``default``."""
    return settings.grouping or ("blocks" if settings.block_size else default)


def _regroup(records: list[SliceRecord], groups: list[str]) -> list[SliceRecord]:
    """The records (written before their groups were known) with their group ids."""
    return [dataclasses.replace(r, group_id=g) for r, g in zip(records, groups, strict=True)]


def prepare_classfolders(
    data: Path, writer: SliceWriter, settings: PrepareSettings, warnings: list[str], summary: dict
) -> ScanOrdered:
    mapping = class_mapping(data, settings)
    grouping = grouping_method(settings, "similarity")
    block_size = settings.block_size or DEFAULT_BLOCK_SIZE["classfolders"]
    source = f"classfolders:{data.name}"
    files: list[Path] = []
    groups: list[str] = []
    hashes: list[int] = []
    records: list[SliceRecord] = []
    order: list[list[int]] = []
    similarity: list[list[float]] = []
    for folder in sorted(mapping):
        numbered = _numbered(image_files(data / folder), warnings)
        looks = _Looks()
        for path, number in numbered:  # each image is written as it is read
            image = read_slice(path)
            looks.add(image, with_thumbnail=grouping == "similarity")
            records.append(
                writer.add(
                    f"{folder}_{path.stem}",
                    "",
                    number,
                    image,
                    None,
                    mapping[folder],
                    _pixel_spacing(settings),
                    source,
                )
            )
        folder_groups, folder_similarity = _group_folder(
            looks, numbered, f"{slug(folder)}_", grouping, settings, block_size
        )
        order.append(list(range(len(files), len(files) + len(numbered))))
        similarity.append(folder_similarity)
        files += [f for f, _ in numbered]
        groups += folder_groups
        hashes += looks.hashes
    groups = _merge_duplicates(
        files, hashes, groups, settings.grouping_settings.max_hash_distance, summary
    )
    records = _regroup(records, groups)
    conflicts = [g for g, labels in _labels_per_group(records).items() if len(labels) > 1]
    if conflicts:
        warnings.append(f"identical images under different classes merged groups {conflicts}")
    # Split each class folder on its own, so e.g. benign and normal both reach val and test.
    strata: dict[str, str] = {}
    for path, group in zip(files, groups, strict=True):
        strata.setdefault(group, path.parent.name)
    return ScanOrdered(records, files, strata, order, grouping, similarity)


def _labels_per_group(records: Iterable[SliceRecord]) -> dict[str, set[int]]:
    labels: dict[str, set[int]] = defaultdict(set)
    for r in records:
        labels[r.group_id].add(r.label)
    return labels


def _mask_for(image: Path, masks: Path) -> Path:
    same = masks / image.name
    if same.is_file():
        return same
    for suffix in IMAGE_SUFFIXES:
        for candidate in (masks / (image.stem + suffix), masks / (image.stem + suffix.upper())):
            if candidate.is_file():
                return candidate
    raise InputError(
        f"image has no mask; expected {same} (same file name in masks/). Add the "
        "mask, or remove the image",
        image,
    )


def prepare_imagemask(
    data: Path, writer: SliceWriter, settings: PrepareSettings, warnings: list[str], summary: dict
) -> ScanOrdered:
    images = image_files(data / "images")
    if not images:
        raise InputError(
            "images/ holds no image files (.png, .jpg, ...); " + LAYOUT_HELP, data / "images"
        )
    masks = [_mask_for(image, data / "masks") for image in images]  # all checked before reading
    numbered = _numbered(images, warnings)
    by_path = dict(zip(images, masks, strict=True))
    ordered_masks = [by_path[path] for path, _ in numbered]
    grouping = grouping_method(settings, "blocks")
    source = f"imagemask:{data.name}"
    looks = _Looks()
    records = []
    for (path, number), mask_path in zip(numbered, ordered_masks, strict=True):
        image = read_slice(path)
        mask = read_slice(mask_path) >= 0.5
        if mask.shape != image.shape:
            raise InputError(
                f"mask shape {mask.shape} differs from its image's {image.shape} ({path.name})",
                mask_path,
            )
        looks.add(image, with_thumbnail=grouping == "similarity")
        records.append(
            writer.add(
                path.stem,
                "",
                number,
                image,
                mask,
                int(mask.any()),
                _pixel_spacing(settings),
                source,
            )
        )
    groups, similarity = _group_folder(
        looks,
        numbered,
        "",
        grouping,
        settings,
        settings.block_size or DEFAULT_BLOCK_SIZE["imagemask"],
    )
    files = [path for path, _ in numbered]
    groups = _merge_duplicates(
        files, looks.hashes, groups, settings.grouping_settings.max_hash_distance, summary
    )
    return ScanOrdered(
        _regroup(records, groups),
        files + ordered_masks,
        None,
        [list(range(len(records)))],
        grouping,
        [similarity],
    )


def _pixel_spacing(settings: PrepareSettings) -> tuple[float, float]:
    """(y, x) pixel spacing in mm of a 2D set's images: ``--pixel-spacing`` or unknown (NaN)."""
    mm = settings.pixel_spacing_mm
    return (float("nan"), float("nan")) if mm is None else (float(mm), float(mm))
