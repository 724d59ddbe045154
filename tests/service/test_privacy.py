"""Who sees what in the service: tokens on every route, jobs owned by their client, no cached
patient data, and no server path, upload file name, UID or raw exception text in the logs, the
API's errors, findings.json or report.html."""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path

import pydicom
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from lungcad.errors import InputError
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.app import PUBLIC_PATHS, ServiceSettings, create_app
from lungcad.service.auth import token_id
from lungcad.service.jobs.schema import API_PREFIX
from lungcad.service.jobs.workers import ERROR_FILE
from lungcad.service.redact import RedactingFormatter
from lungcad.volume import Volume
from tests.service_helpers import (
    AUTH,
    OTHER_TOKEN,
    TOKEN,
    FakePredictor,
    hu_volume,
    submit,
    wait_for,
    zip_bytes,
    zip_folder,
)

ADMIN_TOKEN = "admin-token-0123456789abcdef"
OTHER = {"Authorization": f"Bearer {OTHER_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UNKNOWN = "0" * 32


def settings_from_token_file(tmp_path: Path, data_dir: Path) -> ServiceSettings:
    """TOKEN: a client named by its token id; OTHER_TOKEN: client ``radiology-b``; ADMIN_TOKEN:
    client ``it-admin`` with the admin role."""
    path = tmp_path / "tokens.txt"
    path.write_text(
        f"{TOKEN}\n{OTHER_TOKEN} client=radiology-b\n{ADMIN_TOKEN} client=it-admin role=admin\n"
    )
    path.chmod(0o600)
    return ServiceSettings.from_sources(data_dir, token_file=path, env={})


def flat_routes(routes: list, prefix: str = "") -> list[tuple[str, list[str], object]]:
    """``(path, methods, route)`` of every route, those of included routers too (FastAPI keeps
    an included router as one entry of ``app.routes``)."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found += flat_routes(inner.routes, prefix + route.include_context.prefix)
        else:  # a Mount (/static) has no methods: it answers GET
            methods = sorted(getattr(route, "methods", None) or {"GET"})
            found.append((prefix + route.path, methods, route))
    return found


def concrete(path: str) -> str:
    """A route's path with its parameters filled in (a well-formed job id, slice 0, ...)."""
    values = {"job_id": UNKNOWN, "z": "0", "name": "findings.json"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], "x"), path)


# ---------------------------------------------------------------------------------------- auth


def test_every_route_but_the_public_ones_needs_a_token(tmp_path: Path, service_settings) -> None:
    app = create_app(FakePredictor(), service_settings(tmp_path))
    routes = flat_routes(app.routes)
    assert PUBLIC_PATHS <= {path for path, _, _ in routes}  # the documented list is not stale
    protected = 0
    with TestClient(app) as client:
        for path, methods, _ in routes:
            for method in (m for m in methods if m != "HEAD"):
                url = concrete(path)
                if path in PUBLIC_PATHS:
                    assert client.request(method, url).status_code != 401, (method, path)
                    continue
                assert path.startswith(API_PREFIX + "/"), f"{path}: not public, not under /api"
                for headers in (
                    {},
                    {"Authorization": "Bearer " + TOKEN[:-1] + "X"},
                    {"Authorization": "Basic " + TOKEN},
                ):
                    response = client.request(method, url, headers=headers)
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    assert response.headers["cache-control"] == "no-store"
                protected += 1
    api = [r for p, _, r in routes if isinstance(r, APIRoute) and p not in PUBLIC_PATHS]
    assert protected == sum(len(r.methods) for r in api) >= 8


# ----------------------------------------------------------------------------------- ownership


