"""The service's jobs on disk: one folder per job, its state written atomically on every change.

Layout of ``DATA_DIR``::

    jobs/<job_id>/state.json      status, times and owner (``user``: the client id that
                                  submitted it; written atomically on every change)
    jobs/<job_id>/upload/         the study as received (DICOM files or one NIfTI);
                                  deleted once the job is done (it holds patient identifiers)
    jobs/<job_id>/outputs/        lungcad.inference.outputs.write_study_outputs: mask.nii.gz,
                                  probability.nii.gz, seg.dcm, sr.dcm, findings.json, report.html,
                                  preview.png, cam_*.png
    jobs/<job_id>/render/         arrays for the slice PNG endpoint (service.rendering)
    jobs/<job_id>/result.json     the REST result document (service.jobs.schema)
    jobs/<job_id>/error.txt       a failed job's full error and traceback, for the
                                  administrator only (logs and the API get a redacted line)
    tmp/                          uploads being received (emptied on open)
    .lock                         held by the open store (one service per data folder)

A job folder appears in ``jobs/`` only when complete (upload staged and checked, state
written, then one rename), so a crash never leaves half a job. A job is removed by renaming
its folder to a hidden trash name (one atomic step: the job is gone at once) and then
deleting that; hidden folders left by a crash (trash, interrupted renames) are removed by the
next :meth:`JobStore.open`.

:class:`JobStore` keeps every job's state in memory as well, behind one lock, so status queries
never read the disk; it knows nothing of queues, threads or the audit log
(``service.jobs.workers`` and ``service.jobs.manager`` do).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from lungcad.io.atomic import write_json_atomic
from lungcad.provenance import utc_timestamp
from lungcad.service.jobs.schema import FINISHED, JobStatus, public_view
from lungcad.service.redact import describe

log = logging.getLogger(__name__)

__all__ = ["RESULT_FILE", "STATE_FILE", "JobBusy", "JobStore", "ServiceBusy"]

STATE_FILE = "state.json"
RESULT_FILE = "result.json"
UPLOAD_DIR = "upload"
LOCK_FILE = ".lock"


class ServiceBusy(RuntimeError):
    """Another service holds this data folder's lock."""


class JobBusy(Exception):
    """The job is queued or running, so it cannot be deleted yet (409)."""


