"""The service's jobs as one object: store and workers started and stopped together, and jobs
removed (on request or when their retention time is over), every removal audited.

:class:`JobManager` is what ``service.app`` holds: ``manager.store`` answers status queries
(:mod:`lungcad.service.jobs.store`), ``manager.workers`` takes submissions
(:mod:`lungcad.service.jobs.workers`). Results hold patient data (SEG, SR, findings), so they
can be removed: :meth:`JobManager.delete` (``DELETE /api/v1/jobs/{id}``) and, with
``retention_days``, :meth:`JobManager.sweep_expired` at start-up and every
``sweep_interval_s`` after.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lungcad.service.audit import AuditLog
from lungcad.service.jobs.store import JobBusy, JobStore
from lungcad.service.jobs.workers import JobWorkers
from lungcad.service.redact import describe

log = logging.getLogger(__name__)

__all__ = ["JobManager"]


class JobManager:
    """Persistent prediction jobs: a store on disk, worker threads, and retention.

    Args:
        data_dir: the service's data folder (see :mod:`lungcad.service.jobs.store`).
        predictor: anything with ``predict_volume(volume) -> StudyResult``.
        audit: where job events are recorded.
        model_version: recorded with every result.
        workers: worker threads.
        queue_size: most jobs waiting (not running) at once; more are refused
            (:class:`~lungcad.service.jobs.workers.QueueFull`).
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
        self.store = JobStore(data_dir)
        self.workers = JobWorkers(
            self.store,
            predictor,
            audit,
            model_version=model_version,
            workers=workers,
            queue_size=queue_size,
        )
        self.audit = audit
        self.model_version = model_version
        self.retention_days = None if retention_days is None else float(retention_days)
        self.sweep_interval_s = float(sweep_interval_s)
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the store (take the data folder's lock, load the jobs), start the workers and,
        with ``retention_days``, sweep once and start the periodic sweeps.

        Raises:
            ServiceBusy: another running service uses this data folder.
        """
        self.store.open()
        self._stopping.clear()
        try:
            self.workers.start()
        except BaseException:
            self.stop()
            raise
        if self.retention_days is not None:
            self.sweep_expired()  # results kept past their time while the service was down
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="lungcad-retention", daemon=True
            )
            self._sweeper.start()
        log.info(
            "job manager started: %d worker(s), %d job(s) queued",
            self.workers.n_workers,
            self.workers.waiting(),
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers (see :meth:`JobWorkers.stop`) and sweeps; release the lock.

        Args:
            timeout: seconds to wait for idle threads to exit (all together).
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self.workers.stop(timeout)
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
            self._sweeper = None
        self.store.close()
        log.info("job manager stopped")

    def counts(self) -> dict[str, int]:
        """``waiting`` (queued in memory) and the number of jobs per status."""
        return {"waiting": self.workers.waiting(), **self.store.status_counts()}

    # ------------------------------------------------------------------ removal

    def delete(self, job_id: str, *, user: str, action: str = "job_deleted") -> None:
        """Remove a finished or failed job (see :meth:`JobStore.remove`) and audit it.

        Args:
            job_id: the job.
            user: who removed it (a token id, or ``"system"`` for retention).
            action: the audit action recorded (``job_deleted`` or ``job_expired``).

        Raises:
            KeyError: unknown job.
            JobBusy: the job is queued or running.
        """
        state = self.store.remove(job_id)
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
        removed = []
        for job_id in self.store.finished_before(cutoff):
            try:
                self.delete(job_id, user="system", action="job_expired")
            except (KeyError, JobBusy):  # deleted by a client meanwhile
                continue
            except OSError as exc:
                log.error(
                    "job %s: could not be removed (%s); retried at the next sweep",
                    job_id,
                    describe(exc),
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
            except Exception as exc:  # a bad sweep must not end retention for good
                log.error("retention sweep failed: %s", describe(exc))
