"""``lungcad calibrate``: fit probability calibration for a run on its validation split.

Example::

    lungcad calibrate --checkpoint runs/cls --manifest prepared/iqothnccd --method temperature

Writes ``RUN/calibration.json`` (the map from logits to probabilities and the decision
threshold re-chosen on the calibrated validation probabilities); ``lungcad predict`` applies
it from then on. Delete the file to go back to uncalibrated probabilities.

With ``--studies VAL`` (validation studies in the MSD layout) it chooses the **study**
threshold instead: the predictor runs on every study and the threshold on the study
probabilities is chosen by ``--threshold-method``; it is written as
``RUN/study_threshold.json`` (with the studies it was chosen on), and ``lungcad predict``
decides 3D studies with it from then on. Run it after any ``--manifest`` calibration, which
changes the study probabilities (a stale study threshold is refused)::

    lungcad calibrate --checkpoint runs/cls --studies cohort_val/msd
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lungcad.data.manifest import SPLITS
from lungcad.evaluation.choices import CALIBRATION_METHODS
from lungcad.training.choices import THRESHOLD_METHODS

NAME = "calibrate"
HELP = "fit temperature or isotonic calibration of the cancer probability on validation data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad calibrate``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="run folder written by `lungcad train cls`",
    )
    parser.add_argument(
        "--manifest",
        default=None,
        action="append",
        metavar="DIR_OR_CSV",
        help="prepared data (folder or manifest.csv); repeat to combine sets (or give --studies)",
    )
    parser.add_argument(
        "--studies",
        default=None,
        metavar="DIR",
        help="validation studies (3D, MSD layout): choose the study-level threshold on them "
        "and write RUN/study_threshold.json, instead of a slice calibration",
    )
    parser.add_argument(
        "--method",
        choices=CALIBRATION_METHODS,
        default="temperature",
        help="temperature scaling (1 parameter, default) or isotonic regression",
    )
    parser.add_argument(
        "--split",
        default=None,
        choices=SPLITS,
        help="split to fit on (default val; test is refused: results are reported on it); "
        "with --studies, the split of the run's own prepared dataset (other folders: whole)",
    )
    parser.add_argument(
        "--threshold-method",
        choices=THRESHOLD_METHODS,
        default=None,
        help="rule for the new threshold (default: the run's own)",
    )


def run(args: argparse.Namespace) -> int:
    """Fit, store and summarise the calibration."""
    from lungcad.errors import InputError

    if (args.manifest is None) == (args.studies is None):
        raise InputError(
            "give either --manifest (slice calibration) or --studies (study threshold)",
            "--manifest",
        )
    if args.studies is not None:
        return _run_studies(args)
    from lungcad.evaluation.calibration import CALIBRATION_FILE, calibrate_run

    cal = calibrate_run(
        args.checkpoint,
        args.manifest,
        args.method,
        split=args.split or "val",
        threshold_method=args.threshold_method,
    )
    info = cal.info
    print(
        f"{args.method} calibration on {info['n']} {args.split or 'val'} slices "
        f"({info['n_positive']} cancerous)"
        + (f": temperature {cal.temperature:.3f}" if cal.temperature else "")
    )
    for key in ("nll", "ece", "brier"):
        print(
            f"  {key.upper():<6}{info[f'{key}_before']:.4f} -> {info[f'{key}_after']:.4f} "
            "(in-sample)"
        )
    print(
        f"  threshold {info['threshold_uncalibrated']:.4f} (uncalibrated) -> "
        f"{cal.threshold:.4f} (calibrated, {info['threshold_method']})"
    )
    run_dir = Path(args.checkpoint)
    print(f"wrote {(run_dir if run_dir.is_dir() else run_dir.parent) / CALIBRATION_FILE}")
    return 0


def _run_studies(args: argparse.Namespace) -> int:
    """``--studies``: choose and store the study threshold."""
    from lungcad.inference.study_evaluation import choose_run_study_threshold

    chosen = choose_run_study_threshold(
        args.checkpoint, args.studies, split=args.split, method=args.threshold_method
    )
    st, on = chosen.threshold, chosen.threshold.chosen_on
    fit = st.info["in_sample"]
    print(
        f"study threshold {st.threshold:.4f} ({st.method}) chosen on {on['n_studies']} "
        f"validation studies ({on['n_positive']} with tumour, split {on['split']}) of "
        f"{on['input']}; "
        f"the slice threshold was {st.info['slice_threshold']:.4f}"
    )
    print(
        f"  in-sample: sensitivity {fit['sensitivity']:.3f}, specificity "
        f"{fit['specificity']:.3f}, AUC {fit['auc']:.3f} (not held-out figures)"
    )
    print(f"wrote {chosen.path}")
    return 0
