"""Shared pieces of the dataset layout readers: settings, file listing, the slice writer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcad.data.grouping import GroupingSettings
from lungcad.data.manifest import SliceRecord, check_split_fractions
from lungcad.errors import InputError, MissingInputError
from lungcad.io import read_image
from lungcad.io.images import read_slice_image
from lungcad.volume import Volume

LAYOUTS = ("msd", "luna16", "classfolders", "imagemask")
SLICE_MODES = ("tumour", "all", "lung")
#: How 2D sets without patient ids are grouped (see lungcad.data.layouts.images2d).
GROUPINGS = ("similarity", "blocks")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_BLOCK_SIZE = {"classfolders": 20, "imagemask": 10}
# Least tumour area (mm^2) on a slice for the slice to be labelled cancerous (3D sets): about
# a 3.6 mm disc, i.e. ~16 pixels at 0.8 mm; smaller edge slivers get label -1 (unknown).
DEFAULT_MIN_TUMOUR_AREA_MM2 = 10.0
LAYOUT_HELP = (
    "expected one of these layouts: msd (dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz), "
    "luna16 (annotations.csv and subset*/<seriesuid>.mhd), imagemask (images/*.png and "
    "masks/*.png with the same names), classfolders (one sub-folder of images per class, "
    'mapped with --positive "Malignant cases" --negative "Normal cases,Bengin cases")'
)


@dataclass(frozen=True)
class PrepareSettings:
    """How ``prepare_dataset`` reads a layout and splits it.

    Attributes:
        layout: one of :data:`LAYOUTS` or ``"auto"``.
        positive: class folders whose images are cancerous (classfolders only).
        negative: class folders whose images are not cancerous (classfolders only).
        val_fraction: target fraction of slices in the validation split.
        test_fraction: target fraction of slices in the test split.
        seed: seed for the split and for sampling non-tumour slices.
        grouping: 2D sets: ``"similarity"`` (groups end where neighbouring images stop
            resembling each other; class folders' default) or ``"blocks"`` (fixed blocks of
            ``block_size`` file numbers; image/mask patches' default). None: the default.
        grouping_settings: window, similarity threshold, near-duplicate distance and split
            gap of the similarity grouping (the distance and gap apply to blocks too).
        block_size: files per group with block grouping (None: 20 for classfolders, 10
            imagemask).
        slices: 3D sets: ``"tumour"`` (all tumour slices plus a seeded sample of non-tumour
            lung slices), ``"lung"`` (every slice showing lung) or ``"all"``.
        negative_ratio: ``"tumour"`` mode: non-tumour slices kept per tumour slice.
        min_negatives: ``"tumour"`` mode: at least this many non-tumour slices per scan (so
            scans without tumour still contribute).
        min_tumour_area_mm2: 3D sets: a slice is labelled cancerous (1) only when its tumour
            covers at least this area (mm^2, pixel count x spacing_y x spacing_x). A slice with
            less tumour (e.g. the 1-3 pixel tip of a tumour on its first or last slice) keeps
            its mask, so segmentation still learns from it, but gets label -1 (unknown): the
            classifier neither learns it as cancerous nor as non-cancerous (stage ``cls`` and
            the metrics use labels 0/1 only). 0 labels every slice with a tumour voxel 1. Not
            used for 2D sets (their pixel size is unknown).
    """

    layout: str = "auto"
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    grouping: str | None = None
    grouping_settings: GroupingSettings = field(default_factory=GroupingSettings)
    block_size: int | None = None
    slices: str = "tumour"
    negative_ratio: float = 1.0
    min_negatives: int = 8
    min_tumour_area_mm2: float = DEFAULT_MIN_TUMOUR_AREA_MM2

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUTS):
            raise InputError(
                f"layout must be 'auto' or one of {LAYOUTS}; got {self.layout!r}", "--layout"
            )
        if self.slices not in SLICE_MODES:
            raise InputError(
                f"slices must be one of {SLICE_MODES}; got {self.slices!r}", "--slices"
            )
        if self.grouping is not None and self.grouping not in GROUPINGS:
            raise InputError(
                f"grouping must be one of {GROUPINGS}; got {self.grouping!r}", "--grouping"
            )
        if self.block_size is not None and self.block_size < 1:
            raise InputError(f"block size must be >= 1; got {self.block_size}", "--block-size")
        check_split_fractions(self.val_fraction, self.test_fraction)
        if self.negative_ratio < 0 or self.min_negatives < 0:
            raise InputError("negative_ratio and min_negatives must be >= 0", "--negative-ratio")
        if not self.min_tumour_area_mm2 >= 0:  # also refuses NaN
            raise InputError(
                f"min_tumour_area_mm2 must be a number >= 0 (mm^2); got {self.min_tumour_area_mm2}",
                "--min-tumour-area-mm2",
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
