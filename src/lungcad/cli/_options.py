"""Options that several subcommands share, defined once.

``lungcad prepare`` reads a dataset folder, and ``lungcad evaluate`` reads a raw one the same
way (it prepares it on the fly), so both take the options of
:class:`lungcad.data.layouts.common.PrepareSettings` from :func:`add_prepare_options` and
build the settings with :func:`prepare_settings`. These options default to None: a value not
given keeps the library's default, which is defined only there (the help texts quote it).

Every ``choices=`` is a tuple of the library's own, so a subcommand offers exactly what the
library accepts. (The layout names live in :mod:`lungcad.data.layouts.common`, which imports
the image readers: building the parser costs about half a second more than the import-free
``choices`` modules would.) Not a subcommand: the leading underscore keeps it out of the
discovery in :mod:`lungcad.cli`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lungcad.data.choices import GROUPINGS, LAYOUTS, SLICE_MODES
from lungcad.data.layouts.settings import DEFAULT_BLOCK_SIZE, GroupingSettings, PrepareSettings

_SETTINGS = PrepareSettings()
_GROUPING = GroupingSettings()
#: ``--option`` dest -> GroupingSettings field.
_GROUPING_OPTIONS = {
    "group_window": "window",
    "group_min_similarity": "min_similarity",
    "group_hash_distance": "max_hash_distance",
    "group_gap": "gap",
}
#: PrepareSettings fields set from options of the same name (``seed`` comes from the command).
_SETTING_OPTIONS = (
    "layout",
    "positive",
    "negative",
    "val_fraction",
    "test_fraction",
    "grouping",
    "block_size",
    "slices",
    "negative_ratio",
    "min_negatives",
    "min_tumour_area_mm2",
    "pixel_spacing_mm",
)


def comma_separated(text: str) -> tuple[str, ...]:
    """A comma-separated list option as a tuple of stripped, non-empty names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_prepare_options(
    parser: argparse.ArgumentParser, title: str, description: str | None = None
) -> None:
    """The options of :class:`~lungcad.data.layouts.common.PrepareSettings`, as one group.

    Args:
        parser: the subcommand's parser; it defines ``--seed`` itself (the split seed).
        title: heading of the group in ``--help``.
        description: one line under the heading.
    """
    group = parser.add_argument_group(title, description)
    group.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        help=f"dataset layout (default {_SETTINGS.layout}: detect from the folder)",
    )
    group.add_argument(
        "--positive",
        type=comma_separated,
        metavar="NAME[,NAME]",
        help="class folders: comma-separated folder names that are cancerous",
    )
    group.add_argument(
        "--negative",
        type=comma_separated,
        metavar="NAME[,NAME]",
        help="class folders: comma-separated folder names that are not cancerous",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        help=f"fraction of slices for validation (default {_SETTINGS.val_fraction})",
    )
    group.add_argument(
        "--test-fraction",
        type=float,
        help=f"fraction of slices for testing (default {_SETTINGS.test_fraction})",
    )
    group.add_argument(
        "--grouping",
        choices=GROUPINGS,
        help="2D sets without patient ids: similarity (a group ends where neighbouring images "
        "stop resembling each other; the class folders' default) or blocks of --block-size "
        "file numbers (the image/mask default)",
    )
    block_defaults = ", ".join(f"{n} for {layout}" for layout, n in DEFAULT_BLOCK_SIZE.items())
    group.add_argument(
        "--block-size",
        type=int,
        help=f"2D sets: files per group with block grouping (default {block_defaults}); "
        "giving it selects block grouping",
    )
    group.add_argument(
        "--group-window",
        type=int,
        help=f"similarity grouping: files compared across each cut (default {_GROUPING.window})",
    )
    group.add_argument(
        "--group-min-similarity",
        type=float,
        help="similarity grouping: least thumbnail correlation that links two files "
        f"(default {_GROUPING.min_similarity})",
    )
    group.add_argument(
        "--group-hash-distance",
        type=int,
        help="most differing hash bits (of 64) for two files to count as near-duplicates "
        f"and share a group; -1: off (default {_GROUPING.max_hash_distance})",
    )
    group.add_argument(
        "--group-gap",
        type=int,
        help="similarity grouping: files left out of the training side at each split "
        f"boundary (default {_GROUPING.gap})",
    )
    group.add_argument(
        "--slices",
        choices=SLICE_MODES,
        help="3D sets: tumour slices plus a sample of non-tumour lung slices (tumour, "
        "default), every lung slice (lung) or every slice (all)",
    )
    group.add_argument(
        "--negative-ratio",
        type=float,
        help="--slices tumour: non-tumour slices kept per tumour slice "
        f"(default {_SETTINGS.negative_ratio})",
    )
    group.add_argument(
        "--min-negatives",
        type=int,
        help="--slices tumour: at least this many non-tumour slices per scan "
        f"(default {_SETTINGS.min_negatives})",
    )
    group.add_argument(
        "--min-tumour-area-mm2",
        type=float,
        help="3D sets: a slice with tumour is labelled cancerous (1) only when the tumour "
        f"covers at least this many mm^2 (default {_SETTINGS.min_tumour_area_mm2:g}); slices "
        "with less keep their mask but get label -1 (unknown), so the classifier skips them. "
        "0: any tumour voxel makes the slice 1",
    )
    group.add_argument(
        "--pixel-spacing",
        dest="pixel_spacing_mm",
        type=float,
        metavar="MM",
        help="2D sets: the pixel size of the images in mm, when the data set states it "
        "(e.g. 2 for the MSD lung patches); recorded so segmentation runs at that scale",
    )


