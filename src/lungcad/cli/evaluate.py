"""``lungcad evaluate``: score a trained run on a dataset and write an evaluation folder.

The data is a prepared folder (``lungcad prepare`` output, or its manifest.csv) or a raw
dataset folder in any layout ``prepare`` reads (prepared into a temporary folder first).
The decision threshold is the run's own (chosen on its validation split), never tuned on the
evaluated data; evaluation.json records where it (and a calibration) was chosen and whether
those rows are the evaluated ones (``tuned_on_evaluated_data``, ``fitted_on_evaluated_data``).

Outputs in ``--out``: metrics.json (flat, with patient-level 95% CIs), predictions.csv,
evaluation.json (provenance), confusion_matrix.png, roc.png, calibration.png, dice.png,
examples/*.png and examples.png (overlays). ``lungcad report OUT`` renders them as HTML.
"""

from __future__ import annotations

import argparse
import math

from lungcad.cli._options import add_checkpoint_option, add_prepare_options, prepare_settings
from lungcad.evaluation.choices import SPLIT_CHOICES
from lungcad.training.choices import DEVICES

NAME = "evaluate"
HELP = "evaluate a trained run on a prepared or raw dataset (metrics, CIs, plots, overlays)"

EPILOG = """examples:
  lungcad evaluate --checkpoint runs/cls --data prepared/msd --out eval/internal
  lungcad evaluate --checkpoint runs/cls --data prepared/hospB --split all --out eval/hospB
  lungcad evaluate --checkpoint runs/cls --data iqothnccd_extra --out eval/iq \\
      --positive "Malignant cases" --negative "Normal cases,Bengin cases"
"""

SUMMARY_KEYS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "f1",
    "mcc",
    "kappa",
    "auc",
    "dice",
    "iou",
    "hd95",
    "lesion_sensitivity",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad evaluate``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_checkpoint_option(parser)
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="prepared folder / manifest.csv, or a raw dataset folder",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="evaluation folder to write (new, empty or an earlier evaluation)",
    )
    parser.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default=None,
        help="rows to evaluate (default: test for prepared data, all for raw)",
    )
    add_prepare_options(
        parser,
        "raw data (see lungcad prepare)",
        "how a raw dataset folder is prepared before it is evaluated; ignored for prepared data",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="patient-level bootstrap replicates for CIs (0: none)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap (and of a raw set's split)"
    )
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto: CUDA when torch sees a GPU"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each slice with its left-right mirror (flip test-time augmentation)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=2,
        help="overlay examples per TP/FP/FN/TN category (0: none)",
    )


def _fmt(metrics: dict[str, float], key: str) -> str:
    value = metrics[key]
    text = "n/a" if not math.isfinite(value) else f"{value:.3f}"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" ({low:.3f}-{high:.3f})"
    return text


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the main metrics; 0 on success."""
    from lungcad.evaluation.evaluate import evaluate_run

    result = evaluate_run(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        prepare_settings=prepare_settings(args),
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        n_examples=args.examples,
        tta=args.tta,
    )
    info, metrics = result.info, result.metrics
    data = info["data"]
    print(
        f"evaluated {info['checkpoint']['path']} on {data['n_slices']} slices "
        f"({data['n_groups']} groups, split {data['split']}) of {data['input']}"
    )
    threshold = info["threshold"]
    if threshold["value"] is not None:
        print(
            f"decision threshold {threshold['value']:.3f} (from "
            f"{threshold['source']}, chosen on {threshold['chosen_on']})"
        )
        if threshold.get("tuned_on_evaluated_data"):
            print("warning: the threshold was chosen on these rows: not a held-out result")
    calibration = info.get("calibration", {})
    if calibration.get("applied"):
        print(
            f"probabilities calibrated ({calibration['method']}, {calibration['file']}), "
            "as `lungcad predict` applies them"
        )
        if calibration.get("fitted_on_evaluated_data"):
            print("warning: the calibration was fitted on these rows: not a held-out result")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<20}{_fmt(metrics, key)}")
    for note in info["notes"]:
        print(f"note: {note}")
    print(
        f"wrote {result.out_dir} (metrics.json, predictions.csv, plots); "
        f"render it with `lungcad report {result.out_dir} --out report.html`"
    )
    return 0
