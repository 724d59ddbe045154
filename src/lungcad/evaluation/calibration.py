"""Probability calibration of the cancer classifier: temperature scaling and isotonic regression.

A network trained with BCE often ranks slices well but is over-confident: its 0.95 means less
than 95%. Calibration maps the logits to probabilities that match observed frequencies; it is
fitted on validation logits (never on test data) and stored in the run folder as
``calibration.json``, which :class:`lungcad.inference.predictor.Predictor` applies when present.

* ``"temperature"`` (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one
  parameter, ``p = sigmoid(logit / T)``, fitted by minimising the negative log-likelihood. It
  keeps the ranking (AUC unchanged) and cannot overfit a small validation set.
* ``"isotonic"``: scikit-learn's ``IsotonicRegression`` (monotone, piecewise linear) from
  logits to probabilities; more flexible, needs more validation data, may produce ties.

Because calibration changes the probabilities, the decision threshold chosen at training time
(``threshold.json``, on uncalibrated probabilities) no longer applies; ``calibrate_run``
re-chooses it on the calibrated validation probabilities and stores it with the calibration.

Example::

    cal = fit_calibration(val_logits, val_labels, "temperature")
    probs = cal.apply(test_logits)
    Calibration.from_dict(cal.to_dict()).apply(test_logits)  # the same
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression

from lungcad.data.manifest import manifest_csv
from lungcad.errors import InputError
from lungcad.evaluation.choices import CALIBRATION_METHODS
from lungcad.io.atomic import write_json_atomic

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FILE",
    "Calibration",
    "RunDecision",
    "binary_nll",
    "calibrate_run",
    "decision_threshold",
    "fit_calibration",
    "load_calibration",
    "load_run_calibration",
    "run_decision",
    "save_calibration",
]

CALIBRATION_FILE = "calibration.json"

# Temperatures are searched on log T in [-LOG_T_BOUND, LOG_T_BOUND], i.e. T in [0.007, 148]:
# far wider than any network needs, and bounded so separable data cannot push T to 0.
LOG_T_BOUND = 5.0
_EPS = 1e-7


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only, so large |x| never overflows.
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def binary_nll(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood (binary cross-entropy, nats) of probabilities.

    Args:
        labels: ``(N,)`` 0/1.
        probabilities: ``(N,)`` in [0, 1]; clipped to [1e-7, 1 - 1e-7] so a confident mistake
            costs about 16 nats instead of infinity.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _check(logits: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise InputError("calibration needs finite logits; got NaN or inf", "logits")
    if labels is None:
        return x, np.empty(0)
    y = np.asarray(labels).ravel()
    if y.shape != x.shape:
        raise InputError(
            f"logits and labels must have the same length; got {x.size} and {y.size}", "labels"
        )
    if x.size == 0:
        raise InputError(
            "no samples to fit a calibration on; the validation split needs labelled (0/1) slices",
            "labels",
        )
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise InputError(
            f"labels must be 0/1 (drop unknown labels -1 first); got {sorted(values)}", "labels"
        )
    if len(values) < 2:
        raise InputError(
            "calibration needs both classes among the labels (cancerous and "
            "not); the validation split holds only one",
            "labels",
        )
    return x, y.astype(np.float64)


@dataclass
class Calibration:
    """A fitted map from cancer logits to calibrated probabilities.

    Attributes:
        method: ``"temperature"`` or ``"isotonic"``.
        temperature: T of ``sigmoid(logit / T)`` (temperature scaling only).
        isotonic_x: increasing logit knots of the isotonic fit (isotonic only).
        isotonic_y: probabilities at the knots; linear in between, constant outside.
        threshold: decision threshold on the *calibrated* probability, or None when not chosen.
        info: provenance and fit statistics (split, sample counts, NLL/ECE before and after).
    """

    method: str
    temperature: float | None = None
    isotonic_x: list[float] = field(default_factory=list)
    isotonic_y: list[float] = field(default_factory=list)
    threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise InputError(
                f"calibration method must be one of {CALIBRATION_METHODS}; got {self.method!r}",
                "method",
            )
        if self.method == "temperature":
            if self.temperature is None or not (
                math.isfinite(self.temperature) and self.temperature > 0
            ):
                raise InputError(
                    f"temperature must be a positive number; got {self.temperature!r}",
                    "temperature",
                )
        else:
            if len(self.isotonic_x) < 1 or len(self.isotonic_x) != len(self.isotonic_y):
                raise InputError(
                    "isotonic calibration needs matching, non-empty isotonic_x "
                    "and isotonic_y knots",
                    "isotonic_x",
                )
            if np.any(np.diff(self.isotonic_x) < 0):
                raise InputError("isotonic_x knots must be increasing", "isotonic_x")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for cancer logits.

        Args:
            logits: array of any shape (e.g. ``(N,)`` slice logits).

        Returns:
            float64 array of the same shape in [0, 1].
        """
        x = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            assert self.temperature is not None  # __post_init__ checks it
            return _sigmoid(x / self.temperature)
        # The same rule as IsotonicRegression.predict(out_of_bounds="clip"): linear between
        # knots, the end values outside them.
        return np.interp(x, self.isotonic_x, self.isotonic_y)

    def decision_threshold(self, uncalibrated: float) -> tuple[float, str]:
        """The threshold on calibrated probabilities, and where it comes from.

        The stored ``threshold`` (chosen on calibrated validation probabilities) when there
        is one; otherwise the uncalibrated threshold mapped through the calibration, which
        for a monotone map keeps every decision as it was.

        Args:
            uncalibrated: the run's threshold on uncalibrated probabilities.

        Returns:
            ``(threshold, source)``.
        """
        if self.threshold is not None:
            return float(self.threshold), "calibration.json"
        t = min(max(float(uncalibrated), 1e-12), 1.0 - 1e-12)
        logit = math.log(t) - math.log1p(-t)
        return float(self.apply(np.array([logit]))[0]), "checkpoint threshold, calibrated"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` restores an equal object."""
        return {
            "method": self.method,
            "temperature": self.temperature,
            "isotonic_x": [float(v) for v in self.isotonic_x],
            "isotonic_y": [float(v) for v in self.isotonic_y],
            "threshold": self.threshold,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        """Rebuild a calibration written by :meth:`to_dict`.

        Raises:
            InputError: a missing or malformed field.
        """
        if not isinstance(values, dict) or "method" not in values:
            raise InputError("not a calibration (expected a dict with 'method')", "calibration")
        threshold = values.get("threshold")
        return cls(
            method=str(values["method"]),
            temperature=None if values.get("temperature") is None else float(values["temperature"]),
            isotonic_x=[float(v) for v in values.get("isotonic_x") or []],
            isotonic_y=[float(v) for v in values.get("isotonic_y") or []],
            threshold=None if threshold is None else float(threshold),
            info=dict(values.get("info") or {}),
        )


def _fit_temperature(x: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t: float) -> float:
        z = x / math.exp(log_t)
        # BCE with logits, stable: softplus(z) - y * z.
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    result = minimize_scalar(
        nll, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(result.x))


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, method: str = "temperature"
) -> Calibration:
    """Fit a calibration on (validation) logits and labels.

    Args:
        logits: ``(N,)`` cancer logits of the classifier (before the sigmoid).
        labels: ``(N,)`` 0/1 labels, both classes present.
        method: ``"temperature"`` (default; one parameter, fitted by minimising the NLL with a
            bounded 1-D search on log T) or ``"isotonic"``.

    Returns:
        The :class:`Calibration` (``threshold`` unset; ``info`` holds n and NLL before/after).

    Raises:
        InputError: unknown method, non-finite logits, labels not 0/1 or of one class only.
    """
    if method not in CALIBRATION_METHODS:
        raise InputError(
            f"calibration method must be one of {CALIBRATION_METHODS}; got {method!r}", "--method"
        )
    x, y = _check(logits, labels)
    if method == "temperature":
        cal = Calibration("temperature", temperature=_fit_temperature(x, y))
    else:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(x, y)
        cal = Calibration(
            "isotonic", isotonic_x=iso.X_thresholds_.tolist(), isotonic_y=iso.y_thresholds_.tolist()
        )
    cal.info = {
        "n": int(x.size),
        "n_positive": int(y.sum()),
        "nll_before": binary_nll(y, _sigmoid(x)),
        "nll_after": binary_nll(y, cal.apply(x)),
    }
    return cal


def save_calibration(calibration: Calibration, run_dir: str | Path) -> Path:
    """Write ``run_dir/calibration.json`` atomically and return its path."""
    return write_json_atomic(Path(run_dir) / CALIBRATION_FILE, calibration.to_dict())


def load_calibration(run_dir: str | Path) -> Calibration | None:
    """The calibration stored in a run folder, or None when it has none.

    Raises:
        InputError: ``calibration.json`` exists but is not valid.
    """
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return Calibration.from_dict(values)
    except (json.JSONDecodeError, InputError, TypeError, ValueError) as exc:
        raise InputError(
            f"invalid calibration file ({exc}); re-run `lungcad calibrate` or "
            "delete it to use uncalibrated probabilities",
            path,
        ) from exc


def load_run_calibration(checkpoint_info: Mapping[str, Any]) -> Calibration | None:
    """The calibration of a loaded run, checked against its checkpoint.

    Args:
        checkpoint_info: ``checkpoint.load_checkpoint``'s info (``run_dir``, ``sha256``).

    Returns:
        The run folder's calibration, or None when it has no ``calibration.json``.

    Raises:
        InputError: ``calibration.json`` is invalid, or was fitted for another ``best.pt``.
    """
    calibration = load_calibration(checkpoint_info["run_dir"])
    if calibration is not None:
        fitted_for = calibration.info.get("checkpoint_sha256")
        sha = str(checkpoint_info.get("sha256") or "")
        if fitted_for and fitted_for != sha:
            raise InputError(
                "calibration.json was fitted for another best.pt (SHA-256 "
                f"{fitted_for[:12]}..., now {sha[:12]}...); re-run "
                "`lungcad calibrate` or delete calibration.json",
                Path(checkpoint_info["run_dir"]) / CALIBRATION_FILE,
            )
    return calibration


def decision_threshold(calibration: Calibration | None, uncalibrated: float) -> tuple[float, str]:
    """The threshold a run's decisions use, and where it comes from.

    Without a calibration, the run's own threshold (``threshold.json``, on uncalibrated
    probabilities); with one, :meth:`Calibration.decision_threshold` (the threshold stored
    in ``calibration.json``, else the run's threshold mapped through the calibration).

    Args:
        calibration: the run's calibration, or None.
        uncalibrated: the run's threshold on uncalibrated probabilities.

    Returns:
        ``(threshold, source)``.
    """
    if calibration is None:
        return float(uncalibrated), "checkpoint (threshold.json)"
    return calibration.decision_threshold(uncalibrated)


class RunDecision(NamedTuple):
    """How a run turns cancer logits into decisions (:func:`run_decision`).

    Attributes:
        calibration: applied to the logits when not None (else the plain sigmoid).
        threshold: decision threshold on the (calibrated) probability.
        source: where the threshold comes from.
    """

    calibration: Calibration | None
    threshold: float
    source: str


def run_decision(checkpoint_info: Mapping[str, Any]) -> RunDecision:
    """The decision rule of a loaded run: its checked calibration and its threshold.

    The one place that decides how ``lungcad predict`` (``inference.Predictor``) and
    ``lungcad evaluate`` (``evaluation.evaluate_loaded``) score a run, so both report the
    same probabilities and decisions.

    Args:
        checkpoint_info: ``checkpoint.load_checkpoint``'s info (``run_dir``, ``sha256``,
            ``threshold``).

    Raises:
        InputError: see :func:`load_run_calibration`.
    """
    calibration = load_run_calibration(checkpoint_info)
    threshold, source = decision_threshold(
        calibration, float(checkpoint_info.get("threshold", 0.5))
    )
    return RunDecision(calibration, threshold, source)


def calibrate_run(
    run_dir: str | Path,
    manifest: str | Path | list[str | Path],
    method: str = "temperature",
    *,
    split: str = "val",
    batch_size: int = 32,
    threshold_method: str | None = None,
) -> Calibration:
    """Fit a calibration for a run on a manifest split and store it as ``calibration.json``.

    The slices are read exactly as in training (``SliceDataset`` at the run's image size), the
    classifier's logits collected, the calibration fitted, and the decision threshold re-chosen
    on the calibrated probabilities with ``lungcad.metrics.classification.choose_threshold``
    (the run's ``train.threshold_method`` unless given).

    Args:
        run_dir: a run folder written by ``lungcad train`` (stage "cls" for a useful result).
        manifest: one or more prepared folders or manifest.csv files.
        method: ``"temperature"`` or ``"isotonic"``.
        split: manifest split to fit on: "val" (or "train"); "test" is refused, since
            results are reported on it.
        batch_size: slices per forward pass.
        threshold_method: ``"mcc"`` or ``"youden"``; None uses the run's setting.

    Returns:
        The stored :class:`Calibration` (``info`` holds NLL, ECE and Brier before/after, the
        old and new thresholds, the checkpoint's SHA-256, and the split and manifests (path
        and SHA-256) it was fitted on, which ``lungcad evaluate`` compares with the data it
        scores).

    Raises:
        InputError: ``split`` is "test" (before anything is read), or the split holds no
            labelled slices.
    """
    if split == "test":
        raise InputError(
            "calibration is never fitted on the test split, the split results are reported "
            "on; use --split val",
            "--split",
        )
    from torch.utils.data import ConcatDataset, DataLoader

    from lungcad.data.dataset import SliceDataset
    from lungcad.data.manifest import filter_records, read_manifest
    from lungcad.metrics.classification import choose_threshold, expected_calibration_error
    from lungcad.models.forward import forward_logits
    from lungcad.training.checkpoint import file_sha256, load_checkpoint
    from lungcad.training.data import slice_pixel_mm

    model, config, info = load_checkpoint(run_dir)
    size = (config.model.image_size, config.model.image_size)
    entries = manifest if isinstance(manifest, list) else [manifest]
    parts: list[SliceDataset] = []
    names: list[str] = []
    fitted_on: list[dict[str, str]] = []
    for entry in entries:
        path = Path(entry)
        csv_path = manifest_csv(path)
        records = filter_records(read_manifest(csv_path), split, labels=(0, 1))
        names.append(str(csv_path))
        fitted_on.append({"path": str(csv_path), "sha256": file_sha256(csv_path)})
        if records:
            parts.append(
                SliceDataset(
                    records, csv_path.parent, image_size=size, pixel_mm=slice_pixel_mm(config)
                )
            )
    if not parts:
        raise InputError(
            f"no labelled (0/1) '{split}' slices in {', '.join(names)}; "
            "calibration needs the validation split of a labelled manifest",
            "--manifest",
        )
    loader: DataLoader[Any] = DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    model.eval()
    for batch in loader:  # on the CPU, where load_checkpoint put the model
        logits.append(forward_logits(model, batch["image"], "cpu").cls.numpy())
        labels.append(batch["label"].numpy())
    x, y = np.concatenate(logits), np.concatenate(labels).astype(np.int64)
    cal = fit_calibration(x, y, method)
    rule = threshold_method or config.train.threshold_method
    before, after = _sigmoid(x), cal.apply(x)
    cal.threshold = choose_threshold(y, after, method=rule)
    cal.info.update(
        {
            "split": split,
            "manifests": fitted_on,
            "evaluated_on": "the fitting split (in-sample figures)",
            "ece_before": expected_calibration_error(y, before),
            "ece_after": expected_calibration_error(y, after),
            "brier_before": float(np.mean((before - y) ** 2)),
            "brier_after": float(np.mean((after - y) ** 2)),
            "threshold_method": rule,
            "threshold_uncalibrated": info["threshold"],
            "checkpoint_sha256": info["sha256"],
            "rule": "cancer if calibrated probability >= threshold",
        }
    )
    save_calibration(cal, Path(info["run_dir"]))
    log.info(
        "calibration (%s) fitted on %d %s slices: NLL %.4f -> %.4f, threshold %.4f",
        method,
        x.size,
        split,
        cal.info["nll_before"],
        cal.info["nll_after"],
        cal.threshold,
    )
    return cal
