"""The external-validation protocol and the synthetic site-shift experiment.

``run_validation(train_manifest, externals, config, out_dir)``:

1. **Train** the deep model on prepared dataset A: stage "seg" on A's train split (when it has
   tumour masks in train and val), then stage "cls" started from it (when it has both labels
   in train and val). Model selection, early stopping and the decision threshold use A's
   val split only (:func:`lungcad.training.loop.train`).
2. **Evaluate** the final run (:func:`lungcad.evaluation.evaluate.evaluate_run`) on A's train
   split (how well it fits), A's held-out test split (``internal``: unseen patients, same
   site) and every external dataset in full (other sites), always at the threshold chosen on
   A's val.
3. **Baselines**: the traditional-ML models of :mod:`lungcad.validation.baselines.pipelines`
   on handcrafted (or radiomic) features, trained on A's train + val splits (the same data
   the deep model used: they tune and choose their threshold by patient-grouped
   cross-validation inside it), scored on the same internal and external sets.
4. **Gap table** (:mod:`lungcad.validation.gap`): every model's metrics on train / internal /
   external and the drop from internal to external.

The output folder::

    OUT/runs/seg, OUT/runs/cls         training run folders
    OUT/eval/<set>                     evaluation folders (train, internal, each external)
    OUT/baselines/metrics.json|md      baseline metrics per model and set
    OUT/feature_cache/                 cached baseline features
    OUT/gap.md, gap.json, gap.png      the generalisation-gap table
    OUT/validation.json                what was run, on what (hashes), where the parts are

``run_synthetic_validation(out_dir)`` first makes an internal and an external cohort with
:func:`lungcad.data.synthetic.write_cohort` (two scanner sites: noise, kernel, calibration, slice
thickness and field of view differ), prepares both with
:func:`lungcad.data.layouts.prepare_dataset` and then runs the protocol with a small CPU config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungcad import __version__
from lungcad.data.layouts.prepare import prepare_dataset
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.manifest import SliceRecord, check_no_group_leakage, manifest_csv, read_manifest
from lungcad.errors import InputError
from lungcad.evaluation.evaluate import evaluate_run
from lungcad.evaluation.folder import EvaluationResult
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.io.folders import check_output_dir
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import file_sha256
from lungcad.training.config import (
    Config,
    apply_overrides,
    config_hash,
    config_to_dict,
    load_config,
)
from lungcad.validation.baselines.choices import MODEL_NAMES
from lungcad.validation.baselines.pipelines import baselines_markdown, run_baselines_on_manifests
from lungcad.validation.gap import GapTable, gap_table, write_gap

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
RESERVED_SET_NAMES = ("train", "train_cv", "internal")
BASELINE_TRAIN_SPLITS = ("train", "val")

#: Small CPU settings for the synthetic experiment (used when no config file is given).
SYNTHETIC_OVERRIDES = (
    "model.name=resnet18",
    "model.image_size=128",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.epochs=6",
    "optim.lr=1e-3",
    "optim.warmup_epochs=0.5",
    "optim.patience=0",
    "train.device=auto",
    "train.progress=false",
)


@dataclass
class ValidationResult:
    """What :func:`run_validation` produced.

    Attributes:
        out_dir: the validation folder.
        runs: ``{"seg": run_dir, "cls": run_dir}`` (the stages that were trained).
        evaluations: ``{set: EvaluationResult}`` of the deep model.
        baselines: ``{model: {set: metrics}}`` (empty without baselines).
        gap: the generalisation-gap table.
    """

    out_dir: Path
    runs: dict[str, Path]
    evaluations: dict[str, EvaluationResult]
    baselines: dict[str, dict[str, dict[str, float]]]
    gap: GapTable


def parse_externals(items: Sequence[str]) -> dict[str, Path]:
    """``NAME=MANIFEST`` (or a bare path, named ``external``, ``external2``, ...) to a dict.

    Raises:
        InputError: empty name or path, a reserved or repeated name.
    """
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = f"external{len(out) + 1 if out else ''}", item
        name = name.strip()
        if not name or not path or "/" in name or name in RESERVED_SET_NAMES or name in out:
            raise InputError(
                f"--external expects NAME=MANIFEST_DIR or MANIFEST_DIR with a new "
                f"name that is not {', '.join(RESERVED_SET_NAMES)}; got {item!r}",
                "--external",
            )
        out[name] = Path(path)
    return out


def _stages(records: list[SliceRecord], config: Config) -> list[str]:
    """Which stages A supports: seg needs masks, cls both labels, in train and val."""
    splits = (config.data.train_split, config.data.val_split)
    stages = []
    if all(any(r.has_mask and r.split == s for r in records) for s in splits):
        stages.append("seg")
    if all({r.label for r in records if r.split == s} >= {0, 1} for s in splits):
        stages.append("cls")
    if not stages:
        raise InputError(
            f"the training manifest supports neither stage: 'seg' needs tumour masks and 'cls' "
            f"needs labels 0 and 1, in both the {splits[0]!r} and {splits[1]!r} splits",
            "--train",
        )
    return stages


def train_deep_model(
    train_manifest: Path,
    config: Config,
    runs_dir: Path,
    stages: Sequence[str],
    cls_config: Config | None = None,
) -> dict[str, Path]:
    """Train the stages on A (seg, then cls started from it) and return their run folders."""
    from lungcad.training.loop import train

    runs: dict[str, Path] = {}
    for stage in stages:
        base = cls_config if stage == "cls" and cls_config is not None else config
        train_overrides: dict[str, Any] = {"stage": stage, "out_dir": str(runs_dir / stage)}
        if stage == "cls" and "seg" in runs:
            train_overrides["init_from"] = str(runs["seg"])
        cfg = apply_overrides(
            base, {"data": {"manifest": [str(train_manifest)]}, "train": train_overrides}
        )
        log.info("training stage %s on %s", stage, train_manifest)
        result = train(cfg)
        log.info(
            "stage %s: %s, best %s=%.4f at epoch %d",
            stage,
            result.status,
            result.monitor,
            result.best_metric,
            result.best_epoch,
        )
        runs[stage] = result.run_dir
    return runs


def baseline_results(
    train_manifest: Path,
    externals: Mapping[str, Path],
    out_dir: Path,
    *,
    models: Sequence[str] = MODEL_NAMES,
    features: str = "handcrafted",
    roi: str = "lung",
    n_boot: int = 1000,
    seed: int = 0,
    jobs: int = 1,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fit the baselines on A's train+val, score them on A's test and each external set.

    Writes ``out_dir/baselines/metrics.json`` and ``metrics.md``; features are cached in
    ``out_dir/feature_cache``.

    Returns:
        ``{model: {"train", "train_cv", "internal", <external>...: metrics}}``.
    """
    result = run_baselines_on_manifests(
        train_manifest,
        externals,
        features=features,
        roi=roi,
        models=models,
        train_splits=BASELINE_TRAIN_SPLITS,
        internal_required=True,
        cache_dir=out_dir / "feature_cache",
        n_boot=n_boot,
        seed=seed,
        n_jobs=jobs,
        empty_hint="; pass --baselines none for segmentation-only data",
    )
    summary = {
        "settings": {
            "models": list(models),
            "features": features,
            "roi": roi,
            "train_splits": list(BASELINE_TRAIN_SPLITS),
            "n_boot": n_boot,
            "seed": seed,
        },
        "sets": result.set_summary(),
        "metrics": result.metrics,
    }
    write_json_atomic(out_dir / "baselines" / "metrics.json", summary)
    write_text_atomic(
        out_dir / "baselines" / "metrics.md", baselines_markdown(result.metrics, patients=False)
    )
    return result.metrics


