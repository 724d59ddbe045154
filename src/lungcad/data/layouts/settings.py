"""How ``lungcad prepare`` reads, groups and splits a dataset: its settings and their checks.

Light on purpose (no readers, no scipy): the command line builds its options and help from
these defaults without loading the image stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lungcad.data.choices import GROUPINGS, LAYOUTS, SLICE_MODES
from lungcad.data.manifest import check_split_fractions
from lungcad.errors import InputError


@dataclass(frozen=True)
class GroupingSettings:
    """How scan-ordered 2D files are grouped into patients.

    Attributes:
        window: files compared across each cut on either side (1: direct neighbours only).
        min_similarity: least thumbnail correlation (Pearson, -1..1) that links two files.
        max_hash_distance: most differing bits (of 64) for two files to count as
            near-duplicates; 0 joins only images with identical hashes, -1 disables it.
        gap: files left out of the training side at each boundary between splits (similarity
            grouping only: its cuts are estimates, while blocks are exact by construction).
    """

    window: int = 3
    min_similarity: float = 0.5
    max_hash_distance: int = 4
    gap: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise InputError(f"grouping window must be >= 1; got {self.window}", "--group-window")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise InputError(
                f"min_similarity must be in [-1, 1]; got {self.min_similarity}",
                "--group-min-similarity",
            )
        if not -1 <= self.max_hash_distance <= 64:
            raise InputError(
                f"max_hash_distance must be in [-1, 64]; got {self.max_hash_distance}",
                "--group-hash-distance",
            )
        if self.gap < 0:
            raise InputError(f"gap must be >= 0; got {self.gap}", "--group-gap")


DEFAULT_BLOCK_SIZE = {"classfolders": 20, "imagemask": 10}
# Least tumour area (mm^2) on a slice for the slice to be labelled cancerous (3D sets): about
# a 3.6 mm disc, i.e. ~16 pixels at 0.8 mm; smaller edge slivers get label -1 (unknown).
DEFAULT_MIN_TUMOUR_AREA_MM2 = 10.0


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
        pixel_spacing_mm: 2D sets: the pixel size of every image in mm, when the data set's
            description gives it (e.g. 2 for the MSD lung patches, resampled to 2 mm). It
            lets a model trained on the set segment CT at the same physical scale. None:
            unknown (JPEG/PNG files carry no spacing).
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
    pixel_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUTS):
            raise InputError(
                f"layout must be 'auto' or one of {LAYOUTS}; got {self.layout!r}", "--layout"
            )
        if self.pixel_spacing_mm is not None and not (
            math.isfinite(self.pixel_spacing_mm) and 0 < self.pixel_spacing_mm <= 20
        ):
            raise InputError(
                f"pixel spacing must be in (0, 20] mm; got {self.pixel_spacing_mm}",
                "--pixel-spacing",
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
