"""``lungcad prepare``: a public dataset layout -> manifest.csv + .npy slices + summary.json."""

from __future__ import annotations

import argparse

from lungcad.cli._options import add_prepare_options, prepare_settings

NAME = "prepare"
HELP = "turn a dataset folder (MSD, LUNA16, class folders, image/mask) into a slice manifest"

EPILOG = """examples:
  lungcad prepare --data iqothnccd --out prep_iq \\
      --positive "Malignant cases" --negative "Normal cases,Bengin cases"
  lungcad prepare --data msd_lung_patches --out prep_msd
  lungcad prepare --data Task06_Lung --out prep_task06 --slices tumour
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad prepare``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--data", required=True, help="dataset folder to read")
    parser.add_argument(
        "--out", required=True, help="output folder (new, empty, or an earlier prepare output)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and sampling")
    add_prepare_options(parser, "how the dataset is read and split")


def _print_table(counts: dict[str, dict[str, int]]) -> None:
    columns = list(next(iter(counts.values())))
    print(f"{'split':<7}" + "".join(f"{c:>10}" for c in columns))
    for split, row in counts.items():
        print(f"{split:<7}" + "".join(f"{row[c]:>10}" for c in columns))


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset, print counts per split and label; 0 on success."""
    from lungcad.data.layouts.prepare import prepare_dataset

    result = prepare_dataset(args.data, args.out, prepare_settings(args))
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
