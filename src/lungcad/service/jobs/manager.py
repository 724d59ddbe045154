"""Prediction jobs: one folder per job on disk, a bounded queue, worker threads.

Layout of ``DATA_DIR``::

    jobs/<job_id>/state.json      status and times (written atomically on every change)
    jobs/<job_id>/upload/         the study as received (DICOM files or one NIfTI);
                                  deleted once the job is done (it holds patient identifiers)
    jobs/<job_id>/outputs/        lungcad.inference.predictor.write_study_outputs: mask.nii.gz,
                                  probability.nii.gz, seg.dcm, sr.dcm, findings.json, report.html,
                                  preview.png, cam_*.png
    jobs/<job_id>/render/         arrays for the slice PNG endpoint (service.rendering)
    jobs/<job_id>/result.json     the REST result document
    tmp/                          uploads being received (emptied on start)
    .lock                         held by the running service (one service per data folder)

A job folder appears in ``jobs/`` only when complete (upload staged and checked, state
written, then one rename), so a crash never leaves half a job. Results are written before the
state says ``done``; on start, jobs found ``queued`` or ``running`` are queued again (a job
that was running when the service stopped is re-run from its upload), so a restart loses
neither jobs nor results. A job that was interrupted :data:`MAX_ATTEMPTS` times (e.g. it makes
the process run out of memory) is marked failed rather than retried forever.

Results hold patient data (SEG, SR, findings), so they can be removed: :meth:`JobManager.delete`
(``DELETE /api/v1/jobs/{id}``) and, with ``retention_days``, :meth:`JobManager.sweep_expired`
at start-up and every ``sweep_interval_s`` after. A job is removed by renaming its folder to a
hidden trash name (one atomic step: the job is gone at once) and then deleting that; a
trash folder left by a crash is removed on the next start like any other hidden folder.

Workers are threads: inference is CPU-bound and already multi-threaded inside PyTorch, so the
default is one worker. With more workers, reading and writing studies overlap but calls to the
predictor are serialised by a lock (its Grad-CAM hooks are not thread-safe).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.io.atomic import write_json_atomic
from lungcad.provenance import utc_timestamp
from lungcad.service.audit import AuditLog, result_summary
from lungcad.service.rendering import save_render_data
from lungcad.service.uploads import relative_message

log = logging.getLogger(__name__)

__all__ = [
    "FINISHED",
    "JOB_ID_PATTERN",
    "MAX_ATTEMPTS",
    "JobBusy",
    "JobManager",
    "QueueFull",
    "ServiceBusy",
    "result_document",
]

STATE_FILE = "state.json"
RESULT_FILE = "result.json"
PUBLIC_KEYS = ("job_id", "status", "error", "created_at", "started_at", "finished_at")
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_ATTEMPTS = 3
API_PREFIX = "/api/v1"
FINISHED = ("done", "failed")


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; the client should retry later (503)."""


class ServiceBusy(RuntimeError):
    """Another service holds this data folder's lock."""


class JobBusy(Exception):
    """The job is queued or running, so it cannot be deleted yet (409)."""


def _float(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def result_document(
    job_id: str, volume: Any, result: Any, files: dict[str, Path], model_version: str
) -> dict[str, Any]:
    """The ``GET /api/v1/jobs/{id}/result`` document of a finished prediction.

    Args:
        job_id: the job.
        volume: the canonical input Volume.
        result: its ``StudyResult``.
        files: output name -> path from ``write_study_outputs``.
        model_version: the model that made the result.
    """
    from lungcad.inference.lesions import lesions_to_dicts

    base = f"{API_PREFIX}/jobs/{job_id}/files/"

    def url(name: str) -> str | None:
        return base + name if name in files else None

    return {
        "job_id": job_id,
        "study_probability": float(result.study_probability),
        "is_cancer": bool(result.is_cancer),
        "decision": "cancer suspected" if result.is_cancer else "no cancer suspected",
        "threshold": float(result.threshold),
        "slice_probabilities": [_float(p) for p in result.slice_probabilities],
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
            "report": url("report.html"),
            "findings": url("findings.json"),
            "preview": url("preview.png"),
        },
        "outputs": sorted(files),
    }


