"""The study finding: a decision with its probability and threshold, or why there is none.

A plain record shared by the stage that decides (:mod:`lungcad.inference.predictor`) and every
writer that reports the decision (findings.json, the HTML report, the DICOM SR, the service's
job summary, the PACS watcher), so that "no decision" reads the same everywhere. A finding is
one of:

- ``"cancer suspected"`` / ``"no cancer suspected"``: assessed; ``probability`` and
  ``threshold`` are set and the decision is ``probability >= threshold``;
- ``"cannot assess"``: the input checks found the study outside what the model was trained for
  (``reason`` says why, e.g. "no lung in the image"); no probability is reported;
- ``"no classifier"``: the model has no trained cancer classifier (a segmentation-only run):
  masks may be given, a decision never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ASSESSED", "CANCER", "CANNOT_ASSESS", "NO_CANCER", "NO_CLASSIFIER", "StudyFinding"]

CANCER = "cancer suspected"
NO_CANCER = "no cancer suspected"
CANNOT_ASSESS = "cannot assess"
NO_CLASSIFIER = "no classifier"
#: The statuses that carry a probability and a decision.
ASSESSED = (CANCER, NO_CANCER)
_STATUSES = (CANCER, NO_CANCER, CANNOT_ASSESS, NO_CLASSIFIER)


@dataclass(frozen=True)
class StudyFinding:
    """The study-level finding.

    Attributes:
        status: one of ``CANCER``, ``NO_CANCER``, ``CANNOT_ASSESS``, ``NO_CLASSIFIER``.
        probability: the study's cancer probability in [0, 1]; None unless assessed.
        threshold: the decision threshold in [0, 1]; None unless assessed.
        reason: why there is no decision (one line, no patient data); None when assessed.
    """

    status: str
    probability: float | None = None
    threshold: float | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"unknown finding status {self.status!r}")
        if self.assessed != (self.probability is not None and self.threshold is not None):
            raise ValueError(
                f"a {self.status!r} finding needs probability and threshold "
                "exactly when it is assessed"
            )
        if not self.assessed and not self.reason:
            raise ValueError(f"a {self.status!r} finding needs a reason")

    @classmethod
    def decide(cls, probability: float, threshold: float) -> StudyFinding:
        """The assessed finding: cancer suspected when ``probability >= threshold``."""
        status = CANCER if probability >= threshold else NO_CANCER
        return cls(status, float(probability), float(threshold))

    @classmethod
    def not_assessed(cls, status: str, reason: str) -> StudyFinding:
        """A finding without a decision (``CANNOT_ASSESS`` or ``NO_CLASSIFIER``)."""
        return cls(status, reason=reason)

    @property
    def assessed(self) -> bool:
        """True when the finding carries a probability and a decision."""
        return self.status in ASSESSED

    @property
    def is_cancer(self) -> bool | None:
        """The decision: True/False when assessed, None otherwise."""
        return None if not self.assessed else self.status == CANCER

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``status``, ``decision`` (the same words), ``is_cancer``, ``probability``,
        ``threshold``, ``reason``."""
        return {
            "status": self.status,
            "decision": self.status,
            "is_cancer": self.is_cancer,
            "probability": self.probability,
            "threshold": self.threshold,
            "reason": self.reason,
        }
