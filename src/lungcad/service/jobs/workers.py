"""The prediction workers: a bounded queue of job ids and the threads that run them.

A worker takes the oldest queued job, marks it ``running``, reads its upload, predicts, writes
the outputs, render data and result document (``jobs/<id>/result.json``), and only then marks
it ``done`` (or ``failed`` with a message for the client), so a restart never finds a ``done``
job without results. On start, jobs found ``queued`` or ``running`` in the
:class:`~lungcad.service.jobs.store.JobStore` are queued again (a job that was running when the
service stopped is re-run from its upload); one that was interrupted :data:`MAX_ATTEMPTS`
times (e.g. it makes the process run out of memory) is marked failed rather than retried
forever.

Workers are threads: inference is CPU-bound and already multi-threaded inside PyTorch, so the
default is one worker. With more workers, reading and writing studies overlap but calls to the
predictor are serialised by a lock (its Grad-CAM hooks are not thread-safe). Stopping does not
wait for a prediction in progress: that worker's result is discarded and the job re-run by the
next start.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from lungcad.finding import StudyFinding
from lungcad.io import read_image
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.provenance import utc_timestamp
from lungcad.service.audit import AuditLog, result_summary
from lungcad.service.jobs.schema import JobStatus, public_view, result_document
from lungcad.service.jobs.store import RESULT_FILE, JobStore
from lungcad.service.redact import describe, names_under, redact
from lungcad.service.rendering import save_render_data

log = logging.getLogger(__name__)

__all__ = ["MAX_ATTEMPTS", "JobWorkers", "QueueFull"]

#: Starts of one job (each ended by the service stopping) after which it is given up.
MAX_ATTEMPTS = 3
#: A failed job's full error and traceback, in its folder: for the administrator only.
ERROR_FILE = "error.txt"


def _finding_text(finding: StudyFinding) -> str:
    """The finding for a log line: ``p=0.123 cancer suspected`` or ``cannot assess``."""
    if finding.probability is None:
        return finding.status
    return f"p={finding.probability:.3f} {finding.status}"


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; the client should retry later (503)."""