def _protocol(
    train_manifest: Path,
    externals: Mapping[str, Path],
    config: Config,
    out: Path,
    *,
    cls_config: Config | None,
    baselines: Sequence[str],
    features: str,
    roi: str,
    n_boot: int,
    seed: int,
    device: str | None,
    batch_size: int,
    jobs: int,
    extra_info: Mapping[str, Any] | None = None,
) -> ValidationResult:
    records = read_manifest(train_manifest)
    check_no_group_leakage(records)
    if not any(r.split == "test" for r in records):
        raise InputError(
            "the training manifest has no 'test' split, so there is no internal "
            "held-out set; re-run `lungcad prepare` with --test-fraction > 0",
            train_manifest,
        )
    for path in externals.values():
        read_manifest(path)  # fail on a bad external manifest before hours of training
    stages = _stages(records, config)
    out.mkdir(parents=True, exist_ok=True)
    runs = train_deep_model(train_manifest, config, out / "runs", stages, cls_config)
    final = runs["cls"] if "cls" in runs else runs["seg"]  # _stages found at least one
    final_cfg = load_config(final / "config.yaml")
    deep_name = f"deep ({final_cfg.model.name})"
    device = device or final_cfg.train.device
    sets = {"train": (train_manifest, "train", 0), "internal": (train_manifest, "test", n_boot)}
    sets.update({name: (path, "all", n_boot) for name, path in externals.items()})
    evaluations: dict[str, EvaluationResult] = {}
    for set_name, (path, split, boot) in sets.items():
        log.info("evaluating the deep model on %s (%s split of %s)", set_name, split, path)
        evaluations[set_name] = evaluate_run(
            final,
            path,
            out / "eval" / set_name,
            split=split,
            n_boot=boot,
            seed=seed,
            device=device,
            batch_size=batch_size,
        )
    base_results: dict[str, dict[str, dict[str, float]]] = {}
    if baselines:
        base_results = baseline_results(
            train_manifest,
            externals,
            out,
            models=baselines,
            features=features,
            roi=roi,
            n_boot=n_boot,
            seed=seed,
            jobs=jobs,
        )
    results = {deep_name: {s: e.metrics for s, e in evaluations.items()}}
    results.update(
        {m: {s: v for s, v in per.items() if s != "train_cv"} for m, per in base_results.items()}
    )
    table = gap_table(results, sets=["train", "internal", *externals])
    write_gap(table, out)
    info = {
        "kind": "lungcad-validation",
        "lungcad_version": __version__,
        "created_at": utc_timestamp(),
        "train_manifest": str(manifest_csv(train_manifest)),
        "train_manifest_sha256": file_sha256(manifest_csv(train_manifest)),
        "externals": {
            n: {"manifest": str(manifest_csv(p)), "sha256": file_sha256(manifest_csv(p))}
            for n, p in externals.items()
        },
        "config_hash": config_hash(final_cfg),
        "config": config_to_dict(config),
        "deep_model": deep_name,
        "stages": stages,
        "runs": {stage: str(path.relative_to(out)) for stage, path in runs.items()},
        "evaluations": {s: f"eval/{s}" for s in evaluations},
        "baselines": {
            "models": list(baselines),
            "features": features,
            "roi": roi,
            "train_splits": list(BASELINE_TRAIN_SPLITS),
        }
        if baselines
        else None,
        "n_boot": n_boot,
        "seed": seed,
        "gap": {"markdown": "gap.md", "json": "gap.json", "plot": "gap.png"},
        "protocol": (
            "deep model: trained on the train split of the training manifest, model selection "
            "and threshold on its val split; baselines: trained on train+val with "
            "patient-grouped CV for tuning and threshold; internal = test split of the "
            "training manifest; external sets evaluated in full; nothing tuned on them"
        ),
        **(extra_info or {}),
    }
    write_json_atomic(out / VALIDATION_FILE, info)
    return ValidationResult(
        out_dir=out, runs=runs, evaluations=evaluations, baselines=base_results, gap=table
    )