class JobStore:
    """Every job's state, in memory and in ``DATA_DIR/jobs/<id>/state.json``; thread-safe.

    Args:
        data_dir: the service's data folder (see the module notes).
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.tmp_dir = self.data_dir / "tmp"
        self._states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Take the data folder's lock, empty ``tmp/`` and load every job from disk.

        Raises:
            ServiceBusy: another running service uses this data folder.
        """
        for folder in (self.jobs_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServiceBusy(
                f"{self.data_dir}: another lungcad service is using this data "
                "folder; stop it or choose another --data-dir"
            ) from None
        self._lock_fd = fd
        try:
            for leftover in self.tmp_dir.iterdir():  # uploads cut off by the last stop
                shutil.rmtree(leftover, ignore_errors=True)
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the data folder's lock (states stay readable in memory)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self) -> None:
        """Read every job folder's state; remove what a crash left behind."""
        states = {}
        for folder in sorted(self.jobs_dir.iterdir()):
            state_file = folder / STATE_FILE
            if folder.name.startswith(".") or not state_file.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted rename or removal
                continue
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
                state["status"] = JobStatus(state["status"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error(
                    "job %s: %s is unreadable (%s); skipped", folder.name, STATE_FILE, describe(exc)
                )
                continue
            for tmp in folder.glob(".*"):  # temporaries of interrupted atomic writes
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            job_id = folder.name
            if state.get("job_id") != job_id:
                log.error("job %s: its %s names another job; skipped", job_id, STATE_FILE)
                continue
            if state["status"] == JobStatus.DONE and (folder / UPLOAD_DIR).exists():
                self.remove_upload(job_id)  # the job ended before its upload was removed
            states[job_id] = state
        with self._lock:
            self._states = states

    # ------------------------------------------------------------------ queries

    def job_dir(self, job_id: str) -> Path:
        """The job's folder."""
        return self.jobs_dir / job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's full internal state (a copy), or None for an unknown job."""
        with self._lock:
            state = self._states.get(job_id)
            return None if state is None else dict(state)

    def owner(self, job_id: str) -> str | None:
        """The client id that submitted the job (its owner), or None for an unknown job."""
        with self._lock:
            state = self._states.get(job_id)
            return None if state is None else state.get("user")

    def public(self, job_id: str) -> dict[str, Any] | None:
        """The job's public status (``schema.PUBLIC_KEYS``), or None for an unknown job."""
        with self._lock:
            state = self._states.get(job_id)
            return None if state is None else public_view(state)

    def list_public(
        self, owner: str | None = None, *, show_owner: bool = False
    ) -> list[dict[str, Any]]:
        """Public status of the jobs, newest first.

        Args:
            owner: only the jobs of this client id; None: every job.
            show_owner: add each job's ``owner`` (for an admin's list).
        """
        with self._lock:
            # Jobs made within one millisecond share a time stamp; the stable sort over the
            # newest-first insertion order keeps those ties newest first too.
            newest_first = reversed(
                [s for s in self._states.values() if owner is None or s.get("user") == owner]
            )
            states = sorted(newest_first, key=lambda s: s["created_at"], reverse=True)
            if show_owner:
                return [{**public_view(s), "owner": s.get("user")} for s in states]
            return [public_view(s) for s in states]

    def unfinished(self) -> list[dict[str, Any]]:
        """States (copies) of the queued and running jobs, oldest first."""
        with self._lock:
            states = [dict(s) for s in self._states.values() if s["status"] not in FINISHED]
        return sorted(states, key=lambda s: s["created_at"])

    def status_counts(self) -> dict[str, int]:
        """Number of jobs per status (every :class:`JobStatus` value, zeros included)."""
        with self._lock:
            counts = collections.Counter(s["status"] for s in self._states.values())
        return {status.value: counts.get(status, 0) for status in JobStatus}

    def finished_before(self, cutoff: datetime) -> list[str]:
        """Ids of the done and failed jobs whose ``finished_at`` is before ``cutoff``.

        Args:
            cutoff: timezone-aware time; a job with an unreadable ``finished_at`` is logged
                and left alone.
        """
        with self._lock:
            candidates = [
                (job_id, s.get("finished_at"))
                for job_id, s in self._states.items()
                if s["status"] in FINISHED
            ]
        expired = []
        for job_id, finished_at in candidates:
            try:
                if finished_at is not None and datetime.fromisoformat(finished_at) < cutoff:
                    expired.append(job_id)
            except (TypeError, ValueError):
                log.error("job %s: unreadable finished_at %r; not swept", job_id, finished_at)
        return expired

    # ------------------------------------------------------------------ changes

    def new_staging_dir(self) -> Path:
        """An empty folder under ``tmp/`` to receive an upload into."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        folder = self.tmp_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def create(self, staged: Path, input_info: dict[str, Any], user: str) -> dict[str, Any]:
        """Turn a staged, checked upload into a new queued job (one rename into ``jobs/``).

        Args:
            staged: folder holding ``upload/`` (see ``uploads.prepare_study``); it is moved.
            input_info: ``{"format", "input_path", "n_files"}``.
            user: the submitting client id: the job's owner (kept in ``state.json``, so it
                survives a restart).

        Returns:
            The new job's state (a copy).
        """
        job_id = uuid.uuid4().hex
        state: dict[str, Any] = {
            "job_id": job_id,
            "status": JobStatus.QUEUED,
            "error": None,
            "created_at": utc_timestamp("milliseconds"),
            "started_at": None,
            "finished_at": None,
            "attempts": 0,
            "user": user,
            "format": input_info["format"],
            "input_path": input_info["input_path"],
            "n_files": input_info.get("n_files"),
            "study": None,
        }
        write_json_atomic(staged / STATE_FILE, state)
        with self._lock:
            os.replace(staged, self.job_dir(job_id))
            self._states[job_id] = state
            return dict(state)

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Change a job's state, in memory and on disk (atomically); returns a copy.

        Raises:
            KeyError: unknown job.
        """
        if "status" in changes:
            changes["status"] = JobStatus(changes["status"])
        with self._lock:
            state = self._states[job_id]
            state.update(changes)
            write_json_atomic(self.job_dir(job_id) / STATE_FILE, state)
            return dict(state)

    def remove_upload(self, job_id: str) -> None:
        """Delete the job's uploaded study (it holds patient identifiers); errors ignored."""
        shutil.rmtree(self.job_dir(job_id) / UPLOAD_DIR, ignore_errors=True)

    def remove(self, job_id: str) -> dict[str, Any]:
        """Remove a done or failed job's folder (results, render data, any upload).

        The folder is first renamed to a hidden trash name (atomic: the job disappears at
        once, and a crash leaves only trash, which the next :meth:`open` removes), then deleted.

        Returns:
            The removed job's last state.

        Raises:
            KeyError: unknown job.
            JobBusy: the job is queued or running.
        """
        with self._lock:
            state = self._states.get(job_id)
            if state is None:
                raise KeyError(job_id)
            if state["status"] not in FINISHED:
                raise JobBusy(
                    f"job {job_id} is {state['status']}; it can be deleted once it "
                    "is done or failed"
                )
            trash = self.jobs_dir / f".deleted-{job_id}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.job_dir(job_id), trash)
            except FileNotFoundError:  # removed by hand: forget it all the same
                pass
            del self._states[job_id]
        shutil.rmtree(trash, ignore_errors=True)  # outside the lock: may take a while
        if trash.exists():
            log.warning("job %s: not all of it could be removed; the next start does", job_id)
        return state