def prepare_settings(args: argparse.Namespace) -> PrepareSettings:
    """The settings of :func:`add_prepare_options`' options and the command's ``--seed``.

    Raises:
        InputError: a value the settings refuse (they name the option).
    """
    given: dict[str, Any] = {
        name: getattr(args, name) for name in _SETTING_OPTIONS if getattr(args, name) is not None
    }
    grouping = {
        field: getattr(args, dest)
        for dest, field in _GROUPING_OPTIONS.items()
        if getattr(args, dest) is not None
    }
    return PrepareSettings(seed=args.seed, grouping_settings=GroupingSettings(**grouping), **given)


def add_checkpoint_option(parser: argparse.ArgumentParser, *, ensembles: bool = True) -> None:
    """``--checkpoint``: a run folder, or (where ``ensembles``) a cross-validation folder."""
    what = "run folder written by `lungcad train` (or its best.pt)"
    if ensembles:
        what += ", or a `lungcad validate --folds` folder (the fold ensemble)"
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help=what)


def add_dicomweb_auth_options(group: argparse._ArgumentGroup, prefix: str = "") -> None:
    """``--user``, ``--password[-file]``, ``--token[-file]`` of a DICOMweb server (basic auth or
    bearer token; secrets default to $LUNGCAD_PACS_PASSWORD / $LUNGCAD_PACS_TOKEN so they need
    not appear in a process list). ``prefix`` starts each help text (e.g. "STOW-RS: ")."""
    group.add_argument("--user", help=f"{prefix}HTTP basic-auth user name")
    group.add_argument(
        "--password",
        default=os.environ.get("LUNGCAD_PACS_PASSWORD"),
        help=f"{prefix}basic-auth password (default: $LUNGCAD_PACS_PASSWORD)",
    )
    group.add_argument(
        "--password-file", type=Path, help=f"{prefix}read the password from this file"
    )
    group.add_argument(
        "--token",
        default=os.environ.get("LUNGCAD_PACS_TOKEN"),
        help=f"{prefix}bearer token (default: $LUNGCAD_PACS_TOKEN)",
    )
    group.add_argument(
        "--token-file", type=Path, help=f"{prefix}read the bearer token from this file"
    )
