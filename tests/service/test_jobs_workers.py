"""The worker threads without the web app: a job runs to done with every output, failures are
told apart, unfinished jobs are picked up again, a stop abandons a busy worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungcad.service.audit import AuditLog
from lungcad.service.jobs.schema import FINISHED, JobStatus
from lungcad.service.jobs.store import RESULT_FILE, JobStore
from lungcad.service.jobs.workers import MAX_ATTEMPTS, JobWorkers, QueueFull
from tests.service_helpers import FakePredictor, stage_nifti

USER = "tok-0123456789"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(tmp_path)
    store.open()
    yield store
    store.close()


def make_workers(store: JobStore, predictor: FakePredictor, **options) -> JobWorkers:
    audit = AuditLog.open(store.data_dir)
    return JobWorkers(store, predictor, audit, model_version="0.1.0+test", **options)


def submit(workers: JobWorkers, data: bytes) -> str:
    staged, info = stage_nifti(workers.store.new_staging_dir(), data)
    return workers.submit(staged, info, USER)["job_id"]


def wait_finished(store: JobStore, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := store.get(job_id))["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} still {state['status']}"
        time.sleep(0.01)
    return state


def actions(store: JobStore, job_id: str) -> list[str]:
    lines = (store.data_dir / "audit.log").read_text().splitlines()
    return [r["action"] for r in map(json.loads, lines) if r.get("job_id") == job_id]


def test_a_job_runs_to_done_with_its_outputs(store: JobStore, nifti: bytes) -> None:
    workers = make_workers(store, FakePredictor(probability=0.9))
    workers.start()
    try:
        assert workers.running and workers.accepting()
        job_id = submit(workers, nifti)
        state = wait_finished(store, job_id)
    finally:
        workers.stop()
    assert state["status"] is JobStatus.DONE and state["error"] is None
    assert state["attempts"] == 1 and state["started_at"] <= state["finished_at"]
    folder = store.job_dir(job_id)
    result = json.loads((folder / RESULT_FILE).read_text())
    assert result["job_id"] == job_id and result["study_probability"] == pytest.approx(0.9)
    assert result["model_version"] == "0.1.0+test"
    assert (folder / "outputs" / "mask.nii.gz").is_file()
    assert (folder / "render" / "render.json").is_file()
    deadline = time.monotonic() + 10  # removed just after the state says done
    while (folder / "upload").exists():
        assert time.monotonic() < deadline, "the upload (patient data) was kept"
        time.sleep(0.01)
    assert actions(store, job_id) == ["study_submitted", "job_started", "job_done"]
    assert not workers.running


def test_the_queue_is_bounded_and_closed_when_stopped(store: JobStore, nifti: bytes) -> None:
    gate = threading.Event()
    predictor = FakePredictor(block=gate)
    workers = make_workers(store, predictor, queue_size=1)
    with pytest.raises(QueueFull):  # not started
        submit(workers, nifti)
    workers.start()
    try:
        running = submit(workers, nifti)
        assert predictor.started.wait(10)
        waiting = submit(workers, nifti)
        assert workers.waiting() == 1 and not workers.accepting()
        with pytest.raises(QueueFull, match="limit 1"):
            submit(workers, nifti)
        gate.set()
        for job_id in (running, waiting):
            assert wait_finished(store, job_id)["status"] is JobStatus.DONE
        assert workers.accepting()
    finally:
        gate.set()
        workers.stop()
    assert list(store.tmp_dir.iterdir())  # the refused uploads stay for the caller to remove


def test_failures_say_whether_the_input_or_the_service_is_at_fault(
    store: JobStore, nifti: bytes
) -> None:
    workers = make_workers(store, FakePredictor(fail_times=1))
    workers.start()
    try:
        crashed = submit(workers, nifti)
        crash = wait_finished(store, crashed)
        unreadable = submit(workers, b"\x1f\x8b not a volume")
        bad = wait_finished(store, unreadable)
    finally:
        workers.stop()
    assert crash["status"] is JobStatus.FAILED
    assert crash["error"].startswith("internal error (RuntimeError: model exploded")
    assert bad["status"] is JobStatus.FAILED and str(store.data_dir) not in bad["error"]
    # The status turns "failed" just before the audit record is written: wait for the record.
    deadline = time.monotonic() + 10.0
    while True:
        records = [json.loads(x) for x in (store.data_dir / "audit.log").read_text().splitlines()]
        reasons = {r["job_id"]: r.get("reason") for r in records if r["action"] == "job_failed"}
        if len(reasons) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert reasons == {crashed: "internal_error", unreadable: "input_error"}
    assert (store.job_dir(unreadable) / "upload").is_dir()  # kept: the job did not succeed


def test_start_queues_unfinished_jobs_again_and_gives_up_on_repeat_crashes(
    tmp_path: Path, nifti: bytes
) -> None:
    store = JobStore(tmp_path)
    store.open()
    ids = []
    for attempts in (1, MAX_ATTEMPTS):
        staged, info = stage_nifti(store.new_staging_dir(), nifti)
        job_id = store.create(staged, info, USER)["job_id"]
        store.update(job_id, status=JobStatus.RUNNING, attempts=attempts)  # as at a crash
        ids.append(job_id)
    store.close()

    store.open()
    workers = make_workers(store, FakePredictor())
    workers.start()
    try:
        retried, given_up = (wait_finished(store, job_id) for job_id in ids)
    finally:
        workers.stop()
        store.close()
    assert retried["status"] is JobStatus.DONE and retried["attempts"] == 2
    assert given_up["status"] is JobStatus.FAILED and "gave up" in given_up["error"]
    assert given_up["attempts"] == MAX_ATTEMPTS  # not started once more
    assert actions(store, ids[1]) == ["job_failed"]


def test_stop_abandons_a_busy_worker_without_writing_results(store: JobStore, nifti: bytes) -> None:
    gate = threading.Event()
    predictor = FakePredictor(block=gate)
    workers = make_workers(store, predictor)
    workers.start()
    try:
        job_id = submit(workers, nifti)
        assert predictor.started.wait(10)
        busy = list(workers._threads)
        started = time.monotonic()
        workers.stop(timeout=5.0)
        assert time.monotonic() - started < 2.0  # did not wait for the prediction
    finally:
        gate.set()
    for thread in busy:
        thread.join(10)
        assert not thread.is_alive()
    state = store.get(job_id)
    assert state["status"] is JobStatus.RUNNING  # the next start runs it again
    assert not (store.job_dir(job_id) / RESULT_FILE).exists()
    assert "job_done" not in actions(store, job_id)
