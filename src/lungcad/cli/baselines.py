"""``lungcad baselines``: radiomics/handcrafted features + scikit-learn models, with external sets.

Trains each baseline on the training split of one prepared dataset (tuning by patient-grouped
cross-validation, threshold from out-of-fold predictions), then scores it on that dataset's
test split (``internal``) and on whole other prepared datasets (external hospitals), so the
generalisation gap is visible next to the deep model's results.

Outputs in ``--out``: ``metrics.json`` (per ``model/set`` flat metrics plus settings),
``metrics.md`` (a Markdown table) and ``models/<model>.joblib`` (fitted Pipeline, threshold and
feature names; joblib files are pickles, so load only your own). Each file is written
atomically. Features are cached under ``--cache-dir`` (default ``OUT/feature_cache``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from lungcad.cli._options import comma_separated
from lungcad.training.choices import THRESHOLD_METHODS
from lungcad.validation.baselines.choices import FEATURE_KINDS, MODEL_NAMES, ROI_KINDS, SCORINGS

NAME = "baselines"
HELP = "train and evaluate radiomics + scikit-learn baselines (internal and external sets)"

RESERVED_SETS = ("train", "train_cv", "internal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad baselines``."""
    parser.add_argument(
        "--train",
        required=True,
        type=Path,
        metavar="MANIFEST_DIR",
        help="prepared dataset (folder with manifest.csv): its train split "
        "trains, its test split is the internal test set",
    )
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=MANIFEST_DIR",
        help="external dataset scored in full (all splits); repeatable",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument(
        "--features",
        default="handcrafted",
        choices=FEATURE_KINDS,
        help="feature family",
    )
    parser.add_argument(
        "--roi",
        default="lung",
        choices=ROI_KINDS,
        help="feature region: lung mask (default), whole slice, or tumour mask "
        "(leaks the label for classification; for analysis only)",
    )
    parser.add_argument(
        "--models",
        type=comma_separated,
        default=MODEL_NAMES,
        help=f"comma-separated models among {','.join(MODEL_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--train-splits",
        default="train",
        help="comma-separated splits used for training and CV, e.g. train,val",
    )
    parser.add_argument("--scoring", default="roc_auc", choices=SCORINGS, help="grid-search score")
    parser.add_argument(
        "--threshold-method",
        default="mcc",
        choices=THRESHOLD_METHODS,
        help="how the threshold is chosen on out-of-fold training predictions",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="patient-level bootstrap replicates for CIs (0: no CIs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of folds, models, bootstrap")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache folder (default OUT/feature_cache)",
    )


def _parse_eval(items: list[str]) -> dict[str, Path]:
    from lungcad.errors import InputError

    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InputError(
                f"--eval expects NAME=MANIFEST_DIR (e.g. external=prepared/hospB); got {item!r}",
                "--eval",
            )
        if name in RESERVED_SETS or name in out or "/" in name:
            raise InputError(
                f"--eval name {name!r} is reserved, repeated or has a '/'; "
                f"pick another (reserved: {', '.join(RESERVED_SETS)})",
                "--eval",
            )
        out[name] = Path(path)
    return out


def run(args: argparse.Namespace) -> int:
    """Compute features, fit and evaluate the baselines, write the outputs."""
    import joblib
    import sklearn

    from lungcad import __version__
    from lungcad.errors import InputError
    from lungcad.io.atomic import atomic_path, write_json_atomic, write_text_atomic
    from lungcad.validation.baselines.pipelines import (
        baselines_markdown,
        run_baselines_on_manifests,
    )

    if args.features != "handcrafted":
        # pyradiomics sets its logger to INFO when imported and then logs every extraction
        # step; import it first, then quieten it so the run's log stays readable.
        with contextlib.suppress(ImportError):
            import radiomics  # noqa: F401
        logging.getLogger("radiomics").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    models = list(args.models)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if not models or unknown:
        raise InputError(
            f"unknown model(s) {unknown or models}; choose among {','.join(MODEL_NAMES)}",
            "--models",
        )
    if args.n_boot < 0:
        raise InputError(f"--n-boot must be >= 0; got {args.n_boot}", "--n-boot")
    train_splits = [s.strip() for s in args.train_splits.split(",") if s.strip()]
    if "test" in train_splits:
        raise InputError(
            "--train-splits must not include 'test' (it is the internal test set)", "--train-splits"
        )
    externals = _parse_eval(args.eval)

    result = run_baselines_on_manifests(
        args.train,
        externals,
        features=args.features,
        roi=args.roi,
        models=models,
        train_splits=train_splits,
        cache_dir=args.cache_dir or args.out / "feature_cache",
        scoring=args.scoring,
        threshold_method=args.threshold_method,
        n_boot=args.n_boot,
        seed=args.seed,
        n_jobs=args.jobs,
        progress=print,
    )
    fitted, metrics, names = result.fitted, result.metrics, result.feature_names

    summary = {
        "lungcad_version": __version__,
        "sklearn_version": sklearn.__version__,
        "settings": {
            "features": args.features,
            "roi": args.roi,
            "models": models,
            "train_splits": train_splits,
            "scoring": args.scoring,
            "threshold_method": args.threshold_method,
            "n_boot": args.n_boot,
            "seed": args.seed,
            "n_features": len(names),
        },
        "data": {
            name: {"manifest": str(result.manifests[name]), **counts}
            for name, counts in result.set_summary().items()
        },
        "models": {
            name: {
                "threshold": f.threshold,
                "best_params": f.best_params,
                "cv_score": f.cv_score,
                "scoring": f.scoring,
            }
            for name, f in fitted.items()
        },
        "metrics": {
            f"{model}/{set_name}": m
            for model, per_set in metrics.items()
            for set_name, m in per_set.items()
        },
    }
    out = Path(args.out)
    for name, f in fitted.items():
        with atomic_path(out / "models" / f"{name}.joblib") as tmp:
            joblib.dump(
                {
                    "pipeline": f.pipeline,
                    "threshold": f.threshold,
                    "feature_names": names,
                    "features": args.features,
                    "roi": args.roi,
                    "best_params": f.best_params,
                    "lungcad_version": __version__,
                    "sklearn_version": sklearn.__version__,
                },
                tmp,
            )
    table = baselines_markdown(metrics)
    write_text_atomic(
        out / "metrics.md",
        f"# Baselines ({args.features} features, ROI {args.roi})\n\n"
        "Threshold chosen on out-of-fold training predictions; `train_cv` = "
        "out-of-fold. Brackets: patient-level bootstrap 95% CI.\n\n" + table,
    )
    write_json_atomic(out / "metrics.json", summary)
    print(table)
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {len(fitted)} models")
    return 0
