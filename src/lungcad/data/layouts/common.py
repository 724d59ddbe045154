"""Shared pieces of the dataset layout readers: settings, file listing, the slice writer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError, MissingInputError
from lungcad.io import read_image
from lungcad.io.images import read_slice_image
from lungcad.volume import Volume

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUT_HELP = (
    "expected one of these layouts: msd (dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz), "
    "luna16 (annotations.csv and subset*/<seriesuid>.mhd), imagemask (images/*.png and "
    "masks/*.png with the same names), classfolders (one sub-folder of images per class, "
    'mapped with --positive "Malignant cases" --negative "Normal cases,Bengin cases")'
)


def slug(text: str) -> str:
    """``text`` as a file-name-safe id: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_.") or "x"


def visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` sorted, without hidden files.

    Hidden includes macOS ``._name`` resource forks, which the MSD tarballs contain.
    """
    return sorted(p for p in paths if not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """The visible 2D image files (``IMAGE_SUFFIXES``) directly inside ``folder``, sorted."""
    return [
        p for p in visible(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]


def read_volume(path: Path) -> Volume:
    """``lungcad.io.read_image`` with any reader failure reported as an InputError on ``path``."""
    try:
        return read_image(path)
    except (InputError, MissingInputError):
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read image ({exc}); is the file complete?", path) from exc


def read_slice(path: Path) -> np.ndarray:
    """``read_slice_image`` ((H, W) float32 in [0, 1]); failures become InputError on ``path``."""
    try:
        return read_slice_image(path)
    except (InputError, MissingInputError):
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read image ({exc}); is the file a complete image?", path) from exc


class SliceWriter:
    """Writes ``out/slices/<id>.npy`` (and ``out/masks/<id>.npy``) and returns manifest records.

    Sample ids are made file-name safe and unique (case-insensitively, for file systems that
    ignore case) by appending ``_2``, ``_3``, ...
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "slices").mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()

    def add(
        self,
        sample_id: str,
        group_id: str,
        slice_index: int,
        image: np.ndarray,
        mask: np.ndarray | None,
        label: int,
        spacing_yx: tuple[float, float],
        source: str,
    ) -> SliceRecord:
        sample_id = base = slug(sample_id)
        n = 1
        while sample_id.lower() in self.used:
            n += 1
            sample_id = f"{base}_{n}"
        self.used.add(sample_id.lower())
        image_rel = f"slices/{sample_id}.npy"
        np.save(self.out / image_rel, np.clip(image, 0.0, 1.0).astype(np.float32))
        mask_rel = ""
        if mask is not None:
            mask_rel = f"masks/{sample_id}.npy"
            (self.out / "masks").mkdir(exist_ok=True)
            np.save(self.out / mask_rel, (mask > 0).astype(np.uint8))
        return SliceRecord(
            sample_id=sample_id,
            group_id=group_id,
            slice_index=int(slice_index),
            image_path=image_rel,
            mask_path=mask_rel,
            label=int(label),
            spacing_y=float(spacing_yx[0]),
            spacing_x=float(spacing_yx[1]),
            source=source,
            split="train",
        )


class UnionFind:
    """Disjoint sets of group ids (merging the groups of duplicate files)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id names the merged group, so ids are deterministic
            self.parent[max(ra, rb)] = min(ra, rb)