def test_jobs_belong_to_their_client_and_an_admin_sees_all(tmp_path: Path, nifti: bytes) -> None:
    data_dir = tmp_path / "data"
    with TestClient(create_app(FakePredictor(), settings_from_token_file(tmp_path, data_dir))) as c:
        mine = submit(c, nifti, "a.nii.gz").json()["job_id"]
        theirs = submit(c, nifti, "b.nii.gz", headers=OTHER).json()["job_id"]
        assert wait_for(c, mine)["status"] == "done"
        assert wait_for(c, theirs, headers=OTHER)["status"] == "done"

        def ids(headers: dict[str, str]) -> list[str]:
            return [j["job_id"] for j in c.get(f"{API_PREFIX}/jobs", headers=headers).json()]

        assert ids(AUTH) == [mine] and ids(OTHER) == [theirs]
        # Another client's job answers exactly as a job that does not exist.
        for suffix in ("", "/result", "/files/findings.json", "/slices/0.png"):
            for job in (mine, UNKNOWN):
                response = c.get(f"{API_PREFIX}/jobs/{job}{suffix}", headers=OTHER)
                assert response.status_code == 404, suffix
                assert response.json() == {"detail": f"no job {job!r}"}
        assert c.delete(f"{API_PREFIX}/jobs/{mine}", headers=OTHER).status_code == 404
        assert c.get(f"{API_PREFIX}/jobs/{mine}/result", headers=AUTH).status_code == 200
        # The admin lists every job with its owner, reads and deletes any of them.
        listed = {
            j["job_id"]: j["owner"] for j in c.get(f"{API_PREFIX}/jobs", headers=ADMIN).json()
        }
        assert listed == {mine: token_id(TOKEN), theirs: "radiology-b"}
        assert c.get(f"{API_PREFIX}/jobs/{theirs}/slices/0.png", headers=ADMIN).status_code == 200
        assert c.delete(f"{API_PREFIX}/jobs/{theirs}", headers=ADMIN).status_code == 204
        assert ids(OTHER) == []
    # The owner is in the job's state on disk: a restarted service keeps it.
    state = json.loads((data_dir / "jobs" / mine / "state.json").read_text())
    assert state["user"] == token_id(TOKEN)
    with TestClient(create_app(FakePredictor(), settings_from_token_file(tmp_path, data_dir))) as c:
        assert ids(AUTH) == [mine] and ids(OTHER) == []
        assert c.get(f"{API_PREFIX}/jobs/{mine}", headers=OTHER).status_code == 404
        assert c.get(f"{API_PREFIX}/jobs/{mine}", headers=AUTH).json()["status"] == "done"
    audit = [json.loads(x) for x in (data_dir / "audit.log").read_text().splitlines()]
    assert any(r["action"] == "job_deleted" and r["user"] == "it-admin" for r in audit)


def test_tokens_of_one_client_share_its_jobs_and_admins_must_exist(tmp_path: Path, nifti) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN} client=ris\n{OTHER_TOKEN} client=ris\n")
    settings = ServiceSettings.from_sources(tmp_path / "data", token_file=path, env={})
    with TestClient(create_app(FakePredictor(), settings)) as client:
        job = submit(client, nifti, "a.nii.gz").json()["job_id"]  # submitted with TOKEN
        assert wait_for(client, job, headers=OTHER)["status"] == "done"  # the rotated token
    with pytest.raises(InputError, match="it-admn is no configured client"):
        ServiceSettings.from_sources(
            tmp_path / "data", token_file=path, env={}, admins={"it-admn"}
        ).validate()


# ------------------------------------------------------------------------------------ caching


def test_patient_data_is_never_cached_and_slices_do_not_outlive_delete(
    tmp_path: Path, nifti: bytes, service_settings
) -> None:
    with TestClient(create_app(FakePredictor(), service_settings(tmp_path))) as client:
        job = submit(client, nifti, "a.nii.gz").json()["job_id"]
        assert wait_for(client, job)["status"] == "done"
        base = f"{API_PREFIX}/jobs/{job}"
        result = client.get(f"{base}/result", headers=AUTH).json()
        urls = [f"{API_PREFIX}/jobs", base, f"{base}/result", f"{API_PREFIX}/model"]
        urls += [url for url in result["files"].values() if url]  # mask, findings, report, ...
        urls += [f"{base}/slices/{z}.png?cam=1" for z in range(result["n_slices"])]
        urls += [f"{base}/slices/99.png", f"{API_PREFIX}/jobs/{UNKNOWN}"]  # errors too
        for url in urls:
            response = client.get(url, headers=AUTH)
            assert response.headers["cache-control"] == "no-store", url
        assert client.get(f"{base}/slices/1.png", headers=AUTH).status_code == 200
        deleted = client.delete(base, headers=AUTH)
        assert deleted.status_code == 204 and deleted.headers["cache-control"] == "no-store"
        gone = client.get(f"{base}/slices/1.png", headers=AUTH)
        assert gone.status_code == 404 and gone.headers["cache-control"] == "no-store"
        assert not (tmp_path / "jobs" / job).exists()  # render data included


