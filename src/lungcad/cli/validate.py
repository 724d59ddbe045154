"""``lungcad validate``: the external-validation protocol and the generalisation-gap table.

Trains the deep model on prepared dataset A (stage seg, then cls from it, as the data
allows; model selection and threshold on A's val split), evaluates it on A's train split,
A's held-out test split (internal) and each external dataset in full, trains and scores the
traditional-ML baselines on the same data, and writes the gap table (gap.md, gap.json,
gap.png) with every part's folder and validation.json (see lungcad.validation.protocol).

``--folds K`` instead cross-validates on dataset A alone (a seg config: stage 1, see
:mod:`lungcad.validation.seg_crossval`; a cls config: stage 2): grouped K-fold folds over its
patient groups (its own splits are ignored), the deep model trained once per fold, the
baselines and a shortcut audit (a classifier on acquisition metadata alone) on the same
folds, every figure out-of-fold with patient-group CIs; the K fold runs form an ensemble that
``--checkpoint OUT`` accepts (see lungcad.validation.crossval).

``--synthetic`` first makes the synthetic site-shift experiment: an internal and a shifted
external cohort (lungcad.data.synthetic), prepared to manifests, then runs the same protocol
with a small CPU configuration (lungcad.validation.protocol.SYNTHETIC_OVERRIDES, unless
--config is given; --set applies on top).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from lungcad.cli._options import comma_separated
from lungcad.training.choices import DEVICES
from lungcad.validation.baselines.choices import FEATURE_KINDS, MODEL_NAMES, ROI_KINDS

if TYPE_CHECKING:
    from lungcad.training.config import Config

NAME = "validate"
log = logging.getLogger("lungcad.validate")

HELP = "train on one dataset, test internally and externally, baselines, generalisation gap"

EPILOG = """examples:
  lungcad validate --train prepared/hospA --external hospB=prepared/hospB \\
      --config configs/cls_cpu_small.yaml --out validation/AB
  lungcad validate --train prepared/iqothnccd --folds 5 \
      --config configs/cls_cpu_cv.yaml --out validation/iq_cv
  lungcad validate --synthetic --out validation/synthetic --cases 16 --n-boot 200
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad validate``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--train",
        metavar="MANIFEST_A",
        help="prepared dataset with train/val/test splits (training site)",
    )
    parser.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="[NAME=]MANIFEST",
        help="prepared external dataset, evaluated in full; repeatable",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty folder")
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        metavar="K",
        help="grouped K-fold cross-validation on --train alone (deep model, baselines, "
        "shortcut audit, fold ensemble) instead of the train/test/external protocol",
    )
    parser.add_argument("--config", metavar="YAML", help="training config (both stages)")
    parser.add_argument(
        "--cls-config", metavar="YAML", help="another training config for the cls stage"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for both stages",
    )
    parser.add_argument(
        "--baselines",
        type=comma_separated,
        default=MODEL_NAMES,
        help=f"comma-separated baselines among {','.join(MODEL_NAMES)}, or none (default: all)",
    )
    parser.add_argument(
        "--features",
        default="handcrafted",
        choices=FEATURE_KINDS,
        help="baseline features",
    )
    parser.add_argument(
        "--roi",
        default="lung",
        # Not the tumour mask: for a cancer/no-cancer classifier it leaks the label.
        choices=tuple(roi for roi in ROI_KINDS if roi != "mask"),
        help="baseline feature region",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="patient-level bootstrap replicates for CIs (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap/baseline/cohort seed")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="evaluation device (default: the config's train.device)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the baselines")
    synthetic = parser.add_argument_group("synthetic site-shift experiment")
    synthetic.add_argument(
        "--synthetic",
        action="store_true",
        help="make internal + external synthetic cohorts and validate",
    )
    synthetic.add_argument("--cases", type=int, default=16, help="internal patients")
    synthetic.add_argument(
        "--external-cases", type=int, default=None, help="external patients (default: --cases)"
    )
    synthetic.add_argument(
        "--matrix",
        type=int,
        default=None,
        help="in-plane matrix of the synthetic scans (default 128)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the protocol and print the gap table; 0 on success."""
    from lungcad.errors import InputError
    from lungcad.training.config import load_config
    from lungcad.validation.protocol import (
        SYNTHETIC_OVERRIDES,
        parse_externals,
        run_synthetic_validation,
        run_validation,
    )

    models = [] if [m.lower() for m in args.baselines] == ["none"] else list(args.baselines)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise InputError(
            f"unknown baseline(s) {unknown}; choose among {','.join(MODEL_NAMES)} or none",
            "--baselines",
        )
    if args.n_boot < 0:
        raise InputError(f"--n-boot must be >= 0; got {args.n_boot}", "--n-boot")
    options = {
        "baselines": models,
        "features": args.features,
        "roi": args.roi,
        "n_boot": args.n_boot,
        "seed": args.seed,
        "device": args.device,
        "batch_size": args.batch_size,
        "jobs": args.jobs,
    }
    # The synthetic experiment's small CPU settings stand in for a config file, so they apply
    # only when none is given (load_config applies overrides after the file).
    base = list(SYNTHETIC_OVERRIDES) if args.synthetic and not args.config else []
    config = load_config(args.config, base + args.overrides)
    cls_config = load_config(args.cls_config, args.overrides) if args.cls_config else None
    if args.folds is not None:
        return _cross_validate(args, config, models)
    if args.synthetic:
        if args.train or args.external:
            raise InputError(
                "--synthetic makes its own data; drop --train/--external", "--synthetic"
            )
        result = run_synthetic_validation(
            args.out,
            config=config,
            n_cases=args.cases,
            n_external=args.external_cases,
            matrix=args.matrix,
            cls_config=cls_config,
            **options,
        )
    else:
        if not args.train:
            raise InputError(
                "pass --train MANIFEST_A (and --external MANIFEST for external "
                "validation), or --synthetic",
                "--train",
            )
        if not args.external:
            log.warning(
                "no --external set: the table compares train and internal (held-out "
                "patients of the same site) only; that is not external validation"
            )
        result = run_validation(
            args.train,
            parse_externals(args.external),
            config,
            args.out,
            cls_config=cls_config,
            **options,
        )
    print(result.gap.to_markdown())
    print(
        f"wrote {result.out_dir} (gap.md, gap.json, gap.png, validation.json); render it "
        f"with `lungcad report {result.out_dir} --out report.html`"
    )
    return 0


def _cross_validate(args: argparse.Namespace, config: Config, models: list[str]) -> int:
    """``--folds K``: :func:`lungcad.validation.crossval.cross_validate`; 0 on success."""
    from lungcad.errors import InputError
    from lungcad.validation.crossval import cross_validate

    if not args.train or args.external or args.synthetic or args.cls_config:
        raise InputError(
            "--folds cross-validates --train alone; drop --external, --synthetic and --cls-config",
            "--folds",
        )
    if config.train.stage == "seg":
        from lungcad.validation.seg_crossval import cross_validate_segmentation

        seg = cross_validate_segmentation(
            args.train,
            args.out,
            config,
            k=args.folds,
            seed=args.seed,
            n_boot=args.n_boot,
            progress=lambda line: log.info("%s", line),
        )
        print((seg.out_dir / "results.md").read_text(encoding="utf-8"), end="")
        print(
            f"wrote {seg.out_dir} (results.md, seg_cv_metrics.json, oof_segmentation.csv, "
            f"ensemble.json, fold*/run)"
        )
        return 0
    result = cross_validate(
        args.train,
        args.out,
        config,
        k=args.folds,
        seed=args.seed,
        baselines=models,
        features=args.features,
        n_boot=args.n_boot,
        progress=lambda line: log.info("%s", line),
    )
    print((result.out_dir / "results.md").read_text(encoding="utf-8"), end="")
    print(
        f"wrote {result.out_dir} (results.md, cv_metrics.json, oof_predictions.csv, "
        f"ensemble.json, fold*/run); use it as --checkpoint {result.out_dir}"
    )
    return 0
