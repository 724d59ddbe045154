"""What the REST API says about a job: its URL prefix, statuses, public keys and result document.

These are the service's public vocabulary: the strings here are stored in every job's
``state.json``, returned by ``GET /api/v1/jobs/{id}`` and read by the web viewer
(``static/api.js`` keeps its own copy of :data:`API_PREFIX`, relative), so they never change.
"""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from typing import Any

from lungcad.inference.lesions import lesions_to_dicts

__all__ = [
    "API_PREFIX",
    "FINISHED",
    "JOB_ID_PATTERN",
    "PUBLIC_KEYS",
    "JobStatus",
    "is_job_id",
    "public_view",
    "result_document",
]

#: Path prefix of every token-protected endpoint (the API's version is part of its URLs).
API_PREFIX = "/api/v1"
#: A job id: 32 lowercase hex digits (``uuid4().hex``); anything else is no job.
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
#: The keys of a job's public status; the rest of ``state.json`` is internal.
PUBLIC_KEYS = ("job_id", "status", "error", "created_at", "started_at", "finished_at")


class JobStatus(str, enum.Enum):
    """A job's status; the value is the string on disk and in the API.

    ``queued -> running -> done | failed``; a job interrupted by a stop goes back to
    ``queued`` at the next start.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        # The plain value in messages and f-strings on every Python version (3.12 changed
        # format() of str-mixin enums to the member name).
        return self.value


#: Statuses a job never leaves (it may then be deleted).
FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED})


def is_job_id(text: str) -> bool:
    """True when ``text`` has the form of a job id (see :data:`JOB_ID_PATTERN`)."""
    return re.fullmatch(JOB_ID_PATTERN, text) is not None


def public_view(state: dict[str, Any]) -> dict[str, Any]:
    """The public status of a job (:data:`PUBLIC_KEYS` of its state; missing ones None)."""
    return {key: state.get(key) for key in PUBLIC_KEYS}


def _finite_or_none(value: float | None) -> float | None:
    # Slices without lung have no probability (NaN); JSON has no NaN, the API says null.
    return float(value) if value is not None and math.isfinite(value) else None


def result_document(
    job_id: str, volume: Any, result: Any, files: dict[str, Path], model_version: str
) -> dict[str, Any]:
    """The ``GET /api/v1/jobs/{id}/result`` document of a finished prediction.

    Args:
        job_id: the job.
        volume: the canonical input ``Volume`` (shape ``(z, y, x)``, spacing in mm).
        result: its ``StudyResult``.
        files: output name -> path from ``write_study_outputs``.
        model_version: the model that made the result.

    Returns:
        A JSON-ready dict: the finding (probability, decision, threshold; None without a
        decision, with its reason), the input checks, per-slice probabilities
        (None where a slice has no lung), lesions, shape and spacing, Grad-CAM slices,
        warnings, and download URLs under :data:`API_PREFIX` (None for outputs not written,
        e.g. SEG, SR and KOS for NIfTI input, SEG for a study without lesions).
    """
    base = f"{API_PREFIX}/jobs/{job_id}/files/"

    def url(name: str) -> str | None:
        return base + name if name in files else None

    return {
        "job_id": job_id,
        # The finding (lungcad.finding): probability, is_cancer and threshold are None when
        # there is no decision ("cannot assess", "no classifier"); "reason" then says why.
        "study_probability": result.finding.probability,
        "is_cancer": result.finding.is_cancer,
        "decision": result.finding.status,
        "threshold": result.finding.threshold,
        "finding": result.finding.to_dict(),
        "input_check": None if result.input_check is None else result.input_check.to_dict(),
        "slice_probabilities": [_finite_or_none(p) for p in result.slice_probabilities],
        "lesions": lesions_to_dicts(result.lesions),
        "n_slices": int(volume.shape[0]),
        "shape_zyx": [int(s) for s in volume.shape],
        "spacing_zyx": [float(s) for s in volume.spacing],
        "cam_slices": [int(z) for z in result.cam_slices] if result.cam is not None else [],
        "warnings": list(result.warnings),
        "model_version": model_version,
        "files": {
            "mask": url("mask.nii.gz"),
            "probability": url("probability.nii.gz"),
            "seg": url("seg.dcm"),
            "sr": url("sr.dcm"),
            "ko": url("ko.dcm"),
            "report": url("report.html"),
            "findings": url("findings.json"),
            "preview": url("preview.png"),
        },
        "outputs": sorted(files),
    }
