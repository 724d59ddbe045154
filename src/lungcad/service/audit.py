"""Structured audit log: who did what to which study, and what the model said, with no PHI.

One JSON object per line in ``DATA_DIR/audit.log``::

    {"time": "2025-01-01T12:00:00.123+00:00", "user": "tok-3f2a9c01be", "action": "job_done",
     "job_id": "...", "study": "sha256:9a0c...", "model_version": "0.1.0+691b1fb1655d",
     "result": {"probability": 0.83, "decision": "cancer suspected", "n_lesions": 2}}

What is *not* in it, by construction: patient names, patient IDs, birth dates, raw DICOM UIDs,
file names from uploads and free-text error messages (these can hold any of the former). A
study is named by ``sha256(salt + StudyInstanceUID)``, where the salt is random per install
(``DATA_DIR/audit_salt``, created once, mode 0600): the same study gets the same hash on this
install, so an auditor holding the UID can check the log, but the hash cannot be matched
against UIDs from elsewhere. Records are built only from the keyword arguments of
:meth:`AuditLog.record`, so a caller cannot pass a whole header or an exception text through.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lungcad.finding import StudyFinding

__all__ = ["AUDIT_FILE", "SALT_FILE", "AuditLog", "load_salt", "result_summary"]

AUDIT_FILE = "audit.log"
SALT_FILE = "audit_salt"

#: Reasons an upload or job may be refused or fail, as categories (never the message itself).
REASONS = (
    "too_large",
    "too_many_files",
    "corrupt",
    "not_ct",
    "bad_request",
    "queue_full",
    "input_error",
    "internal_error",
    "abandoned",
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def result_summary(finding: StudyFinding, n_lesions: int) -> dict[str, Any]:
    """The result part of an audit record: probability (None without a decision), decision
    (the finding's status) and lesion count only."""
    return {
        "probability": None if finding.probability is None else round(finding.probability, 4),
        "decision": finding.status,
        "n_lesions": int(n_lesions),
    }


def load_salt(path: Path) -> bytes:
    """The install's salt, created on first use (O_EXCL: two starting services agree).

    Also the key of the PACS watcher's study tags in its logs (``lungcad.service.redact``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        text = path.read_text(encoding="ascii").strip()
        if len(text) < 32:
            raise ValueError(
                f"{path}: audit salt is damaged (expected 64 hex digits); restore "
                "it from a backup, or delete it to start a new one (earlier study "
                "hashes will then no longer match)"
            ) from None
        return bytes.fromhex(text)
    salt = secrets.token_bytes(32)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(salt.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return salt


class AuditLog:
    """Append-only JSON-lines audit log (thread-safe; each record is flushed and fsynced).

    Args:
        path: the log file (created if missing).
        salt: secret bytes mixed into study hashes.
    """

    def __init__(self, path: str | Path, salt: bytes) -> None:
        self.path = Path(path)
        self._salt = bytes(salt)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, data_dir: str | Path) -> AuditLog:
        """The audit log of a service data folder (``audit.log`` and ``audit_salt`` in it)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / AUDIT_FILE, load_salt(data_dir / SALT_FILE))

    def hash_uid(self, uid: str | None) -> str | None:
        """``"sha256:<hex>"`` of the salted UID, or None when there is no UID (e.g. NIfTI)."""
        if not uid:
            return None
        return "sha256:" + hashlib.sha256(self._salt + str(uid).encode("utf-8")).hexdigest()

    def record(
        self,
        action: str,
        *,
        user: str,
        job_id: str | None = None,
        study: str | None = None,
        model_version: str | None = None,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
        file: str | None = None,
        status: int | None = None,
    ) -> dict[str, Any]:
        """Append one record and return it.

        Args:
            action: what happened (``study_submitted``, ``upload_rejected``, ``job_started``,
                ``job_done``, ``job_failed``, ``result_viewed``, ``file_downloaded``,
                ``service_started``, ...).
            user: the caller's token id (never the token).
            job_id: the job concerned.
            study: a study hash from :meth:`hash_uid` (never a raw UID).
            model_version: the model that produced or will produce the result.
            result: :func:`result_summary` output.
            reason: a category from :data:`REASONS`, never an error message.
            file: the name of a result file downloaded (a fixed output name, e.g. ``seg.dcm``).
            status: the HTTP status returned, where one was.
        """
        if reason is not None and reason not in REASONS:
            raise ValueError(f"audit reason must be one of {REASONS}; got {reason!r}")
        if study is not None and not study.startswith("sha256:"):
            raise ValueError("audit records take a hashed study UID (AuditLog.hash_uid)")
        entry: dict[str, Any] = {"time": _now(), "user": user, "action": action}
        optional = {
            "job_id": job_id,
            "study": study,
            "model_version": model_version,
            "result": result,
            "reason": reason,
            "file": file,
            "status": status,
        }
        entry.update({k: v for k, v in optional.items() if v is not None})
        line = json.dumps(entry, separators=(",", ":"), sort_keys=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return entry
