"""Traditional-ML baselines on handcrafted/radiomic features (scikit-learn Pipelines).

Every baseline is one Pipeline: median imputation -> drop constant features -> standard scaling
-> univariate feature selection -> classifier. Everything that is fitted lives inside the
Pipeline, so in cross-validation and at test time nothing has seen the held-out data
(imbalanced-learn's ``pipeline.py`` rule). Hyper-parameters are tuned by ``GridSearchCV`` over
patient-grouped folds of the training set only (``StratifiedGroupKFold``: no patient is split
across folds, and each fold keeps both classes). The decision threshold is chosen on the
out-of-fold training predictions (``cross_val_predict``), never on an evaluated set, so
internal and external scores are honest estimates of what a fixed model would do.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectPercentile, VarianceThreshold, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import make_scorer, matthews_corrcoef
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from lungcad.data.manifest import manifest_csv
from lungcad.errors import InputError
from lungcad.metrics.bootstrap import classification_metrics_with_ci
from lungcad.metrics.classification import choose_threshold, classification_metrics
from lungcad.validation.baselines.choices import MODEL_NAMES, SCORINGS

log = logging.getLogger(__name__)


#: Hyper-parameter grids (Pipeline parameter names). ``select__percentile`` is the share of
#: features kept by the ANOVA F-test selection.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"select__percentile": [25, 100], "clf__C": [0.01, 0.1, 1.0, 10.0]},
    "svm": {
        "select__percentile": [25, 100],
        "clf__estimator__C": [0.1, 1.0, 10.0],
        "clf__estimator__gamma": ["scale", 0.01],
    },
    "rf": {
        "select__percentile": [50, 100],
        "clf__max_depth": [None, 8],
        "clf__min_samples_leaf": [1, 5],
    },
    "gb": {
        "select__percentile": [50, 100],
        "clf__learning_rate": [0.05, 0.1],
        "clf__min_samples_leaf": [5, 20],
    },
    "knn": {
        "select__percentile": [25, 100],
        "clf__n_neighbors": [5, 15, 31],
        "clf__weights": ["uniform", "distance"],
    },
}

Dataset = tuple[np.ndarray, np.ndarray, np.ndarray]  # X (N, F), y (N,), groups (N,)


def make_pipeline(name: str, seed: int = 0) -> Pipeline:
    """The untuned Pipeline of one baseline.

    Args:
        name: one of :data:`MODEL_NAMES`: ``logreg`` (L2 logistic regression), ``svm`` (RBF
            SVC with Platt scaling via ``CalibratedClassifierCV``), ``rf`` (random forest),
            ``gb`` (histogram gradient boosting), ``knn`` (k nearest neighbours).
        seed: random state of the stochastic steps.

    Returns:
        ``Pipeline(impute, variance, scale, select, clf)``; classes are balanced by weights
        for logreg, svm and rf (cancer sets are often imbalanced).
    """
    classifiers = {
        "logreg": lambda: LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000),
        # SVC(probability=True) is deprecated since scikit-learn 1.9; this is its replacement.
        # Its internal 3-fold Platt calibration is stratified, not grouped: a small optimism
        # inside the training data only (test sets are never seen).
        "svm": lambda: CalibratedClassifierCV(
            SVC(kernel="rbf", class_weight="balanced", random_state=seed),
            method="sigmoid",
            cv=3,
            ensemble=False,
        ),
        "rf": lambda: RandomForestClassifier(
            n_estimators=200, class_weight="balanced", random_state=seed, n_jobs=1
        ),
        # No class_weight here: with sample weights HistGradientBoosting fits ~10x slower;
        # the threshold chosen on out-of-fold predictions absorbs the class imbalance.
        "gb": lambda: HistGradientBoostingClassifier(max_leaf_nodes=15, random_state=seed),
        "knn": lambda: KNeighborsClassifier(n_neighbors=15),
    }
    if name not in classifiers:
        raise KeyError(f"unknown baseline {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median")),
            ("variance", VarianceThreshold(0.0)),
            ("scale", StandardScaler()),
            ("select", SelectPercentile(f_classif, percentile=100)),
            ("clf", classifiers[name]()),
        ]
    )


def make_cv(
    y: np.ndarray, groups: np.ndarray, n_splits: int = 5, seed: int = 0
) -> StratifiedGroupKFold:
    """Patient-grouped, class-stratified folds over the training data.

    ``n_splits`` is reduced to the number of groups of the rarer class when that is smaller,
    so every fold can hold both classes.

    Raises:
        InputError: fewer than two groups of each class.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    per_class = [len(np.unique(groups[y == c])) for c in (0, 1)]
    if min(per_class) < 2:
        raise InputError(
            f"training data needs at least 2 patients (groups) of each class for grouped "
            f"cross-validation; got {per_class[0]} negative and {per_class[1]} positive groups"
        )
    return StratifiedGroupKFold(n_splits=min(n_splits, *per_class), shuffle=True, random_state=seed)