def run_validation(
    train_manifest: str | Path,
    externals: Mapping[str, str | Path],
    config: Config,
    out_dir: str | Path,
    *,
    cls_config: Config | None = None,
    baselines: Sequence[str] = MODEL_NAMES,
    features: str = "handcrafted",
    roi: str = "lung",
    n_boot: int = 1000,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 32,
    jobs: int = 1,
) -> ValidationResult:
    """Train on A, evaluate internally and externally, run the baselines, write the gap table.

    Args:
        train_manifest: prepared dataset A (folder or manifest.csv) with train/val/test splits.
        externals: ``{name: prepared dataset}``, each evaluated in full.
        config: training configuration (``data.manifest`` and ``train.stage/out_dir/
            init_from`` are set by the protocol).
        out_dir: the validation folder (new or empty).
        cls_config: another configuration for the "cls" stage (default: ``config``).
        baselines: baseline model names (empty: none).
        features: baseline features, "handcrafted", "radiomics" or "both".
        roi: baseline feature region, "lung" or "whole".
        n_boot: patient-level bootstrap replicates for CIs (0: none).
        seed: seed of the bootstrap and the baselines.
        device: evaluation device (default: the run's ``train.device``).
        batch_size: evaluation batch size.
        jobs: parallel processes for features and baselines.

    Returns:
        The :class:`ValidationResult`.
    """
    out = check_output_dir(out_dir, None)  # runs are never overwritten
    external_paths = {name: Path(path) for name, path in externals.items()}
    bad = [n for n in external_paths if n in RESERVED_SET_NAMES]
    if bad:
        raise InputError(f"external set names {bad} are reserved; rename them", "--external")
    return _protocol(
        Path(train_manifest),
        external_paths,
        config,
        out,
        cls_config=cls_config,
        baselines=baselines,
        features=features,
        roi=roi,
        n_boot=n_boot,
        seed=seed,
        device=device,
        batch_size=batch_size,
        jobs=jobs,
    )


