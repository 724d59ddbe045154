"""The job manager without the web app: store and workers started and stopped together, the
lock released on every path, counts, and audited deletion (retention through the app is in
test_retention.py)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lungcad.service.audit import AuditLog
from lungcad.service.jobs.manager import JobManager
from lungcad.service.jobs.schema import FINISHED, JobStatus
from lungcad.service.jobs.store import ServiceBusy
from tests.service_helpers import FakePredictor, hu_volume, nifti_bytes, stage_nifti


def manager(data_dir: Path, **options) -> JobManager:
    audit = AuditLog.open(data_dir)
    return JobManager(data_dir, FakePredictor(), audit, model_version="0.1.0+test", **options)


def run_one(jobs: JobManager, data: bytes) -> str:
    staged, info = stage_nifti(jobs.store.new_staging_dir(), data)
    job_id = jobs.workers.submit(staged, info, "tok-0123456789")["job_id"]
    deadline = time.monotonic() + 30
    while jobs.store.get(job_id)["status"] not in FINISHED:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.01)
    return job_id


def test_start_and_stop_hold_and_release_the_data_folder(tmp_path: Path, caplog) -> None:
    first = manager(tmp_path)
    first.start()
    assert first.workers.running
    with pytest.raises(ServiceBusy):
        manager(tmp_path).start()
    with caplog.at_level(logging.INFO, logger="lungcad.service.jobs.manager"):
        first.stop()
    assert "job manager stopped" in caplog.text  # `lungcad serve`'s test looks for it
    assert not first.workers.running
    second = manager(tmp_path)
    second.start()
    second.stop()


def test_a_failed_start_releases_the_lock(tmp_path: Path, monkeypatch) -> None:
    broken = manager(tmp_path)

    def explode() -> None:
        raise RuntimeError("cannot start threads")

    monkeypatch.setattr(broken.workers, "start", explode)
    with pytest.raises(RuntimeError):
        broken.start()
    working = manager(tmp_path)
    working.start()  # not ServiceBusy
    working.stop()


def test_counts_and_audited_delete(tmp_path: Path) -> None:
    data = nifti_bytes(hu_volume(), tmp_path)
    jobs = manager(tmp_path / "data")
    jobs.start()
    try:
        assert jobs.counts() == {"waiting": 0, "queued": 0, "running": 0, "done": 0, "failed": 0}
        job_id = run_one(jobs, data)
        assert jobs.counts()["done"] == 1
        jobs.delete(job_id, user="tok-0123456789")
        assert jobs.counts()["done"] == 0 and not jobs.store.job_dir(job_id).exists()
        with pytest.raises(KeyError):
            jobs.delete(job_id, user="tok-0123456789")
    finally:
        jobs.stop()
    records = [json.loads(x) for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    deleted = [r for r in records if r["action"] == "job_deleted"]
    assert [(r["job_id"], r["user"]) for r in deleted] == [(job_id, "tok-0123456789")]


def test_sweep_needs_a_retention_time(tmp_path: Path) -> None:
    data = nifti_bytes(hu_volume(), tmp_path)
    keep = manager(tmp_path / "keep")
    keep.start()
    try:
        job_id = run_one(keep, data)
        later = datetime.now(timezone.utc) + timedelta(days=365)
        assert keep.sweep_expired(now=later) == []  # retention_days=None keeps everything
        assert keep.store.get(job_id)["status"] is JobStatus.DONE
    finally:
        keep.stop()
    swept = manager(tmp_path / "keep", retention_days=30)
    swept.start()  # the start-up sweep finds nothing older than 30 days
    try:
        assert swept.store.get(job_id) is not None
        assert swept.sweep_expired(now=later) == [job_id]
        assert swept.store.get(job_id) is None
    finally:
        swept.stop()