class JobWorkers:
    """A bounded queue of jobs and the worker threads that predict them.

    Args:
        store: the jobs on disk (opened before :meth:`start`).
        predictor: anything with ``predict_volume(volume) -> StudyResult``.
        audit: where job events are recorded.
        model_version: recorded with every result.
        workers: worker threads.
        queue_size: most jobs waiting (not running) at once; more are refused (:class:`QueueFull`).
    """

    def __init__(
        self,
        store: JobStore,
        predictor: Any,
        audit: AuditLog,
        *,
        model_version: str,
        workers: int = 1,
        queue_size: int = 16,
    ) -> None:
        self.store = store
        self.predictor = predictor
        self.audit = audit
        self.model_version = model_version
        self.n_workers = int(workers)
        self.queue_size = int(queue_size)
        self._queue: collections.deque[str] = collections.deque()
        # Guards the queue and _busy. Lock order: this, then the store's lock (never reversed).
        self._cond = threading.Condition()
        self._predict_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy: set[str] = set()  # names of the workers running a job

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Queue again the store's unfinished jobs (oldest first) and start the threads."""
        self._stopping.clear()
        self._requeue()
        for i in range(self.n_workers):
            thread = threading.Thread(target=self._work, name=f"lungcad-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; idle workers exit, a busy one is abandoned.

        Waiting jobs stay queued on disk; a job being predicted is abandoned (its worker's
        result is discarded) and re-run by the next start, so stopping never waits minutes
        for a large study.

        Args:
            timeout: seconds to wait for idle workers to exit (all together).
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            busy = set(self._busy)
        for thread in self._threads:
            if thread.name not in busy:  # idle workers exit at once; busy ones are abandoned
                thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    @property
    def running(self) -> bool:
        """True while started and at least one worker thread is alive."""
        return not self._stopping.is_set() and any(t.is_alive() for t in self._threads)

    def waiting(self) -> int:
        """Number of jobs queued in memory (not yet taken by a worker)."""
        with self._cond:
            return len(self._queue)

    def accepting(self) -> bool:
        """True when a new job would be accepted now."""
        with self._cond:
            return self.running and len(self._queue) < self.queue_size

    def _requeue(self) -> None:
        """Queue the unfinished jobs again; give up those interrupted too often."""
        with self._cond:
            self._queue.clear()
        for state in self.store.unfinished():
            job_id = state["job_id"]
            if state.get("attempts", 0) >= MAX_ATTEMPTS:
                self._finish(
                    job_id,
                    JobStatus.FAILED,
                    error=(
                        f"the service stopped {state['attempts']} times while processing this "
                        "study; gave up (the study may be too large for this server)"
                    ),
                    reason="abandoned",
                )
                continue
            if state["status"] == JobStatus.RUNNING:
                log.info("job %s was running when the service stopped; queued again", job_id)
                self.store.update(job_id, status=JobStatus.QUEUED, started_at=None)
            with self._cond:
                self._queue.append(job_id)

    # ------------------------------------------------------------------ submission

    def submit(self, staged: Path, input_info: dict[str, Any], user: str) -> dict[str, Any]:
        """Turn a staged, checked upload into a queued job.

        The arguments are those of :meth:`JobStore.create`; the job is created only when the
        queue has room, and is then queued at once (both under the queue's lock).

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
            state = self.store.create(staged, input_info, user)
            self._queue.append(state["job_id"])
            self._cond.notify()
        self.audit.record(
            "study_submitted", user=user, job_id=state["job_id"], model_version=self.model_version
        )
        return public_view(state)  # the state as created: a worker may have taken it since

    # ------------------------------------------------------------------ work

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        state = self.store.update(
            job_id, status=status, error=error, finished_at=utc_timestamp("milliseconds")
        )
        self.audit.record(
            "job_done" if status == JobStatus.DONE else "job_failed",
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
            except Exception as exc:  # never let a bug in one job kill the worker
                log.error("job %s: unexpected error in the worker: %s", job_id, describe(exc))
            finally:
                with self._cond:
                    self._busy.discard(threading.current_thread().name)

    def _run(self, job_id: str) -> None:
        # Imported here: it loads PyTorch and MONAI (seconds), which importing the service
        # (e.g. ``lungcad serve`` checking its settings) should not wait for.
        from lungcad.inference.outputs import write_study_outputs

        previous = self.store.get(job_id)
        if previous is None:  # removed from the store meanwhile (cannot happen while queued)
            return
        state = self.store.update(
            job_id,
            status=JobStatus.RUNNING,
            started_at=utc_timestamp("milliseconds"),
            attempts=previous.get("attempts", 0) + 1,
        )
        self.audit.record(
            "job_started",
            user=state.get("user") or "unknown",
            job_id=job_id,
            model_version=self.model_version,
        )
        folder = self.store.job_dir(job_id)
        log.info("job %s: started (%s)", job_id, state["format"])
        try:
            volume = read_image(folder / state["input_path"])
            study = self.audit.hash_uid(volume.meta.get("study_instance_uid"))
            self.store.update(job_id, study=study)
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
            # Exception text may name the upload's files, server paths or UIDs: the log and
            # the client get it redacted, the full text goes to the job's error.txt only.
            upload = {folder / "upload": "upload"}
            names = names_under(folder / state["input_path"])  # a reader names files alone
            if expected:
                log.warning("job %s failed: %s", job_id, describe(exc, upload, names))
                message = redact(str(exc), upload, names)
            else:
                log.error(
                    "job %s failed: %s (details in its %s)",
                    job_id,
                    describe(exc, upload, names),
                    ERROR_FILE,
                )
                message = f"internal error ({describe(exc, upload, names)})"
            write_text_atomic(folder / ERROR_FILE, traceback.format_exc())
            self._finish(
                job_id,
                JobStatus.FAILED,
                error=message,
                reason="input_error" if expected else "internal_error",
            )
            return
        self._finish(
            job_id,
            JobStatus.DONE,
            result=result_summary(result.finding, len(result.lesions)),
        )
        self.store.remove_upload(job_id)  # patient identifiers are kept no longer than needed
        log.info("job %s: done (%s)", job_id, _finding_text(result.finding))