def _fit_grid(grid: Mapping[str, list[Any]], n_train: int, cv_splits: int) -> dict[str, list]:
    """Drop k-NN neighbour counts larger than the smallest CV training fold can hold."""
    grid = {key: list(values) for key, values in grid.items()}
    if "clf__n_neighbors" in grid:
        smallest_fold = n_train - int(np.ceil(n_train / cv_splits))
        kept = [k for k in grid["clf__n_neighbors"] if k <= smallest_fold] or [1]
        grid["clf__n_neighbors"] = kept
    return grid


@dataclass
class FittedBaseline:
    """A tuned, refitted baseline and how it was chosen.

    Attributes:
        name: model name (:data:`MODEL_NAMES`).
        pipeline: the Pipeline refitted on all training data with the best parameters.
        threshold: decision threshold chosen on the out-of-fold training predictions.
        best_params: the grid point chosen.
        cv_score: mean CV score of ``best_params`` (``scoring``).
        scoring: ``"roc_auc"`` or ``"mcc"``.
        oof_prob: ``(N_train,)`` out-of-fold probabilities of the training samples.
        cv_folds: ``[(train_idx, test_idx), ...]`` the folds used for tuning and the threshold.
    """

    name: str
    pipeline: Pipeline
    threshold: float
    best_params: dict[str, Any]
    cv_score: float
    scoring: str
    oof_prob: np.ndarray
    cv_folds: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(N,)`` probability of class 1 for features ``X`` ``(N, F)``."""
        return self.pipeline.predict_proba(np.asarray(X, dtype=np.float64))[:, 1]


def _check_dataset(name: str, data: Dataset, n_features: int | None = None) -> Dataset:
    X, y, groups = (np.asarray(a) for a in data)
    if X.ndim != 2 or y.shape != (X.shape[0],) or groups.shape != (X.shape[0],):
        raise InputError(
            f"set {name!r}: need X (N, F), y (N,) and groups (N,); got shapes "
            f"{X.shape}, {y.shape}, {groups.shape}"
        )
    if n_features is not None and X.shape[1] != n_features:
        raise InputError(
            f"set {name!r} has {X.shape[1]} features; the training set has "
            f"{n_features}. Compute both with the same feature settings."
        )
    if X.shape[0] == 0:
        raise InputError(f"set {name!r} is empty")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise InputError(f"set {name!r}: labels must be 0/1; drop unknown (-1) labels first")
    return X.astype(np.float64), y.astype(np.int64), groups


def fit_baseline(
    name: str,
    train: Dataset,
    seed: int = 0,
    scoring: str = "roc_auc",
    n_splits: int = 5,
    param_grid: Mapping[str, list[Any]] | None = None,
    threshold_method: str = "mcc",
    n_jobs: int = 1,
) -> FittedBaseline:
    """Tune one baseline by grouped CV on the training set, refit, and choose its threshold.

    Args:
        name: model name (:data:`MODEL_NAMES`).
        train: ``(X (N, F), y (N,) 0/1, groups (N,) patient ids)``.
        seed: seed of the folds and of stochastic models.
        scoring: ``"roc_auc"`` (threshold-free) or ``"mcc"`` (at 0.5) for tuning.
        n_splits: number of CV folds (fewer when there are few patients).
        param_grid: override of :data:`DEFAULT_GRIDS` ``[name]``.
        threshold_method: ``"mcc"`` or ``"youden"`` (see ``metrics.choose_threshold``).
        n_jobs: parallel jobs for the grid search.

    Returns:
        The :class:`FittedBaseline`.
    """
    if scoring not in SCORINGS:
        raise InputError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
    X, y, groups = _check_dataset("train", train)
    pipeline = make_pipeline(name, seed)
    cv = make_cv(y, groups, n_splits, seed)
    folds = list(cv.split(X, y, groups))
    grid = _fit_grid(
        param_grid if param_grid is not None else DEFAULT_GRIDS[name], len(y), len(folds)
    )
    scorer = "roc_auc" if scoring == "roc_auc" else make_scorer(matthews_corrcoef)
    search = GridSearchCV(
        pipeline, grid, scoring=scorer, cv=folds, refit=True, n_jobs=n_jobs, error_score=np.nan
    )
    # One BLAS/OpenMP thread per fit: the data are small, parallelism comes from n_jobs, and
    # gradient boosting's OpenMP threads on a busy machine made fits ~10x slower.
    with warnings.catch_warnings(), threadpool_limits(1):
        # Constant features inside a fold and slow logistic convergence on tiny grids are
        # expected here; they do not change the result.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*constant.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        search.fit(X, y)
        best = clone(pipeline).set_params(**search.best_params_)
        oof = cross_val_predict(best, X, y, cv=folds, method="predict_proba")[:, 1]
    threshold = choose_threshold(y, oof, method=threshold_method)
    log.info(
        "%s: best %s, CV %s %.3f, threshold %.3f",
        name,
        search.best_params_,
        scoring,
        search.best_score_,
        threshold,
    )
    return FittedBaseline(
        name=name,
        pipeline=search.best_estimator_,
        threshold=threshold,
        best_params=dict(search.best_params_),
        cv_score=float(search.best_score_),
        scoring=scoring,
        oof_prob=oof,
        cv_folds=folds,
    )


def fit_baselines(
    train: Dataset,
    models: Sequence[str] = MODEL_NAMES,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, FittedBaseline]:
    """:func:`fit_baseline` for each model name; ``param_grids={name: grid}`` overrides grids.

    Other keyword arguments go to :func:`fit_baseline`.
    """
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; valid names: {', '.join(MODEL_NAMES)}")
    grids = kwargs.pop("param_grids", None) or {}
    return {
        name: fit_baseline(name, train, seed=seed, param_grid=grids.get(name), **kwargs)
        for name in models
    }


def evaluate_baselines(
    fitted: Mapping[str, FittedBaseline],
    train: Dataset,
    evaluate_sets: Mapping[str, Dataset],
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of fitted baselines on the training data and on each evaluated set.

    Sets reported: ``train`` (resubstitution: how well the model fits), ``train_cv``
    (out-of-fold training predictions: the honest in-distribution estimate) and each entry
    of ``evaluate_sets`` (e.g. ``internal``, an external hospital). All at the model's own
    threshold, chosen on training data.

    Args:
        fitted: ``{model: FittedBaseline}``.
        train: the training ``(X, y, groups)`` the models were fitted on.
        evaluate_sets: ``{set name: (X, y, groups)}``.
        n_boot: bootstrap replicates for patient-level CIs on the evaluated sets (0: none).
        seed: bootstrap seed.

    Returns:
        ``{model: {set: metrics}}`` with
        :func:`lungcad.metrics.classification.classification_metrics` keys
        plus ``n_groups`` (patients), and ``*_ci_low``/``*_ci_high``/``ci_level`` when
        ``n_boot > 0``.
    """
    reserved = {"train", "train_cv"} & set(evaluate_sets)
    if reserved:
        raise InputError(f"evaluation set names {sorted(reserved)} are reserved; rename them")
    X_train, y_train, groups_train = _check_dataset("train", train)
    n_train_groups = float(len(np.unique(groups_train)))
    sets = {
        name: _check_dataset(name, data, X_train.shape[1]) for name, data in evaluate_sets.items()
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, model in fitted.items():
        t = model.threshold
        with threadpool_limits(1):
            train_prob = model.predict_proba(X_train)
            probs = {set_name: model.predict_proba(X) for set_name, (X, _, _) in sets.items()}
        per_set = {
            "train": classification_metrics(y_train, train_prob, t),
            "train_cv": classification_metrics(y_train, model.oof_prob, t),
        }
        for metrics in per_set.values():
            metrics["n_groups"] = n_train_groups
        for set_name, (_, y, groups) in sets.items():
            prob = probs[set_name]
            if n_boot > 0:
                per_set[set_name] = classification_metrics_with_ci(
                    y, prob, groups, t, n_boot=n_boot, seed=seed
                )
            else:
                per_set[set_name] = classification_metrics(y, prob, t)
                per_set[set_name]["n_groups"] = float(len(np.unique(groups)))
        results[name] = per_set
    return results


def run_baselines(
    train: Dataset,
    evaluate_sets: Mapping[str, Dataset],
    models: Sequence[str] = MODEL_NAMES,
    seed: int = 0,
    n_boot: int = 0,
    **kwargs: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fit every baseline on ``train`` and score it on ``train``, ``train_cv`` and each set.

    Args:
        train: ``(X (N, F), y (N,) 0/1, groups (N,))`` training data.
        evaluate_sets: ``{name: (X, y, groups)}``, e.g. ``internal`` and ``external`` sets.
        models: model names (:data:`MODEL_NAMES`).
        seed: seed of folds, models and bootstrap.
        n_boot: bootstrap replicates for CIs on the evaluated sets (0: none).
        **kwargs: ``scoring``, ``n_splits``, ``param_grids``, ``threshold_method``,
            ``n_jobs`` (see :func:`fit_baseline`).

    Returns:
        ``{model: {set: metrics}}`` (see :func:`evaluate_baselines`).
    """
    fitted = fit_baselines(train, models, seed=seed, **kwargs)
    return evaluate_baselines(fitted, train, evaluate_sets, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------- from manifests

#: Columns of :func:`baselines_markdown` (metric key, header).
TABLE_COLUMNS = (
    ("accuracy", "Acc"),
    ("sensitivity", "Sens"),
    ("specificity", "Spec"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("kappa", "Kappa"),
    ("auc", "AUC"),
)


@dataclass
class ManifestBaselines:
    """What :func:`run_baselines_on_manifests` computed.

    Attributes:
        fitted: ``{model: FittedBaseline}``.
        metrics: ``{model: {set: metrics}}`` (see :func:`evaluate_baselines`); sets
            ``train``, ``train_cv``, ``internal`` (when present) and each external set.
        data: ``{set: (X, y, groups)}``: ``train`` first, then ``internal`` and the externals;
            groups are ``"<set>:<group_id>"``.
        manifests: ``{set: manifest path as given}`` for the same sets.
        feature_names: the ``F`` feature names (columns of every ``X``).
    """

    fitted: dict[str, FittedBaseline]
    metrics: dict[str, dict[str, dict[str, float]]]
    data: dict[str, Dataset]
    manifests: dict[str, Any]
    feature_names: list[str]

    def set_summary(self) -> dict[str, dict[str, int]]:
        """``{set: {"n", "n_groups", "n_positive"}}`` of the slices each set held."""
        return {
            name: {
                "n": int(len(y)),
                "n_groups": int(len(np.unique(g))),
                "n_positive": int(np.sum(y)),
            }
            for name, (_, y, g) in self.data.items()
        }


def run_baselines_on_manifests(
    train_manifest: str | Path,
    eval_manifests: Mapping[str, str | Path],
    *,
    features: str = "handcrafted",
    roi: str = "lung",
    models: Sequence[str] = MODEL_NAMES,
    train_splits: Sequence[str] = ("train",),
    internal_required: bool = False,
    cache_dir: str | Path | None = None,
    scoring: str = "roc_auc",
    threshold_method: str = "mcc",
    n_boot: int = 0,
    seed: int = 0,
    n_jobs: int = 1,
    empty_hint: str = "",
    progress: Callable[[str], None] | None = None,
) -> ManifestBaselines:
    """Features of prepared datasets, then :func:`fit_baselines` and :func:`evaluate_baselines`.

    The baselines train on the labelled (0/1) slices of ``train_splits`` of the training
    manifest and are scored on its labelled ``test`` split (``internal``: other patients, same
    site) and on every labelled slice of each ``eval_manifests`` entry (other sites). Used by
    ``lungcad baselines`` and by the external-validation protocol
    (:mod:`lungcad.validation.protocol`).

    Args:
        train_manifest: prepared folder or manifest.csv of the training dataset.
        eval_manifests: ``{set name: prepared folder or manifest.csv}``, scored in full.
        features: ``"handcrafted"``, ``"radiomics"`` or ``"both"``
            (:func:`lungcad.validation.baselines.features.feature_table`).
        roi: feature region, ``"lung"``, ``"whole"`` or ``"mask"``.
        models: model names (:data:`MODEL_NAMES`).
        train_splits: splits of the training manifest to train (and cross-validate) on.
        internal_required: fail when the training manifest has no labelled test slices
            (otherwise the internal set is left out, with a progress note).
        cache_dir: joblib cache folder for the features (None: no cache).
        scoring, threshold_method: see :func:`fit_baseline`.
        n_boot: patient-level bootstrap replicates for CIs on the evaluated sets (0: none).
        seed: seed of folds, models and bootstrap.
        n_jobs: parallel processes for features and the grid search.
        empty_hint: appended to the message of a set without labelled slices (a fix that
            fits the caller, e.g. an option that turns the baselines off).
        progress: called with one line per step (feature extraction, fitting), e.g. ``print``.

    Returns:
        The :class:`ManifestBaselines`.

    Raises:
        InputError: group leakage between the training manifest's splits, a set without
            labelled slices, or feature names that differ between sets.
    """
    # datasets (torch) and features (joblib, scikit-image) only when features are computed.
    from lungcad.data.manifest import check_no_group_leakage, filter_records, read_manifest
    from lungcad.validation.baselines.features import feature_table

    def note(message: str) -> None:
        if progress is not None:
            progress(message)
        else:
            log.info("%s", message)

    records = read_manifest(train_manifest)
    check_no_group_leakage(records)
    selections = {
        "train": (filter_records(records, train_splits, labels=(0, 1)), train_manifest),
        "internal": (filter_records(records, "test", labels=(0, 1)), train_manifest),
    }
    for name, path in eval_manifests.items():
        selections[name] = (filter_records(read_manifest(path), labels=(0, 1)), path)
    if not selections["train"][0]:
        raise InputError(
            f"no labelled slices in split(s) {train_splits}{empty_hint}", train_manifest
        )
    if not selections["internal"][0] and not internal_required:
        note("note: the training manifest has no labelled test split; no internal set")
        del selections["internal"]

    data: dict[str, Dataset] = {}
    names: list[str] | None = None
    for set_name, (recs, path) in selections.items():
        if not recs:
            raise InputError(
                f"set {set_name!r} has no slices with a known label (0/1){empty_hint}", path
            )
        note(f"features [{features}, roi={roi}] for {set_name}: {len(recs)} slices")
        csv_path = manifest_csv(path)
        X, set_names = feature_table(
            recs, csv_path.parent, kind=features, roi=roi, cache_dir=cache_dir, n_jobs=n_jobs
        )
        if names is not None and set_names != names:
            raise InputError("feature names differ between sets; this is a bug", path)
        names = set_names
        y = np.array([r.label for r in recs])
        groups = np.array([f"{set_name}:{r.group_id}" for r in recs])
        data[set_name] = (X, y, groups)

    note(f"fitting {', '.join(models)} on {len(data['train'][1])} slices")
    fitted = fit_baselines(
        data["train"],
        models,
        seed=seed,
        scoring=scoring,
        threshold_method=threshold_method,
        n_jobs=n_jobs,
    )
    evaluated = {k: v for k, v in data.items() if k != "train"}
    metrics = evaluate_baselines(fitted, data["train"], evaluated, n_boot=n_boot, seed=seed)
    return ManifestBaselines(
        fitted=fitted,
        metrics=metrics,
        data=data,
        manifests={k: path for k, (_, path) in selections.items()},
        feature_names=list(names or []),
    )


def baselines_markdown(
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]], *, patients: bool = True
) -> str:
    """Markdown table: one row per model and set, with 95% CIs where computed.

    Args:
        metrics: ``{model: {set: metrics}}`` (:func:`evaluate_baselines`).
        patients: include the "Patients" (groups) column.
    """

    def fmt(value: Any) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    header = ["Model", "Set", "N"] + (["Patients"] if patients else [])
    header += [label for _, label in TABLE_COLUMNS] + ["Threshold"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_set in metrics.items():
        for set_name, m in per_set.items():
            cells = [model, set_name, str(int(m["n"]))]
            if patients:
                cells.append(str(int(m["n_groups"])))
            for key, _ in TABLE_COLUMNS:
                cell = fmt(m[key])
                if f"{key}_ci_low" in m:
                    cell += f" ({fmt(m[f'{key}_ci_low'])}-{fmt(m[f'{key}_ci_high'])})"
                cells.append(cell)
            cells.append(fmt(m["threshold"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
