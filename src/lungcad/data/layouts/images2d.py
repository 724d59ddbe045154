"""2D layouts: class folders (e.g. IQ-OTH/NCCD) and image/mask folders (e.g. MSD patches).

These sets have no patient ids. Files are numbered in scan order, so neighbouring numbers are
usually the same patient: groups are contiguous blocks of file numbers (within each class
folder), and blocks holding byte-identical files are merged so a duplicate can never sit in
two splits. Splitting by block, never per image, keeps validation scores honest.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from lungcad.data.layouts.common import (
    DEFAULT_BLOCK_SIZE,
    IMAGE_SUFFIXES,
    LAYOUT_HELP,
    PrepareSettings,
    SliceWriter,
    UnionFind,
    image_files,
    read_slice,
    slug,
    visible,
)
from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError


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


def _merge_duplicates(files: list[Path], groups: list[str], summary: dict) -> list[str]:
    """Merge the groups of byte-identical files so duplicates never straddle splits."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        by_hash[hashlib.sha256(f.read_bytes()).hexdigest()].append(i)
    uf = UnionFind()
    duplicates = []
    for idx in by_hash.values():
        for i in idx[1:]:
            uf.union(groups[idx[0]], groups[i])
        if len(idx) > 1:
            duplicates.append([str(files[i].relative_to(files[i].parents[1])) for i in idx])
    merged = [uf.find(g) for g in groups]
    summary["duplicate_files"] = sorted(duplicates)
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


def prepare_classfolders(
    data: Path, writer: SliceWriter, settings: PrepareSettings, warnings: list[str], summary: dict
) -> tuple[list[SliceRecord], list[Path], dict[str, str]]:
    mapping = class_mapping(data, settings)
    block_size = settings.block_size or DEFAULT_BLOCK_SIZE["classfolders"]
    files: list[Path] = []
    numbers: list[int] = []
    groups: list[str] = []
    for folder in sorted(mapping):
        numbered = _numbered(image_files(data / folder), warnings)
        files += [f for f, _ in numbered]
        numbers += [n for _, n in numbered]
        groups += _block_ids(numbered, f"{slug(folder)}_", block_size)
    groups = _merge_duplicates(files, groups, summary)
    source = f"classfolders:{data.name}"
    records = []
    for path, number, group in zip(files, numbers, groups, strict=True):
        image = read_slice(path)
        label = mapping[path.parent.name]
        records.append(
            writer.add(
                f"{path.parent.name}_{path.stem}",
                group,
                number,
                image,
                None,
                label,
                (float("nan"), float("nan")),
                source,
            )
        )
    conflicts = [g for g, labels in _labels_per_group(records).items() if len(labels) > 1]
    if conflicts:
        warnings.append(f"identical images under different classes merged groups {conflicts}")
    # Split each class folder on its own, so e.g. benign and normal both reach val and test.
    strata: dict[str, str] = {}
    for path, group in zip(files, groups, strict=True):
        strata.setdefault(group, path.parent.name)
    return records, files, strata


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
) -> tuple[list[SliceRecord], list[Path]]:
    images = image_files(data / "images")
    if not images:
        raise InputError(
            "images/ holds no image files (.png, .jpg, ...); " + LAYOUT_HELP, data / "images"
        )
    masks = [_mask_for(image, data / "masks") for image in images]  # all checked before reading
    numbered = _numbered(images, warnings)
    groups = _block_ids(numbered, "", settings.block_size or DEFAULT_BLOCK_SIZE["imagemask"])
    groups = _merge_duplicates(images, groups, summary)
    source = f"imagemask:{data.name}"
    records = []
    for (path, number), mask_path, group in zip(numbered, masks, groups, strict=True):
        image = read_slice(path)
        mask = read_slice(mask_path) >= 0.5
        if mask.shape != image.shape:
            raise InputError(
                f"mask shape {mask.shape} differs from its image's {image.shape} ({path.name})",
                mask_path,
            )
        records.append(
            writer.add(
                path.stem,
                group,
                number,
                image,
                mask,
                int(mask.any()),
                (float("nan"), float("nan")),
                source,
            )
        )
    return records, images + masks