def make_synthetic_cohorts(
    out_dir: str | Path,
    *,
    n_cases: int = 16,
    n_external: int | None = None,
    seed: int = 0,
    matrix: int | None = None,
) -> tuple[Path, Path]:
    """Write an internal and a shifted external synthetic cohort and prepare both.

    The internal cohort (site "internal") is prepared with patient-level train/val/test
    splits; the external one (site "external": noisier, smoother kernel, +25 HU offset,
    thicker slices, larger field of view; other patients) is prepared as one evaluation set.

    Args:
        out_dir: folder for ``cohorts/`` (raw MSD-layout data) and ``data/`` (prepared).
        n_cases: internal patients (half with tumours).
        n_external: external patients (default ``n_cases``).
        seed: cohort and split seed.
        matrix: in-plane matrix of both sites (default the sites' 128).

    Returns:
        ``(internal prepared folder, external prepared folder)``.
    """
    from lungcad.data.synthetic.cohort import write_cohort  # only needed for this experiment

    out = Path(out_dir)
    prepared = {}
    for site, n, fractions in (
        ("internal", n_cases, (0.15, 0.15)),
        ("external", n_external or n_cases, (0.0, 0.0)),
    ):
        log.info("synthetic %s cohort: %d cases", site, n)
        write_cohort(
            out / "cohorts" / site, n, site=site, seed=seed, formats=("msd",), matrix=matrix
        )
        settings = PrepareSettings(
            layout="msd", seed=seed, val_fraction=fractions[0], test_fraction=fractions[1]
        )
        prepared[site] = prepare_dataset(
            out / "cohorts" / site / "msd", out / "data" / site, settings
        ).out
    return prepared["internal"], prepared["external"]


def run_synthetic_validation(
    out_dir: str | Path,
    *,
    config: Config | None = None,
    n_cases: int = 16,
    n_external: int | None = None,
    matrix: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> ValidationResult:
    """The synthetic site-shift experiment: cohorts (:func:`make_synthetic_cohorts`) into
    ``OUT/synthetic``, then :func:`run_validation`'s protocol into ``OUT``.

    Args:
        out_dir: the validation folder (new or empty).
        config: training configuration (default: :data:`SYNTHETIC_OVERRIDES`).
        n_cases, n_external, matrix, seed: see :func:`make_synthetic_cohorts`.
        **kwargs: further :func:`run_validation` options (baselines, n_boot, ...).
    """
    out = check_output_dir(out_dir, None)  # runs are never overwritten
    config = config or load_config(None, list(SYNTHETIC_OVERRIDES))
    internal, external = make_synthetic_cohorts(
        out / "synthetic", n_cases=n_cases, n_external=n_external, seed=seed, matrix=matrix
    )
    options = {
        "cls_config": None,
        "baselines": MODEL_NAMES,
        "features": "handcrafted",
        "roi": "lung",
        "n_boot": 1000,
        "device": None,
        "batch_size": 32,
        "jobs": 1,
        **kwargs,
    }
    extra = {
        "synthetic": {
            "n_cases": n_cases,
            "n_external": n_external or n_cases,
            "matrix": matrix,
            "seed": seed,
            "sites": ["internal", "external"],
            "cohorts": "synthetic/cohorts",
            "prepared": "synthetic/data",
        }
    }
    return _protocol(
        internal, {"external": external}, config, out, seed=seed, extra_info=extra, **options
    )
