"""Removing results: DELETE /api/v1/jobs/{id} and the retention sweep (fake predictor)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lungcad.errors import InputError
from lungcad.service.app import create_app
from lungcad.service.jobs.schema import API_PREFIX
from tests.service_helpers import (
    AUTH,
    TOKEN,
    FakePredictor,
    submit,
    wait_for,
)


def _audit(data_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (data_dir / "audit.log").read_text().splitlines()]


def _job_folders(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "jobs").iterdir())


def test_delete_job(tmp_path, nifti, service_settings) -> None:
    gate = threading.Event()
    gate.set()
    with TestClient(create_app(FakePredictor(block=gate), service_settings(tmp_path))) as client:
        done = submit(client, nifti, "a.nii.gz").json()["job_id"]
        assert wait_for(client, done)["status"] == "done"
        gate.clear()  # hold the next job in "running", and the one after in "queued"
        running = submit(client, nifti, "b.nii.gz").json()["job_id"]
        wait_for(client, running, ("running",))
        queued = submit(client, nifti, "c.nii.gz").json()["job_id"]

        assert client.delete(f"{API_PREFIX}/jobs/{done}").status_code == 401
        for job_id in (running, queued):
            response = client.delete(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH)
            assert response.status_code == 409, response.text
            assert (tmp_path / "jobs" / job_id).is_dir()
        for job_id in ("0" * 32, "not-a-job"):
            assert client.delete(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH).status_code == 404

        response = client.delete(f"{API_PREFIX}/jobs/{done}", headers=AUTH)
        assert response.status_code == 204 and response.content == b""
        assert client.get(f"{API_PREFIX}/jobs/{done}", headers=AUTH).status_code == 404
        assert (
            client.get(f"{API_PREFIX}/jobs/{done}/files/seg.dcm", headers=AUTH).status_code == 404
        )
        assert client.delete(f"{API_PREFIX}/jobs/{done}", headers=AUTH).status_code == 404
        assert done not in _job_folders(tmp_path)  # no trash folder left either
        assert sorted(_job_folders(tmp_path)) == sorted([running, queued])

        operation = client.get("/openapi.json").json()["paths"][API_PREFIX + "/jobs/{job_id}"]
        assert {"204", "401", "404", "409"} <= set(operation["delete"]["responses"])
        gate.set()
        assert wait_for(client, queued)["status"] == "done"
    deleted = [r for r in _audit(tmp_path) if r["action"] == "job_deleted"]
    assert [r["job_id"] for r in deleted] == [done]
    assert deleted[0]["user"].startswith("tok-") and TOKEN not in json.dumps(deleted)


def test_sweep_removes_only_expired_finished_jobs(tmp_path, nifti, service_settings) -> None:
    gate = threading.Event()
    gate.set()
    app = create_app(
        FakePredictor(fail_times=1, block=gate), service_settings(tmp_path, retention_days=1.0)
    )
    jobs = app.state.jobs
    with TestClient(app) as client:
        failed = submit(client, nifti, "a.nii.gz").json()["job_id"]
        assert wait_for(client, failed)["status"] == "failed"
        done = submit(client, nifti, "b.nii.gz").json()["job_id"]
        finished = datetime.fromisoformat(wait_for(client, done)["finished_at"])
        gate.clear()
        running = submit(client, nifti, "c.nii.gz").json()["job_id"]
        wait_for(client, running, ("running",))

        assert jobs.sweep_expired(now=finished + timedelta(hours=23)) == []
        assert len(_job_folders(tmp_path)) == 3
        far = finished + timedelta(days=30)
        assert sorted(jobs.sweep_expired(now=far)) == sorted([failed, done])
        assert _job_folders(tmp_path) == [running]
        assert client.get(f"{API_PREFIX}/jobs/{done}", headers=AUTH).status_code == 404
        assert jobs.sweep_expired(now=far) == []  # running jobs are never swept
        gate.set()
        wait_for(client, running)
    expired = [r for r in _audit(tmp_path) if r["action"] == "job_expired"]
    assert sorted(r["job_id"] for r in expired) == sorted([failed, done])
    assert all(r["user"] == "system" for r in expired)


def test_expired_jobs_are_removed_at_start(tmp_path, nifti, service_settings) -> None:
    with TestClient(create_app(FakePredictor(), service_settings(tmp_path))) as client:
        old, recent = (submit(client, nifti, f"{i}.nii.gz").json()["job_id"] for i in range(2))
        for job_id in (old, recent):
            wait_for(client, job_id)
    state_file = tmp_path / "jobs" / old / "state.json"
    state = json.loads(state_file.read_text())
    state["finished_at"] = (datetime.now(timezone.utc) - timedelta(days=10)).isoformat()
    state_file.write_text(json.dumps(state))

    app = create_app(FakePredictor(), service_settings(tmp_path, retention_days=7))
    with TestClient(app) as client:
        assert _job_folders(tmp_path) == [recent]
        listed = client.get(f"{API_PREFIX}/jobs", headers=AUTH).json()
        assert [j["job_id"] for j in listed] == [recent]


def test_retention_sweeps_periodically(tmp_path, nifti, service_settings) -> None:
    app = create_app(
        FakePredictor(),
        service_settings(tmp_path, retention_days=0.1 / 86400, retention_check_s=0.05),
    )
    with TestClient(app) as client:
        job_id = submit(client, nifti, "a.nii.gz").json()["job_id"]
        deadline = time.monotonic() + 4.0  # it runs, finishes, then is swept 0.1 s later
        while client.get(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH).status_code != 404:
            assert time.monotonic() < deadline, "the sweeper did not remove the expired job"
            time.sleep(0.02)
    assert _job_folders(tmp_path) == []
    actions = [r["action"] for r in _audit(tmp_path) if r.get("job_id") == job_id]
    assert actions[-2:] == ["job_done", "job_expired"]


def test_retention_settings_are_validated(tmp_path, service_settings) -> None:
    for options in ({"retention_days": 0}, {"retention_days": -1.0}, {"retention_check_s": 0}):
        with pytest.raises(InputError):
            service_settings(tmp_path, **options).validate()
    service_settings(tmp_path, retention_days=None).validate()
