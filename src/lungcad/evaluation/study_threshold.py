"""The study decision threshold: chosen on validation studies, stored as ``study_threshold.json``.

A run's ``threshold.json`` (and a calibrated threshold in ``calibration.json``) was chosen for
single slices. A study's probability is another quantity, the mean of its top-k slice
probabilities (:func:`lungcad.inference.aggregate.aggregate_study`), and over a whole study
its distribution differs from a slice's: a threshold that suits slices need not suit studies.
``lungcad calibrate --studies VAL`` therefore runs the predictor over validation studies and
chooses the threshold on their study probabilities (maximum MCC or Youden's J, as for
slices); :class:`lungcad.inference.predictor.Predictor` then decides 3D studies with it.

The file records what the threshold depends on, and loading checks each of them, so that a
stale threshold is refused rather than silently applied:

* the model (the checkpoint's SHA-256, or a fold ensemble's member hashes);
* the calibration of the slice probabilities that were aggregated (its content hash, or
  none): re-running ``lungcad calibrate --manifest`` changes every study probability;
* the aggregation (top-k over ``extent_mm`` along z).

It also records the studies it was chosen on (their image SHA-256s), so an evaluation on the
same studies can say that its decisions were tuned on the evaluated data.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.errors import InputError
from lungcad.evaluation.calibration import Calibration
from lungcad.io.atomic import to_json, write_json_atomic
from lungcad.metrics.classification import THRESHOLD_METHODS, choose_threshold

__all__ = [
    "STUDY_RULE",
    "STUDY_THRESHOLD_FILE",
    "StudyThreshold",
    "calibration_identity",
    "choose_study_threshold",
    "load_study_threshold",
    "model_folder",
    "model_identity",
    "read_study_threshold",
    "save_study_threshold",
]

STUDY_THRESHOLD_FILE = "study_threshold.json"
STUDY_RULE = "cancer suspected if study probability >= threshold"


@dataclass(frozen=True)
class StudyThreshold:
    """A study-level decision threshold and what it was chosen for and on.

    Attributes:
        threshold: the threshold on the study probability, in [0, 1].
        method: the rule that chose it (``"mcc"`` or ``"youden"``).
        model_sha256: :func:`model_identity` of the model it was chosen for.
        calibration_sha256: :func:`calibration_identity` of the slice calibration that was
            applied, or None (plain sigmoid).
        extent_mm: the aggregation's extent along z (top-k slices spanning it).
        chosen_on: the validation studies: ``input``, ``folder``, ``n_studies``,
            ``n_positive``, ``case_ids`` and ``study_sha256`` (image hashes).
        info: provenance and in-sample figures (creation time, the slice threshold it
            replaces, sensitivity and specificity on the studies it was chosen on).
    """

    threshold: float
    method: str
    model_sha256: str
    calibration_sha256: str | None
    extent_mm: float
    chosen_on: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise InputError(f"threshold must be in [0, 1]; got {self.threshold!r}", "threshold")
        if self.method not in THRESHOLD_METHODS:
            raise InputError(
                f"method must be one of {THRESHOLD_METHODS}; got {self.method!r}", "method"
            )
        if not (math.isfinite(self.extent_mm) and self.extent_mm > 0):
            raise InputError(f"extent_mm must be positive; got {self.extent_mm!r}", "extent_mm")

    @property
    def study_hashes(self) -> set[str]:
        """The image SHA-256s of the studies the threshold was chosen on."""
        return {str(h) for h in self.chosen_on.get("study_sha256", [])}

    def describe(self) -> str:
        """One line for reports, e.g. "0.412 (study_threshold.json: mcc on 12 studies of X)"."""
        on = self.chosen_on
        return (
            f"{self.threshold:.3f} ({STUDY_THRESHOLD_FILE}: {self.method} on "
            f"{on.get('n_studies')} validation studies of {on.get('input')})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` restores an equal object."""
        return {
            "kind": "lungcad-study-threshold",
            "threshold": float(self.threshold),
            "method": self.method,
            "rule": STUDY_RULE,
            "model_sha256": self.model_sha256,
            "calibration_sha256": self.calibration_sha256,
            "aggregation": {
                "method": "mean of top-k slice probabilities",
                "extent_mm": self.extent_mm,
            },
            "chosen_on": self.chosen_on,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StudyThreshold:
        """Rebuild a study threshold written by :meth:`to_dict`.

        Raises:
            InputError: a missing or malformed field.
        """
        try:
            return cls(
                threshold=float(values["threshold"]),
                method=str(values["method"]),
                model_sha256=str(values["model_sha256"]),
                calibration_sha256=(
                    None
                    if values.get("calibration_sha256") is None
                    else str(values["calibration_sha256"])
                ),
                extent_mm=float(values["aggregation"]["extent_mm"]),
                chosen_on=dict(values["chosen_on"]),
                info=dict(values.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"not a study threshold (missing or bad {exc})", "study_threshold"
            ) from exc


def model_folder(checkpoint: str | Path) -> Path:
    """The folder a model's study threshold lives in: the run folder (also for a ``.pt``
    inside it) or the fold-ensemble folder."""
    path = Path(checkpoint)
    return path.parent if path.is_file() else path


def model_identity(checkpoint_info: Mapping[str, Any]) -> str:
    """What identifies the model's outputs: the checkpoint's SHA-256, or for a fold ensemble
    ``"ensemble:"`` and the SHA-256 of its members' hashes."""
    ensemble = checkpoint_info.get("ensemble")
    if ensemble:
        members = "\n".join(str(h) for h in ensemble.get("member_sha256", []))
        return "ensemble:" + hashlib.sha256(members.encode()).hexdigest()
    return str(checkpoint_info.get("sha256") or "")


def calibration_identity(calibration: Calibration | None) -> str | None:
    """SHA-256 of a calibration's content (None without calibration)."""
    if calibration is None:
        return None
    return hashlib.sha256(to_json(calibration.to_dict()).encode()).hexdigest()


def choose_study_threshold(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, method: str
) -> float:
    """The study threshold on validation studies' labels (1 = tumour) and study probabilities.

    :func:`lungcad.metrics.classification.choose_threshold` on the studies, each counted once.

    Raises:
        InputError: the studies hold a single class, or an unknown method.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.size and 0 < int(y.sum()) < y.size:
        return choose_threshold(y, p, method=method)
    raise InputError(
        f"cannot choose a study threshold on {y.size} studies of which {int(y.sum())} have "
        "tumour: the validation studies need both studies with and without tumour",
        "--studies",
    )


def save_study_threshold(folder: str | Path, threshold: StudyThreshold) -> Path:
    """Write ``folder/study_threshold.json`` atomically and return its path."""
    return write_json_atomic(Path(folder) / STUDY_THRESHOLD_FILE, threshold.to_dict())


def read_study_threshold(folder: str | Path) -> StudyThreshold | None:
    """The study threshold stored in a model folder, or None when it has none.

    Raises:
        InputError: the file exists but is not a valid study threshold.
    """
    path = Path(folder) / STUDY_THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        return StudyThreshold.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, InputError) as exc:
        raise InputError(
            f"invalid study threshold ({exc}); re-run `lungcad calibrate --studies` or delete it",
            path,
        ) from exc


def load_study_threshold(
    folder: str | Path,
    checkpoint_info: Mapping[str, Any],
    calibration: Calibration | None,
    extent_mm: float,
) -> StudyThreshold | None:
    """The model folder's study threshold, checked against the model that will use it.

    Args:
        folder: the model folder (:func:`model_folder`).
        checkpoint_info: the loaded model's info (``sha256``, or ``ensemble``).
        calibration: the slice calibration the predictor applies, or None.
        extent_mm: the predictor's aggregation extent.

    Returns:
        The study threshold, or None when the folder has none.

    Raises:
        InputError: the file is invalid, or was chosen for another model, another
            calibration or another aggregation (a stale threshold is never applied).
    """
    stored = read_study_threshold(folder)
    if stored is None:
        return None
    path = Path(folder) / STUDY_THRESHOLD_FILE
    redo = "; re-run `lungcad calibrate --studies VAL` or delete it"
    model = model_identity(checkpoint_info)
    if stored.model_sha256 != model:
        raise InputError(
            f"{STUDY_THRESHOLD_FILE} was chosen for another model ({stored.model_sha256[:20]}..., "
            f"now {model[:20]}...)" + redo,
            path,
        )
    if stored.calibration_sha256 != calibration_identity(calibration):
        raise InputError(
            f"{STUDY_THRESHOLD_FILE} was chosen on study probabilities with "
            + ("no calibration" if stored.calibration_sha256 is None else "another calibration")
            + ", and the run's calibration.json has changed since"
            + redo,
            path,
        )
    if not math.isclose(stored.extent_mm, float(extent_mm), rel_tol=1e-9):
        raise InputError(
            f"{STUDY_THRESHOLD_FILE} was chosen for study probabilities aggregated over "
            f"{stored.extent_mm:g} mm, not {float(extent_mm):g} mm" + redo,
            path,
        )
    return stored
