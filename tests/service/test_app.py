"""The REST service end to end with a real tiny model: upload, jobs, results, auth, audit."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lungcad.cli import main as cli_main
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.inference.predictor import Predictor
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.app import STATIC_DIR, create_app
from lungcad.service.auth import token_id
from lungcad.service.jobs.schema import API_PREFIX
from tests.inference_helpers import SIZE, shared_trained_run
from tests.service_helpers import (
    AUTH,
    OTHER_TOKEN,
    TOKEN,
    FakePredictor,
    nifti_bytes,
    submit,
    wait_for,
    zip_folder,
)

torch.set_num_threads(2)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-731-XYZ"
STUDY_UID = "1.2.826.0.1.3680043.8.498.73104242917"
BIRTH_DATE = "19470312"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(shared_trained_run(tmp_path_factory), batch_size=4)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(5, shape_zyx=(6, SIZE, SIZE), matrix=SIZE, n_nodules=1, size_mm=20.0)


@pytest.fixture(scope="module")
def service(predictor, tmp_path_factory, service_settings):
    """A running app (workers started) on a fresh data folder, and its data folder."""
    data_dir = tmp_path_factory.mktemp("service")
    app = create_app(predictor, service_settings(data_dir, tokens={TOKEN, OTHER_TOKEN}))
    with TestClient(app) as client:
        yield client, data_dir


@pytest.fixture(scope="module")
def finished_jobs(service, phantom, tmp_path_factory):
    """One DICOM (zip) and one NIfTI study submitted together and run to completion."""
    client, _ = service
    root = tmp_path_factory.mktemp("uploads")
    write_dicom_series(
        phantom.volume,
        root / "dicom",
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        patient_birth_date=BIRTH_DATE,
        study_instance_uid=STUDY_UID,
        uid_seed=5,
    )
    responses = {
        "dicom": submit(client, zip_folder(root / "dicom"), "study.zip"),
        "nifti": submit(client, nifti_bytes(phantom.volume, root), "scan.nii.gz"),
    }
    jobs = {}
    for kind, response in responses.items():
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "queued" and set(body) == {"job_id", "status"}
        assert response.headers["location"] == f"{API_PREFIX}/jobs/{body['job_id']}"
        jobs[kind] = wait_for(client, body["job_id"])
        assert jobs[kind]["status"] == "done", jobs[kind]["error"]
    return jobs


def test_health_ready_and_openapi(service) -> None:
    client, _ = service
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        f"{API_PREFIX}/model",
        f"{API_PREFIX}/studies",
        f"{API_PREFIX}/jobs",
        API_PREFIX + "/jobs/{job_id}",
        API_PREFIX + "/jobs/{job_id}/result",
        API_PREFIX + "/jobs/{job_id}/files/{name}",
        API_PREFIX + "/jobs/{job_id}/slices/{z}.png",
    ):
        assert path in paths, path
    upload = paths[f"{API_PREFIX}/studies"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert client.get("/health").headers["x-content-type-options"] == "nosniff"


def test_model_info(service, predictor) -> None:
    client, _ = service
    info = client.get(f"{API_PREFIX}/model", headers=AUTH).json()
    assert info["model_name"] == "resnet18"
    assert info["checkpoint_sha256"] == predictor.info["checkpoint_sha256"]
    assert info["threshold"] == pytest.approx(predictor.threshold)
    assert info["model_version"].endswith(predictor.info["checkpoint_sha256"][:12])
    for key in ("lungcad_version", "config_hash", "intended_use"):
        assert info[key]
    assert "not a medical device" in info["intended_use"]
    assert "checkpoint_path" not in info  # no server paths


def test_dicom_study_end_to_end(service, finished_jobs, phantom) -> None:
    client, data_dir = service
    job_id = finished_jobs["dicom"]["job_id"]
    job = client.get(f"{API_PREFIX}/jobs/{job_id}", headers=AUTH).json()
    assert set(job) == {"job_id", "status", "error", "created_at", "started_at", "finished_at"}
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    result = client.get(f"{API_PREFIX}/jobs/{job_id}/result", headers=AUTH).json()
    assert 0.0 <= result["study_probability"] <= 1.0
    assert result["is_cancer"] == (result["study_probability"] >= result["threshold"])
    assert result["n_slices"] == phantom.volume.shape[0]
    assert len(result["slice_probabilities"]) == result["n_slices"]
    assert result["spacing_zyx"] == pytest.approx(list(phantom.volume.spacing))
    assert isinstance(result["lesions"], list)
    assert result["cam_slices"] and all(0 <= z < result["n_slices"] for z in result["cam_slices"])
    files = result["files"]
    assert files["seg"] and files["sr"]  # DICOM input: SEG and SR written
    for key in ("mask", "probability", "report", "findings"):
        assert files[key].startswith(f"{API_PREFIX}/jobs/{job_id}/files/")
    mask = client.get(files["mask"], headers=AUTH)
    assert mask.status_code == 200 and gzip.decompress(mask.content)[344:347] == b"n+1"
    seg = pydicom.dcmread(io.BytesIO(client.get(files["seg"], headers=AUTH).content))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == STUDY_UID
    findings = client.get(files["findings"], headers=AUTH).json()
    assert findings["study"]["probability"] == pytest.approx(result["study_probability"])
    assert client.get(files["report"], headers=AUTH).headers["content-type"].startswith("text/html")
    assert (
        client.get(f"{API_PREFIX}/jobs/{job_id}/files/..%2Fstate.json", headers=AUTH).status_code
        == 404
    )
    assert client.get(f"{API_PREFIX}/jobs/{job_id}/files/nope.txt", headers=AUTH).status_code == 404
    # the uploaded DICOM files (patient identifiers) are gone once the job is done
    assert not (data_dir / "jobs" / job_id / "upload").exists()


def test_slice_pngs(service, finished_jobs, phantom) -> None:
    client, _ = service
    job_id = finished_jobs["nifti"]["job_id"]
    base = f"{API_PREFIX}/jobs/{job_id}/slices"
    seen = set()
    for window in ("lung", "mediastinal", "bone"):
        response = client.get(f"{base}/2.png?window={window}&overlay=1&cam=1", headers=AUTH)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "no-store"  # patient data: no cache
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (SIZE, SIZE) and image.mode in ("RGB", "L")
        seen.add(response.content)
    assert len(seen) == 3  # the windows differ
    assert client.get(f"{base}/{phantom.volume.shape[0]}.png", headers=AUTH).status_code == 404
    assert client.get(f"{base}/0.png?window=soft", headers=AUTH).status_code == 422


def test_nifti_result_has_no_dicom_outputs(service, finished_jobs) -> None:
    client, _ = service
    result = client.get(
        f"{API_PREFIX}/jobs/{finished_jobs['nifti']['job_id']}/result", headers=AUTH
    ).json()
    assert result["files"]["seg"] is None and result["files"]["sr"] is None
    assert result["files"]["mask"]
    listed = {j["job_id"] for j in client.get(f"{API_PREFIX}/jobs", headers=AUTH).json()}
    assert {j["job_id"] for j in finished_jobs.values()} <= listed


def test_audit_log_has_no_patient_identifiers(service, finished_jobs) -> None:
    client, data_dir = service
    job_id = finished_jobs["dicom"]["job_id"]
    client.get(f"{API_PREFIX}/jobs/{job_id}/result", headers=AUTH)
    text = (data_dir / "audit.log").read_text()
    for secret in (
        PATIENT_NAME,
        "Doe",
        "Jane",
        PATIENT_ID,
        STUDY_UID,
        BIRTH_DATE,
        TOKEN,
        OTHER_TOKEN,
    ):
        assert secret not in text, secret
    records = [json.loads(line) for line in text.splitlines()]
    done = [r for r in records if r["action"] == "job_done" and r["job_id"] == job_id]
    assert len(done) == 1
    salt = bytes.fromhex((data_dir / "audit_salt").read_text().strip())
    expected = "sha256:" + hashlib.sha256(salt + STUDY_UID.encode()).hexdigest()
    assert done[0]["study"] == expected
    assert done[0]["user"] == token_id(TOKEN)
    assert set(done[0]["result"]) == {"probability", "decision", "n_lesions"}
    assert done[0]["model_version"]
    actions = {r["action"] for r in records}
    assert {"study_submitted", "job_started", "job_done", "result_viewed"} <= actions


def test_no_token_refuses_to_start(tmp_path: Path, service_settings) -> None:
    with pytest.raises(InputError, match="no API token"):
        create_app(FakePredictor(), service_settings(tmp_path / "d", tokens=()))
    app = create_app(
        FakePredictor(), service_settings(tmp_path / "d", tokens=(), insecure_no_auth=True)
    )
    with TestClient(app) as client:
        assert client.get(f"{API_PREFIX}/jobs").status_code == 200
    # the command line refuses before loading any model
    assert (
        cli_main(
            ["serve", "--checkpoint", str(tmp_path / "none"), "--data-dir", str(tmp_path / "d2")]
        )
        == 2
    )


def test_api_prefix_is_the_published_one() -> None:
    """Clients, the viewer and job folders (result documents hold URLs) depend on it."""
    assert API_PREFIX == "/api/v1"
    api_js = (STATIC_DIR / "api.js").read_text(encoding="utf-8")
    assert f'export const API = "{API_PREFIX.lstrip("/")}";' in api_js


def test_viewer_is_served_as_es_modules(tmp_path: Path, service_settings) -> None:
    """index.html loads main.js as a module; every module it imports, directly or not, is
    served from /static with a JavaScript MIME type (browsers refuse modules otherwise)."""
    with TestClient(create_app(FakePredictor(), service_settings(tmp_path))) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert '<script type="module" src="static/main.js"></script>' in page.text
        seen, todo = set(), ["main.js"]
        while todo:
            name = todo.pop()
            seen.add(name)
            response = client.get(f"/static/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].startswith("text/javascript"), name
            assert response.headers["x-content-type-options"] == "nosniff"
            imports = re.findall(r'^import .* from "\./([\w.]+)";$', response.text, re.M)
            todo += [i for i in imports if i not in seen]
        on_disk = {p.name for p in STATIC_DIR.glob("*.js")}
        assert seen == on_disk  # no module left unused, none missing
        css = client.get("/static/viewer.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert client.get("/static/viewer.js").status_code == 404  # the old single script


def test_slice_rendering_from_real_outputs_is_radiological(service, finished_jobs, phantom) -> None:
    """The NIfTI was stored in RAS; the rendered slice still has the patient's right on the
    left: compare with the canonical (LPS) array windowed directly."""
    client, _ = service
    job_id = finished_jobs["nifti"]["job_id"]
    png = client.get(f"{API_PREFIX}/jobs/{job_id}/slices/3.png?overlay=0", headers=AUTH).content
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L")).astype(float)
    from lungcad.data.preprocessing import window_hu

    expected = np.round(window_hu(np.rint(phantom.volume.array[3])) * 255)
    assert np.abs(grey - expected).max() <= 1


@pytest.mark.slow
def test_lungcad_serve_runs_uvicorn_on_loopback(tmp_path: Path, phantom) -> None:
    """`lungcad serve` in a subprocess: prints its URL, answers over real HTTP, logs to
    stderr, runs a job, and stops cleanly on SIGTERM."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.inference_helpers import make_run_folder

    run = make_run_folder(tmp_path / "run")
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungcad.cli.serve",
            "--checkpoint",
            str(run),
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--token-file",
            str(tmp_path / "tokens"),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Notes about the run (e.g. an untrained decoder: no masks) may come first.
        lines: list[str] = []
        while len(lines) < 3 and not (lines and lines[-1].startswith("lungcad service:")):
            lines.append(server.stdout.readline())
        assert lines[-1].startswith(f"lungcad service: {base}/"), lines
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as http:
            assert http.get("/health").json() == {"status": "ok"}
            job = http.post(
                f"{API_PREFIX}/studies",
                files={"file": ("s.nii.gz", nifti_bytes(phantom.volume, tmp_path))},
            ).json()
            status = job["status"]
            while status in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.2)
                status = http.get(f"{API_PREFIX}/jobs/{job['job_id']}").json()["status"]
            assert status == "done"
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM: exit status -15
    assert server.returncode in (0, -15), stderr
    assert "job manager stopped" in stderr and TOKEN not in stderr
