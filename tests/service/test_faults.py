"""Service faults: bad uploads, limits, zip bombs and zip slip, queue full, failing
predictions, restarts with jobs in flight. A fake predictor stands in for the model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.app import ServiceSettings, create_app
from lungcad.service.auth import TOKEN_ENV
from lungcad.service.jobs.schema import API_PREFIX
from lungcad.service.jobs.store import ServiceBusy
from lungcad.service.jobs.workers import MAX_ATTEMPTS
from lungcad.service.uploads import UploadRejected, extract_zip
from tests.service_helpers import (
    AUTH,
    TOKEN,
    FakePredictor,
    hu_volume,
    submit,
    wait_for,
    zip_bytes,
    zip_folder,
)


@pytest.fixture(scope="module")
def limited(tmp_path_factory, service_settings):
    """A service with small limits: 64 KB uploads, 5 files, 256 KB unpacked."""
    data_dir = tmp_path_factory.mktemp("limited")
    app = create_app(
        FakePredictor(),
        service_settings(data_dir, max_upload_mb=1 / 16, max_files=5, max_unpacked_mb=0.25),
    )
    with TestClient(app) as client:
        yield client, data_dir


def _no_leftovers(data_dir: Path) -> None:
    assert list((data_dir / "tmp").iterdir()) == []
    assert list((data_dir / "jobs").iterdir()) == []


def test_corrupt_uploads_are_400_with_the_reason(limited) -> None:
    client, data_dir = limited
    bad_zip = submit(client, b"PK\x03\x04 this is not really a zip" * 10, "study.zip")
    assert bad_zip.status_code == 400 and "zip" in bad_zip.json()["detail"]
    bad_nifti = submit(client, b"\x1f\x8b garbage", "scan.nii.gz")
    assert bad_nifti.status_code == 400 and "NIfTI" in bad_nifti.json()["detail"]
    text = submit(client, b"hello", "notes.txt")
    assert text.status_code == 400 and ".zip" in text.json()["detail"]
    not_dicom = submit(client, zip_bytes({"a/readme.txt": b"hello"}), "study.zip")
    assert not_dicom.status_code == 400 and "DICOM" in not_dicom.json()["detail"]
    assert "tmp" not in not_dicom.json()["detail"]  # no server paths in messages
    truncated = submit(client, zip_bytes({"s/1.dcm": b"\0" * 128 + b"DICM\x02\x00"}), "s.zip")
    assert truncated.status_code == 400
    form = client.post(f"{API_PREFIX}/studies", data={"other": "x"}, headers=AUTH)
    assert form.status_code == 400 and "'file'" in form.json()["detail"]
    raw = client.post(f"{API_PREFIX}/studies", content=b"xyz", headers=AUTH)
    assert raw.status_code == 400 and "multipart" in raw.json()["detail"]
    _no_leftovers(data_dir)


def test_non_ct_series_is_refused(limited, tmp_path) -> None:
    client, data_dir = limited
    write_dicom_series(hu_volume((3, 16, 16)), tmp_path / "mr", modality="MR", uid_seed=1)
    response = submit(client, zip_folder(tmp_path / "mr"), "mr.zip")
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "CT" in detail and "MR" in detail, detail
    _no_leftovers(data_dir)


def test_oversized_upload_is_413(limited) -> None:
    client, data_dir = limited
    big = np.random.default_rng(0).bytes(100_000)  # > 64 KB, incompressible
    response = submit(client, big, "scan.nii.gz")
    assert response.status_code == 413 and "too large" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.nii"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 4096
        yield b"\r\n--b--\r\n"

    streamed = client.post(
        f"{API_PREFIX}/studies",
        content=chunks(),
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert streamed.status_code == 413
    _no_leftovers(data_dir)


def test_too_many_files_is_413(limited) -> None:
    client, data_dir = limited
    response = submit(client, zip_bytes({f"s/{i}.dcm": b"x" for i in range(6)}), "s.zip")
    assert response.status_code == 413 and "6 files" in response.json()["detail"]
    _no_leftovers(data_dir)


def test_zip_bomb_stops_at_the_limit(limited, tmp_path) -> None:
    client, data_dir = limited
    bomb = zip_bytes({"s/1.dcm": b"\0" * (8 << 20)})  # 8 MB of zeros, ~8 KB zipped
    assert len(bomb) < 64 << 10
    response = submit(client, bomb, "bomb.zip")
    assert response.status_code == 413
    _no_leftovers(data_dir)
    # a zip whose directory understates the size is still stopped while unpacking
    data = bytearray(bomb)
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")  # claims 1000 bytes
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(UploadRejected) as err:
        extract_zip(liar, tmp_path / "out", max_files=5, max_unpacked_bytes=1 << 20)
    assert err.value.status_code in (400, 413)
    assert sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) <= 1 << 20


def test_zip_slip_is_refused(limited, tmp_path) -> None:
    client, data_dir = limited
    for name in ("../../evil.dcm", "/etc/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"):
        response = submit(client, zip_bytes({name: b"x"}), "slip.zip")
        assert response.status_code == 400, name
        assert "unsafe path" in response.json()["detail"]
    assert not list(data_dir.parent.rglob("evil.dcm"))
    _no_leftovers(data_dir)


def test_failing_prediction_marks_the_job_failed_and_the_service_stays_up(
    tmp_path, nifti, service_settings
) -> None:
    app = create_app(FakePredictor(fail_times=1), service_settings(tmp_path))
    with TestClient(app) as client:
        first = submit(client, nifti, "a.nii.gz").json()["job_id"]
        job = wait_for(client, first)
        assert job["status"] == "failed" and "model exploded" in job["error"]
        result = client.get(f"{API_PREFIX}/jobs/{first}/result", headers=AUTH)
        assert result.status_code == 409 and "model exploded" in result.json()["detail"]
        assert client.get("/health").status_code == 200
        second = submit(client, nifti, "b.nii.gz").json()["job_id"]
        assert wait_for(client, second)["status"] == "done"
    records = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    failed = [r for r in records if r["action"] == "job_failed"]
    assert failed and failed[0]["reason"] == "internal_error"
    assert "exploded" not in (tmp_path / "audit.log").read_text()  # no messages in the log


def test_unreadable_study_fails_the_job_with_the_reader_message(tmp_path, service_settings) -> None:
    # 5 slices with the middle one missing: headers look fine, the reader refuses the gap.
    write_dicom_series(hu_volume((5, 16, 16)), tmp_path / "ct", uid_seed=2)
    (tmp_path / "ct" / "0003.dcm").unlink()
    app = create_app(FakePredictor(), service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        response = submit(client, zip_folder(tmp_path / "ct"), "ct.zip")
        assert response.status_code == 202  # the headers alone look fine
        job = wait_for(client, response.json()["job_id"])
        assert job["status"] == "failed" and "missing" in job["error"], job["error"]
        assert str(tmp_path) not in job["error"] and job["error"].startswith("upload")


def test_queue_full_is_503(tmp_path, nifti, service_settings) -> None:
    gate = threading.Event()
    predictor = FakePredictor(block=gate)
    app = create_app(predictor, service_settings(tmp_path, queue_size=1))
    try:
        with TestClient(app) as client:
            running = submit(client, nifti, "a.nii.gz").json()["job_id"]
            assert predictor.started.wait(10)
            queued = submit(client, nifti, "b.nii.gz")
            assert queued.status_code == 202
            full = submit(client, nifti, "c.nii.gz")
            assert full.status_code == 503 and "retry-after" in full.headers
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "queue full"
            pending = client.get(
                f"{API_PREFIX}/jobs/{queued.json()['job_id']}/result", headers=AUTH
            )
            assert pending.status_code == 409
            gate.set()
            for job_id in (running, queued.json()["job_id"]):
                assert wait_for(client, job_id)["status"] == "done"
            assert client.get("/ready").status_code == 200
    finally:
        gate.set()


def test_restart_with_jobs_in_flight_loses_nothing(tmp_path, nifti, service_settings) -> None:
    """Stop the service while one job runs and one waits; a new service on the same data
    folder finishes both, and the abandoned worker of the old one writes nothing."""
    gate = threading.Event()
    blocked = FakePredictor(probability=0.2, block=gate)
    first = create_app(blocked, service_settings(tmp_path))
    try:
        with TestClient(first) as client:
            running = submit(client, nifti, "a.nii.gz").json()["job_id"]
            assert blocked.started.wait(10)
            waiting = submit(client, nifti, "b.nii.gz").json()["job_id"]
            assert (
                client.get(f"{API_PREFIX}/jobs/{running}", headers=AUTH).json()["status"]
                == "running"
            )
            old_workers = list(first.state.jobs.workers._threads)
        # stopped with one job running and one queued
        second = create_app(FakePredictor(probability=0.9), service_settings(tmp_path))
        with TestClient(second) as client:
            for job_id in (running, waiting):
                job = wait_for(client, job_id)
                assert job["status"] == "done", job
                result = client.get(f"{API_PREFIX}/jobs/{job_id}/result", headers=AUTH).json()
                assert result["study_probability"] == pytest.approx(0.9)
            gate.set()  # the old worker wakes up; its result must be discarded
            for worker in old_workers:
                worker.join(10)
                assert not worker.is_alive()
            result = client.get(f"{API_PREFIX}/jobs/{running}/result", headers=AUTH).json()
            assert result["study_probability"] == pytest.approx(0.9)
            assert (
                client.get(
                    f"{API_PREFIX}/jobs/{running}/slices/2.png?cam=1", headers=AUTH
                ).status_code
                == 200
            )
        state = json.loads((tmp_path / "jobs" / running / "state.json").read_text())
        assert state["status"] == "done" and state["attempts"] == 2
    finally:
        gate.set()


def test_a_job_that_keeps_killing_the_service_is_given_up(
    tmp_path, nifti, service_settings
) -> None:
    app = create_app(FakePredictor(), service_settings(tmp_path))
    with TestClient(app) as client:
        job_id = submit(client, nifti, "a.nii.gz").json()["job_id"]
        wait_for(client, job_id)
    state_file = tmp_path / "jobs" / job_id / "state.json"
    state = json.loads(state_file.read_text())
    state.update(status="running", attempts=MAX_ATTEMPTS)  # as if it crashed every time
    state_file.write_text(json.dumps(state))
    with TestClient(create_app(FakePredictor(), service_settings(tmp_path))) as client:
        job = client.get(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH).json()
        assert job["status"] == "failed" and "gave up" in job["error"]


def test_one_service_per_data_dir(tmp_path, service_settings) -> None:
    with TestClient(create_app(FakePredictor(), service_settings(tmp_path))):
        with (
            pytest.raises(ServiceBusy),
            TestClient(create_app(FakePredictor(), service_settings(tmp_path))),
        ):
            pass


def test_unknown_jobs_are_404(limited) -> None:
    client, _ = limited
    for job_id in ("0" * 32, "not-a-job", "..%2F..%2Fetc"):
        assert client.get(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH).status_code == 404
        assert client.get(f"{API_PREFIX}/jobs/{job_id}/result", headers=AUTH).status_code == 404


def test_tokens_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    app = create_app(FakePredictor(), ServiceSettings.from_sources(tmp_path))
    with TestClient(app) as client:
        assert client.get(f"{API_PREFIX}/jobs", headers=AUTH).status_code == 200
        assert client.get(f"{API_PREFIX}/jobs").status_code == 401
