"""``lungcad prepare``: a public dataset layout -> manifest.csv + .npy slices + summary.json."""

from __future__ import annotations

import argparse

NAME = "prepare"
HELP = "turn a dataset folder (MSD, LUNA16, class folders, image/mask) into a slice manifest"

EPILOG = """examples:
  lungcad prepare --data iqothnccd --out prep_iq \\
      --positive "Malignant cases" --negative "Normal cases,Bengin cases"
  lungcad prepare --data msd_lung_patches --out prep_msd
  lungcad prepare --data Task06_Lung --out prep_task06 --slices tumour
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad prepare``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--data", required=True, help="dataset folder to read")
    parser.add_argument(
        "--out", required=True, help="output folder (new, empty, or an earlier prepare output)"
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "msd", "luna16", "classfolders", "imagemask"],
        help="dataset layout (default: detect from the folder)",
    )
    parser.add_argument(
        "--positive",
        type=_names,
        default=(),
        help="class folders: comma-separated folder names that are cancerous",
    )
    parser.add_argument(
        "--negative",
        type=_names,
        default=(),
        help="class folders: comma-separated folder names that are not cancerous",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="fraction of slices for validation (default 0.15)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="fraction of slices for testing (default 0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and sampling")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="2D sets: files per group, contiguous file numbers "
        "(default 20 for class folders, 10 for image/mask)",
    )
    parser.add_argument(
        "--slices",
        default="tumour",
        choices=["tumour", "all", "lung"],
        help="3D sets: tumour slices plus a sample of non-tumour lung slices "
        "(tumour, default), every lung slice (lung) or every slice (all)",
    )
    parser.add_argument(
        "--negative-ratio",
        type=float,
        default=1.0,
        help="--slices tumour: non-tumour slices kept per tumour slice (1.0)",
    )
    parser.add_argument(
        "--min-negatives",
        type=int,
        default=8,
        help="--slices tumour: at least this many non-tumour slices per scan",
    )
    parser.add_argument(
        "--min-tumour-area-mm2",
        type=float,
        default=None,
        help="3D sets: a slice with tumour is labelled cancerous (1) only when "
        "the tumour covers at least this many mm^2 (default 10); slices "
        "with less keep their mask but get label -1 (unknown), so the "
        "classifier skips them. 0: any tumour voxel makes the slice 1",
    )


def _print_table(counts: dict[str, dict[str, int]]) -> None:
    columns = list(next(iter(counts.values())))
    print(f"{'split':<7}" + "".join(f"{c:>10}" for c in columns))
    for split, row in counts.items():
        print(f"{split:<7}" + "".join(f"{row[c]:>10}" for c in columns))


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset, print counts per split and label; 0 on success."""
    from lungcad.data.layouts.common import PrepareSettings
    from lungcad.data.layouts.prepare import prepare_dataset

    settings = PrepareSettings(
        layout=args.layout,
        positive=args.positive,
        negative=args.negative,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        block_size=args.block_size,
        slices=args.slices,
        negative_ratio=args.negative_ratio,
        min_negatives=args.min_negatives,
        # None: PrepareSettings' default, defined there only
        **(
            {}
            if args.min_tumour_area_mm2 is None
            else {"min_tumour_area_mm2": args.min_tumour_area_mm2}
        ),
    )
    result = prepare_dataset(args.data, args.out, settings)
    summary = result.summary
    print(f"prepared {summary['layout']} dataset {summary['input']}")
    print(
        f"-> {result.out / 'manifest.csv'} ({len(result.records)} slices, "
        f"{summary['counts']['total']['groups']} groups; label 1 = cancerous, "
        "-1 = unknown)"
    )
    _print_table(summary["counts"])
    if summary["warnings"]:
        print(f"{len(summary['warnings'])} warning(s) logged above and kept in summary.json")
    return 0
