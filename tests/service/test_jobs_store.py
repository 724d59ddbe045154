"""Job folders on disk: creation by one rename, atomic state, recovery after a crash, the
data-folder lock, removal through a trash folder, and which jobs have expired."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lungcad.service.jobs.schema import JobStatus
from lungcad.service.jobs.store import STATE_FILE, JobBusy, JobStore, ServiceBusy
from tests.service_helpers import stage_nifti

NIFTI = b"\x1f\x8b not read by the store"


@pytest.fixture()
def store(tmp_path: Path):
    store = JobStore(tmp_path / "data")
    store.open()
    yield store
    store.close()


def new_job(store: JobStore, user: str = "tok-0123456789") -> dict:
    return store.create(*stage_nifti(store.new_staging_dir(), NIFTI), user=user)


def on_disk(store: JobStore, job_id: str) -> dict:
    return json.loads((store.job_dir(job_id) / STATE_FILE).read_text())


def test_create_moves_the_staged_upload_into_a_job_folder(store: JobStore) -> None:
    staging = store.new_staging_dir()
    assert staging.parent == store.tmp_dir and not any(staging.iterdir())
    state = store.create(*stage_nifti(staging, NIFTI), user="tok-0123456789")
    job_id = state["job_id"]
    assert not staging.exists()
    assert (store.job_dir(job_id) / "upload" / "study.nii.gz").read_bytes() == NIFTI
    assert state["status"] is JobStatus.QUEUED and state["attempts"] == 0
    assert on_disk(store, job_id) == {**state, "status": "queued"}
    assert store.public(job_id) == {
        "job_id": job_id,
        "status": "queued",
        "error": None,
        "created_at": state["created_at"],
        "started_at": None,
        "finished_at": None,
    }
    assert store.get("0" * 32) is None and store.public("0" * 32) is None


def test_update_writes_the_state_and_returns_copies(store: JobStore) -> None:
    job_id = new_job(store)["job_id"]
    changed = store.update(job_id, status="running", attempts=1)
    assert changed["status"] is JobStatus.RUNNING  # plain strings become the enum
    assert on_disk(store, job_id)["status"] == "running"
    changed["status"] = "tampered"
    store.get(job_id)["attempts"] = 99
    assert store.get(job_id)["status"] is JobStatus.RUNNING
    assert store.get(job_id)["attempts"] == 1
    with pytest.raises(ValueError):
        store.update(job_id, status="exploded")
    with pytest.raises(KeyError):
        store.update("0" * 32, status="done")
    assert not list(store.job_dir(job_id).glob(".*"))  # no temporaries left


def test_queries_list_newest_first_and_count_every_status(store: JobStore) -> None:
    first, second, third = (new_job(store)["job_id"] for _ in range(3))
    store.update(second, status=JobStatus.RUNNING)
    store.update(third, status=JobStatus.DONE)
    assert [j["job_id"] for j in store.list_public()] == [third, second, first]
    assert [s["job_id"] for s in store.unfinished()] == [first, second]
    assert store.status_counts() == {"queued": 1, "running": 1, "done": 1, "failed": 0}


def test_open_recovers_after_a_crash(tmp_path: Path) -> None:
    """What an interrupted service leaves behind is cleaned up; good jobs load unchanged."""
    store = JobStore(tmp_path)
    store.open()
    done, running = new_job(store)["job_id"], new_job(store)["job_id"]
    store.update(done, status=JobStatus.DONE)  # as if it stopped before removing the upload
    store.update(running, status=JobStatus.RUNNING)
    store.close()
    jobs = store.jobs_dir
    (jobs / ".deleted-x").mkdir()  # an interrupted removal
    (jobs / ("c" * 32)).mkdir()  # an interrupted rename: no state
    (jobs / ("d" * 32)).mkdir()
    (jobs / ("d" * 32) / STATE_FILE).write_text("{not json")
    (jobs / ("e" * 32)).mkdir()
    (jobs / ("e" * 32) / STATE_FILE).write_text(json.dumps({"job_id": "f" * 32}))
    (jobs / ("a" * 32)).mkdir()
    (jobs / ("a" * 32) / STATE_FILE).write_text(json.dumps({"job_id": "a" * 32, "status": "?"}))
    (store.job_dir(running) / ".state.json.tmp").write_text("half")  # an interrupted write
    (store.tmp_dir / "partial-upload").mkdir()

    again = JobStore(tmp_path)
    again.open()
    try:
        assert {j["job_id"] for j in again.list_public()} == {done, running}
        assert again.get(running)["status"] is JobStatus.RUNNING  # the workers decide
        assert not (again.job_dir(done) / "upload").exists()  # patient data not kept
        assert (again.job_dir(running) / "upload").is_dir()  # needed to run it again
        assert not list(again.job_dir(running).glob(".*"))
        assert not (jobs / ".deleted-x").exists() and not (jobs / ("c" * 32)).exists()
        assert (jobs / ("d" * 32)).is_dir()  # unreadable: skipped, left for a person to see
        assert list(again.tmp_dir.iterdir()) == []
    finally:
        again.close()


def test_one_open_store_per_data_folder(tmp_path: Path) -> None:
    first, second = JobStore(tmp_path), JobStore(tmp_path)
    first.open()
    with pytest.raises(ServiceBusy, match="another lungcad service"):
        second.open()
    first.close()
    second.open()  # released by close()
    second.close()


def test_remove_only_finished_jobs(store: JobStore) -> None:
    queued, done, gone = (new_job(store)["job_id"] for _ in range(3))
    with pytest.raises(JobBusy, match="is queued"):
        store.remove(queued)
    with pytest.raises(KeyError):
        store.remove("0" * 32)
    store.update(done, status=JobStatus.DONE, study="sha256:abc")
    assert store.remove(done)["study"] == "sha256:abc"
    assert store.get(done) is None and not store.job_dir(done).exists()
    assert sorted(p.name for p in store.jobs_dir.iterdir()) == sorted([queued, gone])
    store.update(gone, status=JobStatus.FAILED)
    shutil.rmtree(store.job_dir(gone))  # removed by hand
    store.remove(gone)  # forgotten all the same
    assert store.get(gone) is None


def test_finished_before(store: JobStore) -> None:
    now = datetime.now(timezone.utc)
    old, recent, running, broken = (new_job(store)["job_id"] for _ in range(4))
    store.update(old, status=JobStatus.DONE, finished_at=(now - timedelta(days=3)).isoformat())
    store.update(recent, status=JobStatus.FAILED, finished_at=now.isoformat())
    store.update(running, status=JobStatus.RUNNING)
    store.update(broken, status=JobStatus.DONE, finished_at="yesterday")
    assert store.finished_before(now - timedelta(days=1)) == [old]
    assert sorted(store.finished_before(now + timedelta(days=1))) == sorted([old, recent])