class JobManager:
    """Persistent prediction jobs with a bounded queue and worker threads.

    Args:
        data_dir: the service's data folder (see the module notes).
        predictor: anything with ``predict_volume(volume) -> StudyResult``.
        audit: where job events are recorded.
        model_version: recorded with every result.
        workers: worker threads.
        queue_size: most jobs waiting (not running) at once; more are refused (:class:`QueueFull`).
        retention_days: finished and failed jobs older than this (days since ``finished_at``)
            are deleted at start and every ``sweep_interval_s``; None keeps them forever.
        sweep_interval_s: seconds between retention sweeps.
    """

    def __init__(
        self,
        data_dir: str | Path,
        predictor: Any,
        audit: AuditLog,
        *,
        model_version: str,
        workers: int = 1,
        queue_size: int = 16,
        retention_days: float | None = None,
        sweep_interval_s: float = 3600.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.tmp_dir = self.data_dir / "tmp"
        self.predictor = predictor
        self.audit = audit
        self.model_version = model_version
        self.n_workers = int(workers)
        self.queue_size = int(queue_size)
        self.retention_days = None if retention_days is None else float(retention_days)
        self.sweep_interval_s = float(sweep_interval_s)
        self._sweeper: threading.Thread | None = None
        self._states: dict[str, dict[str, Any]] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._predict_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy: set[str] = set()  # names of the workers running a job
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take the data folder's lock, recover jobs from disk and start the workers.

        Raises:
            ServiceBusy: another running service uses this data folder.
        """
        for folder in (self.jobs_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServiceBusy(
                f"{self.data_dir}: another lungcad service is using this data "
                "folder; stop it or choose another --data-dir"
            ) from None
        self._lock_fd = fd
        self._stopping.clear()
        try:
            for leftover in self.tmp_dir.iterdir():  # uploads cut off by the last stop
                shutil.rmtree(leftover, ignore_errors=True)
            self._recover()
        except BaseException:
            self.stop()
            raise
        for i in range(self.n_workers):
            thread = threading.Thread(target=self._work, name=f"lungcad-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.retention_days is not None:
            self.sweep_expired()  # results kept past their time while the service was down
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="lungcad-retention", daemon=True
            )
            self._sweeper.start()
        log.info(
            "job manager started: %d worker(s), %d job(s) queued", self.n_workers, len(self._queue)
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work and release the lock.

        Waiting jobs stay queued on disk; a job being predicted is abandoned (its worker's
        result is discarded) and re-run by the next start, so stopping never waits minutes
        for a large study.

        Args:
            timeout: seconds to wait for idle workers to exit.
        """
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            busy = set(self._busy)
        for thread in self._threads:
            if thread.name not in busy:  # idle workers exit at once; busy ones are abandoned
                thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
            self._sweeper = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("job manager stopped")

    @property
    def running(self) -> bool:
        """True while started and at least one worker thread is alive."""
        return not self._stopping.is_set() and any(t.is_alive() for t in self._threads)

    def _recover(self) -> None:
        """Load every job's state; queue again those that were queued or running."""
        self._states.clear()
        self._queue.clear()
        pending = []
        for folder in sorted(self.jobs_dir.iterdir()):
            state_file = folder / STATE_FILE
            if folder.name.startswith(".") or not state_file.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted rename or output
                continue
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.error("%s is unreadable; job %s skipped", state_file, folder.name)
                continue
            for tmp in folder.glob(".*"):  # temporaries of interrupted atomic writes
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            job_id = folder.name
            if state.get("job_id") != job_id:
                log.error("%s names another job (%s); skipped", state_file, state.get("job_id"))
                continue
            self._states[job_id] = state
            if state["status"] == "done" and (folder / "upload").exists():
                shutil.rmtree(folder / "upload", ignore_errors=True)
            if state["status"] in ("queued", "running"):
                if state.get("attempts", 0) >= MAX_ATTEMPTS:
                    self._finish(
                        job_id,
                        "failed",
                        error=(
                            f"the service stopped {state['attempts']} times while processing this "
                            "study; gave up (the study may be too large for this server)"
                        ),
                        reason="abandoned",
                    )
                    continue
                if state["status"] == "running":
                    log.info("job %s was running when the service stopped; queued again", job_id)
                    self._set(job_id, status="queued", started_at=None)
                pending.append(state)
        for state in sorted(pending, key=lambda s: s["created_at"]):
            self._queue.append(state["job_id"])

    # ------------------------------------------------------------------ queries

    def public(self, job_id: str) -> dict[str, Any] | None:
        """The job's public status (``PUBLIC_KEYS``), or None for an unknown job."""
        with self._cond:
            state = self._states.get(job_id)
            return None if state is None else {k: state.get(k) for k in PUBLIC_KEYS}

    def list(self) -> list[dict[str, Any]]:
        """Public status of every job, newest first."""
        with self._cond:
            states = sorted(self._states.values(), key=lambda s: s["created_at"], reverse=True)
            return [{k: s.get(k) for k in PUBLIC_KEYS} for s in states]

    def state(self, job_id: str) -> dict[str, Any] | None:
        """The full internal state (a copy), or None."""
        with self._cond:
            state = self._states.get(job_id)
            return None if state is None else dict(state)

    def job_dir(self, job_id: str) -> Path:
        """The job's folder."""
        return self.jobs_dir / job_id

    def counts(self) -> dict[str, int]:
        """Number of jobs per status, and ``waiting`` (queued in memory)."""
        with self._cond:
            out = collections.Counter(s["status"] for s in self._states.values())
            return {
                "waiting": len(self._queue),
                **{k: out.get(k, 0) for k in ("queued", "running", "done", "failed")},
            }

    def accepting(self) -> bool:
        """True when a new job would be accepted now."""
        with self._cond:
            return self.running and len(self._queue) < self.queue_size

    # ------------------------------------------------------------------ submission

    def new_staging_dir(self) -> Path:
        """An empty folder under ``tmp/`` to receive an upload into."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        folder = self.tmp_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def submit(self, staged: Path, input_info: dict[str, Any], user: str) -> dict[str, Any]:
        """Turn a staged, checked upload into a queued job.

        Args:
            staged: folder holding ``upload/`` (see ``uploads.prepare_study``); it is moved.
            input_info: ``{"format", "input_path", "n_files"}``.
            user: the submitting token id.

        Returns:
            The job's public status.

        Raises:
            QueueFull: ``queue_size`` jobs are already waiting, or the service is stopping.
        """
        with self._cond:
            if not self.running or len(self._queue) >= self.queue_size:
                raise QueueFull(
                    f"{len(self._queue)} studies are waiting (limit {self.queue_size}); retry later"
                )
            job_id = uuid.uuid4().hex
            state = {
                "job_id": job_id,
                "status": "queued",
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
            os.replace(staged, self.job_dir(job_id))
            self._states[job_id] = state
            self._queue.append(job_id)
            self._cond.notify()
            public = {k: state.get(k) for k in PUBLIC_KEYS}  # before a worker can take it
        self.audit.record(
            "study_submitted", user=user, job_id=job_id, model_version=self.model_version
        )
        return public

    # ------------------------------------------------------------------ removal

    def delete(self, job_id: str, *, user: str, action: str = "job_deleted") -> None:
        """Remove a finished or failed job: its results, render data and any upload.

        The folder is first renamed to a hidden trash name (atomic: the job disappears at
        once, and a crash leaves only trash, which the next start removes), then deleted.

        Args:
            job_id: the job.
            user: who removed it (a token id, or ``"system"`` for retention).
            action: the audit action recorded (``job_deleted`` or ``job_expired``).

        Raises:
            KeyError: unknown job.
            JobBusy: the job is queued or running.
        """
        with self._cond:
            state = self._states.get(job_id)
            if state is None:
                raise KeyError(job_id)
            if state["status"] not in FINISHED:
                raise JobBusy(
                    f"job {job_id} is {state['status']}; it can be deleted once it "
                    "is done or failed"
                )
            trash: Path | None = self.jobs_dir / f".deleted-{job_id}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.job_dir(job_id), trash)
            except FileNotFoundError:  # removed by hand: forget it all the same
                trash = None
            del self._states[job_id]
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
            if trash.exists():
                log.warning("could not remove all of %s; the next start removes it", trash)
        self.audit.record(
            action,
            user=user,
            job_id=job_id,
            study=state.get("study"),
            model_version=self.model_version,
        )
        log.info("job %s: %s", job_id, action.removeprefix("job_"))

    def sweep_expired(self, now: datetime | None = None) -> list[str]:
        """Delete finished and failed jobs whose ``finished_at`` is over ``retention_days`` ago.

        Args:
            now: the time to measure age against (timezone-aware; default: now, UTC).

        Returns:
            The ids of the jobs deleted (none when ``retention_days`` is None).
        """
        if self.retention_days is None:
            return []
        cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=self.retention_days)
        with self._cond:
            candidates = [
                (job_id, s.get("finished_at"))
                for job_id, s in self._states.items()
                if s["status"] in FINISHED
            ]
        removed = []
        for job_id, finished_at in candidates:
            try:
                expired = finished_at is not None and datetime.fromisoformat(finished_at) < cutoff
            except (TypeError, ValueError):
                log.error("job %s: unreadable finished_at %r; not swept", job_id, finished_at)
                continue
            if not expired:
                continue
            try:
                self.delete(job_id, user="system", action="job_expired")
            except (KeyError, JobBusy):  # deleted by a client meanwhile
                continue
            except OSError as exc:
                log.error(
                    "job %s: could not be removed (%s); retried at the next sweep", job_id, exc
                )
                continue
            removed.append(job_id)
        if removed:
            log.info(
                "retention: %d job(s) older than %g days removed", len(removed), self.retention_days
            )
        return removed

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.sweep_interval_s):
            try:
                self.sweep_expired()
            except Exception:  # a bad sweep must not end retention for good
                log.exception("retention sweep failed")

    # ------------------------------------------------------------------ work

    def _set(self, job_id: str, **changes: Any) -> dict[str, Any]:
        with self._cond:
            state = self._states[job_id]
            state.update(changes)
            write_json_atomic(self.job_dir(job_id) / STATE_FILE, state)
            return dict(state)

    def _finish(
        self,
        job_id: str,
        status: str,
        *,
        error: str | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        state = self._set(
            job_id, status=status, error=error, finished_at=utc_timestamp("milliseconds")
        )
        action = "job_done" if status == "done" else "job_failed"
        self.audit.record(
            action,
            user=state.get("user") or "unknown",
            job_id=job_id,
            study=state.get("study"),
            model_version=self.model_version,
            result=result,
            reason=reason,
        )

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping.is_set():
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                job_id = self._queue.popleft()
                self._busy.add(threading.current_thread().name)
            try:
                self._run(job_id)
            except Exception:  # never let a bug in one job kill the worker
                log.exception("job %s: unexpected error in the worker", job_id)
            finally:
                with self._cond:
                    self._busy.discard(threading.current_thread().name)

    def _run(self, job_id: str) -> None:
        from lungcad.inference.outputs import write_study_outputs
        from lungcad.io import read_image

        state = self._set(
            job_id,
            status="running",
            started_at=utc_timestamp("milliseconds"),
            attempts=self.state(job_id).get("attempts", 0) + 1,
        )
        self.audit.record(
            "job_started",
            user=state.get("user") or "unknown",
            job_id=job_id,
            model_version=self.model_version,
        )
        folder = self.job_dir(job_id)
        log.info("job %s: started (%s)", job_id, state["format"])
        try:
            volume = read_image(folder / state["input_path"])
            study = self.audit.hash_uid(volume.meta.get("study_instance_uid"))
            self._set(job_id, study=study)
            with self._predict_lock:
                if self._stopping.is_set():
                    return  # stays "running" on disk: the next start re-runs it
                result = self.predictor.predict_volume(volume)
            if self._stopping.is_set():
                return  # abandoned (see stop()); the next start re-runs it
            files = write_study_outputs(volume, result, folder / "outputs")
            cam = None if result.cam is None else result.cam.array
            save_render_data(folder / "render", volume, result.mask.array, cam, result.cam_slices)
            write_json_atomic(
                folder / RESULT_FILE,
                result_document(job_id, volume, result, files, self.model_version),
            )
        except Exception as exc:
            if self._stopping.is_set():
                return
            expected = isinstance(exc, ValueError | FileNotFoundError)
            if expected:
                log.warning("job %s failed: %s", job_id, exc)
                message = str(exc)
            else:
                log.exception("job %s failed", job_id)
                message = f"internal error ({type(exc).__name__}: {exc})"
            message = relative_message(message, folder / state["input_path"])
            self._finish(
                job_id,
                "failed",
                error=message,
                reason="input_error" if expected else "internal_error",
            )
            return
        self._finish(
            job_id,
            "done",
            result=result_summary(result.study_probability, result.is_cancer, len(result.lesions)),
        )
        with contextlib.suppress(OSError):
            shutil.rmtree(folder / "upload")  # patient identifiers are kept no longer than needed
        log.info("job %s: done (p=%.3f)", job_id, result.study_probability)