def test_an_unhandled_error_is_a_plain_500_with_a_redacted_log_line(
    tmp_path: Path, service_settings, caplog, monkeypatch
) -> None:
    secret = tmp_path / "DOE_JANE_PID731.nii.gz"

    def explode(self, job_id: str):
        raise OSError(f"cannot read {secret}")

    monkeypatch.setattr("lungcad.service.jobs.store.JobStore.public", explode)
    app = create_app(FakePredictor(), service_settings(tmp_path / "data"))
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        client.post(f"{API_PREFIX}/studies")  # no token: no job
        response = client.get(f"{API_PREFIX}/jobs/{UNKNOWN}", headers=AUTH)
        response = client.get(f"{API_PREFIX}/jobs", headers=AUTH)  # public() not used: 200
        assert response.status_code == 200
        client.app.state.jobs.store._states[UNKNOWN] = {"user": token_id(TOKEN)}
        response = client.get(f"{API_PREFIX}/jobs/{UNKNOWN}", headers=AUTH)
    assert response.status_code == 500 and response.headers["cache-control"] == "no-store"
    assert "DOE_JANE" not in response.text and str(tmp_path) not in response.text
    assert "OSError: cannot read <path>" in caplog.text
    assert "DOE_JANE" not in caplog.text and str(tmp_path) not in caplog.text


# ---------------------------------------------------------------------------- patient data

PATIENT_NAME = "Doe^Jane"
FILE_STEM = "DOE_JANE_PID731"  # how some DICOM exports name files and folders
DONE_UID = "1.2.826.0.1.3680043.8.498.7310424291"
FAIL_UID = "1.2.826.0.1.3680043.8.498.7310424292"
GAP_UID = "1.2.826.0.1.3680043.8.498.7310424293"


class LeakyPredictor(FakePredictor):
    """Fails, for the study FAIL_UID, with an error naming everything it should not."""

    def predict_volume(self, volume: Volume):
        meta = volume.meta
        if meta.get("study_instance_uid") == FAIL_UID:
            raise RuntimeError(
                f"could not analyse {meta['slice_files'][0]} of study {FAIL_UID}, series "
                f"{meta.get('series_instance_uid')} in {meta.get('source_path')}"
            )
        return super().predict_volume(volume)


def dicom_zip(folder: Path, uid: str, seed: int, drop: str | None = None) -> tuple[bytes, str]:
    """A zipped CT series of ``uid`` under ``FILE_STEM/``; returns it and its series UID."""
    write_dicom_series(
        hu_volume((5, 32, 32), seed=seed),
        folder,
        patient_name=PATIENT_NAME,
        patient_id="PID731",
        study_instance_uid=uid,
        uid_seed=seed,
    )
    files = sorted(folder.iterdir())
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    for path in files:
        path.rename(folder / f"{FILE_STEM}_{path.name}")
    if drop:
        (folder / f"{FILE_STEM}_{drop}").unlink()
    return zip_folder(folder, prefix=FILE_STEM), series


