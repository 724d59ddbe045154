"""``lungcad evaluate``: score a trained run on a dataset and write an evaluation folder.

The data is a prepared folder (``lungcad prepare`` output, or its manifest.csv) or a raw
dataset folder in any layout ``prepare`` reads (prepared into a temporary folder first).
The decision threshold is the run's own (chosen on its validation split), never tuned on the
evaluated data; evaluation.json records where it (and a calibration) was chosen and whether
those rows are the evaluated ones (``tuned_on_evaluated_data``, ``fitted_on_evaluated_data``).

Outputs in ``--out``: metrics.json (flat, with patient-level 95% CIs), predictions.csv,
evaluation.json (provenance), confusion_matrix.png, roc.png, calibration.png, dice.png,
examples/*.png and examples.png (overlays). ``lungcad report OUT`` renders them as HTML.

With ``--studies DIR`` (3D studies in the MSD layout, e.g. a ``lungcad synth`` cohort) the
whole-study predictor of ``lungcad predict`` runs on every study instead
(:mod:`lungcad.inference.study_evaluation`): per-study sensitivity, specificity and AUC with
patient bootstrap CIs, 3D Dice and HD95 (mm; a missed tumour counts as Dice 0 and as the
volume's diagonal), lesion sensitivity and false positives per study, in study_metrics.json,
per_study.csv, study_evaluation.json and roc.png.
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
  lungcad evaluate --checkpoint runs/cls --studies cohort_test/msd --out eval/studies
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
        default=None,
        metavar="PATH",
        help="prepared folder / manifest.csv, or a raw dataset folder (or give --studies)",
    )
    parser.add_argument(
        "--studies",
        default=None,
        metavar="DIR",
        help="3D studies in the MSD layout (imagesTr/labelsTr NIfTI): score whole-study "
        "decisions and 3D masks as `lungcad predict` makes them, instead of --data slices",
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
        help="rows to evaluate (default: test for prepared data, all for raw); with --studies, "
        "the split of the dataset the run was prepared from (default test; other folders: all)",
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
    from lungcad.errors import InputError

    if (args.data is None) == (args.studies is None):
        raise InputError("give either --data (slices) or --studies (3D studies)", "--data")
    if args.studies is not None:
        return _run_studies(args)
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


STUDY_SUMMARY = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("auc", "auc"),
    ("mcc", "mcc"),
    ("dice", "dice (3D)"),
    ("hd95_mm", "hd95 (mm)"),
    ("lesion_sensitivity", "lesion sensitivity"),
    ("fp_per_study", "FP lesions / study"),
)


def _run_studies(args: argparse.Namespace) -> int:
    """``--studies``: whole-study evaluation (lungcad.inference.study_evaluation)."""
    from lungcad.errors import InputError
    from lungcad.inference.study_evaluation import evaluate_studies

    if args.tta:
        raise InputError("--tta applies to --data slices, not to --studies", "--tta")

    result = evaluate_studies(
        args.checkpoint,
        args.studies,
        args.out,
        split=args.split,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
    )
    info, metrics = result.info, result.metrics
    threshold = info["threshold"]
    print(
        f"evaluated {info['checkpoint']['path']} on {info['data']['n_studies']} studies "
        f"({info['data']['n_with_tumour']} with tumour, split {info['data']['split']}) of "
        f"{info['data']['input']}"
    )
    print(
        f"study decision threshold {threshold['value']:.3f} ({threshold['source']}, "
        f"{threshold['level']} level; chosen on {threshold['chosen_on']})"
    )
    for key, label in STUDY_SUMMARY:
        if key in metrics:
            print(f"  {label:<20}{_fmt(metrics, key)}")
    if "n_missed_tumours" in metrics:
        print(
            f"  missed tumours      {metrics['n_missed_tumours']:.0f} of "
            f"{metrics['n_with_tumour']:.0f} studies (Dice 0, HD95 = volume diagonal); "
            f"lesions found {metrics['n_detected_lesions']:.0f} of "
            f"{metrics['n_ref_lesions']:.0f}"
        )
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"wrote {result.out_dir} (study_metrics.json, per_study.csv, study_evaluation.json)")
    return 0