def test_no_patient_data_in_logs_errors_findings_or_reports(
    tmp_path: Path, nifti: bytes, caplog
) -> None:
    data_dir = tmp_path / "service-data"
    done_zip, done_series = dicom_zip(tmp_path / "done", DONE_UID, 1)
    fail_zip, fail_series = dicom_zip(tmp_path / "fail", FAIL_UID, 2)
    gap_zip, gap_series = dicom_zip(tmp_path / "gap", GAP_UID, 3, drop="0003.dcm")
    encrypted = zipfile.ZipInfo(f"{FILE_STEM}/{FILE_STEM}_0001.dcm")
    encrypted.flag_bits |= 0x1
    buffer = zipfile.ZipFile(tmp_path / "enc.zip", "w")
    buffer.writestr(encrypted, b"x")
    buffer.close()
    uids = [DONE_UID, FAIL_UID, GAP_UID, done_series, fail_series, gap_series]
    paths = [str(data_dir), str(tmp_path), "/secret/run/best.pt"]
    names = [FILE_STEM, "DOE", "Jane", "PID731"]
    seen: list[str] = []  # every API answer
    settings = ServiceSettings(data_dir, tokens=frozenset({TOKEN}))
    # What `lungcad serve` writes: every logger's lines, through its redacting formatter.
    served_log = io.StringIO()
    served = logging.StreamHandler(served_log)
    served.setFormatter(RedactingFormatter(logging.Formatter("%(name)s: %(message)s")))
    logging.getLogger().addHandler(served)
    with (
        caplog.at_level(logging.DEBUG, logger="lungcad"),
        TestClient(create_app(LeakyPredictor(), settings)) as client,
    ):
        jobs = {}
        for kind, data in (("done", done_zip), ("fail", fail_zip), ("gap", gap_zip)):
            response = submit(client, data, f"{FILE_STEM}.zip")
            assert response.status_code == 202, response.text
            jobs[kind] = response.json()["job_id"]
        nifti_job = submit(client, nifti, f"{FILE_STEM}.nii.gz").json()["job_id"]
        for kind, bad in (
            ("encrypted", (tmp_path / "enc.zip").read_bytes()),
            ("not a study", b"plain text"),
            ("no CT", zip_bytes({f"{FILE_STEM}/{FILE_STEM}.dcm": b"not dicom"})),
        ):
            response = submit(client, bad, f"{FILE_STEM}.zip")
            assert response.status_code == 400, kind
            seen.append(response.text)
        states = {kind: wait_for(client, job) for kind, job in jobs.items()}
        assert wait_for(client, nifti_job)["status"] == "done"
        assert states["done"]["status"] == "done", states["done"]["error"]
        assert states["fail"]["status"] == "failed" and states["gap"]["status"] == "failed"
        assert states["fail"]["error"].startswith("internal error (RuntimeError: could not")
        assert states["gap"]["error"].startswith("upload"), states["gap"]["error"]
        seen += [json.dumps(states), client.get(f"{API_PREFIX}/jobs", headers=AUTH).text]
        for job in jobs.values():
            seen.append(client.get(f"{API_PREFIX}/jobs/{job}/result", headers=AUTH).text)
        documents = []
        for job in (jobs["done"], nifti_job):
            result = client.get(f"{API_PREFIX}/jobs/{job}/result", headers=AUTH).json()
            seen.append(json.dumps(result))
            for key in ("findings", "report"):
                documents.append(client.get(result["files"][key], headers=AUTH).text)
    logging.getLogger().removeHandler(served)
    answers = "\n".join(seen)
    # The service's own lines hold none of it; with the formatter `lungcad serve` installs,
    # neither do the library lines (the DICOM reader and SEG writer name series and files).
    service_lines = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("lungcad.service")
    )
    assert "job manager started" in service_lines and "job manager started" in served_log.getvalue()
    for secret in uids + paths + names:
        assert secret not in service_lines, f"the service's log holds {secret}"
        assert secret not in answers, f"an API answer holds {secret}"
        assert secret not in (data_dir / "audit.log").read_text(), secret
    for secret in uids + paths:
        assert secret not in served_log.getvalue(), f"the served log holds {secret}"
    for secret in paths + names:  # the results name their study by UID, as the SR does
        for document in documents:
            assert secret not in document, f"findings.json or report.html holds {secret}"
    assert re.search(
        rf"job {jobs['fail']} failed: RuntimeError: could not analyse upload", service_lines
    )
    assert re.search(
        rf"job {jobs['gap']} failed: InputError: upload: slices missing", service_lines
    )
    # The full text is kept for the administrator, in the job's folder only.
    full = (data_dir / "jobs" / jobs["fail"] / ERROR_FILE).read_text()
    assert FAIL_UID in full and "Traceback" in full
    findings = json.loads(documents[0])
    assert "path" not in findings["input"] and "checkpoint_path" not in findings["model"]
    assert findings["input"]["study_instance_uid"] == DONE_UID
