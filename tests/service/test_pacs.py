"""PACS link: DICOMweb client, round trip, ledger and ``lungcad watch``.

Protocol details (retries, multipart parsing, STOW failures, the ledger) are tested against
in-process fakes; everything else against a real Orthanc with the DICOMweb plugin on
127.0.0.1, started once for the module by ``scripts/orthanc.sh`` (basic auth on) and stopped
by the fixture's finaliser. Without Orthanc installed those tests skip, saying how to install
(under CI=true they fail: tests/system_tools.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
import tenacity
import torch
from dicomweb_client.api import DICOMwebClient

from lungcad.cli import main as cli_main
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.inference.predictor import Predictor
from lungcad.io import read_image
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.audit import SALT_FILE, load_salt
from lungcad.service.pacs.dicomweb import (
    DicomWebClient,
    PacsError,
    PacsUnavailableError,
    RetryPolicy,
)
from lungcad.service.pacs.process import PacsStudyResult, process_study
from lungcad.service.pacs.watch import StudyLedger, watch_round
from lungcad.service.redact import study_tag
from tests.inference_helpers import shared_trained_run
from tests.system_tools import require_tool

torch.set_num_threads(1)  # 2 shared cores: more threads only contend

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "orthanc.sh"
USER, PASSWORD = "lungcad", "test-secret"


def tag_of(state: Path, uid: str) -> str:
    """How the watcher names a study in its output: the tag keyed by its state folder's salt."""
    return study_tag(uid, load_salt(state / SALT_FILE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc on loopback, driven through scripts/orthanc.sh."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        subprocess.run(
            [
                str(SCRIPT),
                "start",
                str(self.folder),
                "--http-port",
                str(self.port),
                "--user",
                USER,
                "--password",
                PASSWORD,
                "--timeout",
                "20",
            ],
            check=True,
            capture_output=True,
            text=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [str(SCRIPT), "stop", str(self.folder)], check=True, capture_output=True, text=True
        )

    def client(self, **kw) -> DicomWebClient:
        kw.setdefault("username", USER)
        kw.setdefault("password", PASSWORD)
        return DicomWebClient(self.url, **kw)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    plugin = subprocess.run([str(SCRIPT), "plugin"], capture_output=True, text=True)
    require_tool(
        shutil.which("Orthanc") is not None and plugin.returncode == 0,
        "Orthanc with its DICOMweb plugin is not installed; run "
        "`scripts/orthanc.sh install` as root (`make system-deps` does)",
    )
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.stop()
        require_tool(False, f"Orthanc could not be started on 127.0.0.1: {exc.stderr.strip()}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(shared_trained_run(tmp_path_factory), batch_size=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def phantom():
    # 8 slices of 64x64 (5.6 mm pixels) with one 20 mm tumour.
    return make_phantom(3, shape_zyx=(8, 64, 64), matrix=64, n_nodules=1, size_mm=20.0)


@pytest.fixture(scope="module")
def make_study(phantom, tmp_path_factory: pytest.TempPathFactory):
    """Write the phantom as a new CT study (its own UIDs) and return (study, series, files)."""
    root = tmp_path_factory.mktemp("studies")

    def make(seed: int, study_date: str) -> tuple[str, str, list[Path]]:
        files = write_dicom_series(
            phantom.volume,
            root / f"ct{seed}",
            patient_id=f"PACS-{seed}",
            uid_seed=f"pacs-test-{seed}",
            study_date=study_date,
        )
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files

    return make


def modalities(client: DicomWebClient, study_uid: str) -> list[str]:
    return sorted(str(s.Modality) for s in client.search_series(study_uid))


# -- protocol, against fakes ---------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


class Trickle(BytesIO):
    """A response body that comes 7 bytes per read, so multipart boundaries split."""

    def read(self, n: int | None = -1) -> bytes:
        return super().read(7 if n is None or n < 0 or n > 7 else n)


class FakeAdapter(requests.adapters.BaseAdapter):
    """A requests transport answering from ``handler(request)``, or raising what it raises."""

    def __init__(self, handler: Callable[[requests.PreparedRequest], Answer]) -> None:
        super().__init__()
        self.handler = handler

    def send(self, request, **kwargs) -> requests.Response:
        status, headers, body = self.handler(request)
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        response.reason = HTTPStatus(status).phrase
        response.headers.update(headers)
        response.raw = Trickle(body)
        return response

    def close(self) -> None:
        pass


def fake_session(handler: Callable[[requests.PreparedRequest], Answer]) -> requests.Session:
    session = requests.Session()
    session.mount("http://", FakeAdapter(handler))
    return session


JSON = {"Content-Type": "application/dicom+json"}


def test_retries_5xx_with_exponential_backoff_and_jitter() -> None:
    answers = iter([503, 502, 200])
    pauses: list[float] = []

    def handler(request: requests.PreparedRequest) -> Answer:
        return next(answers), JSON, b"[]"

    policy = RetryPolicy(attempts=4, base_delay_s=0.4, max_delay_s=10.0)
    client = DicomWebClient(
        "http://127.0.0.1:1/dicom-web",
        retry=policy,
        sleep=pauses.append,
        session=fake_session(handler),
        seed=1,
    )
    assert client.search_studies() == []
    assert len(pauses) == 2
    for n, pause in enumerate(pauses):  # equal jitter: in [d/2, d], d = base * 2**n
        d = 0.4 * 2**n
        assert d / 2 <= pause <= d
    rng = random.Random(0)
    assert max(policy.delay(20, rng) for _ in range(50)) <= 10.0  # capped


def test_pacs_that_stays_down_gives_one_clear_error() -> None:
    calls: list[requests.PreparedRequest] = []

    def handler(request: requests.PreparedRequest) -> Answer:
        calls.append(request)
        return 503, {}, b"Service Unavailable"

    pauses: list[float] = []
    client = DicomWebClient(
        "http://127.0.0.1:1/dicom-web",
        sleep=pauses.append,
        retry=RetryPolicy(attempts=3, base_delay_s=0.1),
        session=fake_session(handler),
    )
    with pytest.raises(PacsUnavailableError, match=r"after 3 attempts.*HTTP 503"):
        client.search_series("1.2.3")
    assert len(calls) == 3 and len(pauses) == 2 and pauses[1] > pauses[0] / 2


def test_unreachable_port_retries_then_clear_error(tmp_path: Path) -> None:
    pauses: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    client = DicomWebClient(
        url, sleep=pauses.append, timeout_s=2.0, retry=RetryPolicy(attempts=3, base_delay_s=0.05)
    )
    with pytest.raises(PacsUnavailableError) as err:
        client.retrieve_study("1.2.3", tmp_path / "never")
    message = str(err.value)
    assert url in message and "connection failed" in message and "Orthanc" in message
    assert len(pauses) == 2


def test_auth_failure_is_not_retried_and_token_is_sent() -> None:
    seen: list[requests.PreparedRequest] = []

    def handler(request: requests.PreparedRequest) -> Answer:
        seen.append(request)
        return 401, {}, b""

    client = DicomWebClient(
        "http://127.0.0.1:1/dicom-web",
        token="tok-123",
        session=fake_session(handler),
        sleep=lambda s: None,
    )
    with pytest.raises(PacsError, match="refused the credentials") as err:
        client.search_studies(modality="CT", date_from="2024-01-01", date_to="20240131")
    assert not isinstance(err.value, PacsUnavailableError)
    (request,) = seen
    assert request.headers["Authorization"] == "Bearer tok-123"
    params = parse_qs(urlsplit(request.url).query)
    assert params["StudyDate"] == ["20240101-20240131"] and params["ModalitiesInStudy"] == ["CT"]


def test_timeouts_are_retried_by_tenacity_around_dicomweb_client() -> None:
    """The protocol is dicomweb-client's (its own status-only retrying off), the retries
    tenacity's: a read timeout, then a connection drop, then the answer."""
    failures: list[Exception] = [requests.ReadTimeout("slow"), requests.ConnectionError("reset")]
    pauses: list[float] = []

    def handler(request: requests.PreparedRequest) -> Answer:
        if failures:
            raise failures.pop(0)
        series = pydicom.Dataset()
        series.SeriesInstanceUID, series.Modality = "1.2.3.4", "CT"
        return 200, JSON, json.dumps([series.to_json_dict()]).encode()

    client = DicomWebClient(
        "http://127.0.0.1:1/dicom-web",
        session=fake_session(handler),
        sleep=pauses.append,
        retry=RetryPolicy(attempts=3, base_delay_s=0.2),
    )
    assert isinstance(client._web, DICOMwebClient) and client._web._max_attempts == 1
    (series,) = client.search_series("1.2.3")
    assert series.Modality == "CT" and len(pauses) == 2
    failures[:] = [requests.ReadTimeout("slow")] * 3
    with pytest.raises(PacsUnavailableError, match=r"after 3 attempts.*timed out") as err:
        client.search_series("1.2.3")
    assert isinstance(err.value.__cause__, requests.ReadTimeout)
    assert tenacity.__name__ == "tenacity"  # the retry library named in docs/dependencies.md


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "127.0.0.1:8042"},
        {"url": "ftp://127.0.0.1/x"},
        {"url": "http://127.0.0.1:8042/dicom-web", "username": "u"},
        {"url": "http://127.0.0.1:8042/dicom-web", "username": "u", "password": "p", "token": "t"},
    ],
)
def test_client_rejects_bad_settings(kwargs) -> None:
    with pytest.raises(InputError):
        DicomWebClient(**kwargs)


def test_wado_multipart_is_parsed_as_a_stream(phantom, tmp_path: Path) -> None:
    files = write_dicom_series(phantom.volume, tmp_path / "src", uid_seed="multipart")[:3]
    boundary = b"b0und4ry"
    body = (
        b"".join(
            b"--"
            + boundary
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + f.read_bytes()
            + b"\r\n"
            for f in files
        )
        + b"--"
        + boundary
        + b"--\r\n"
    )

    def handler(request: requests.PreparedRequest) -> Answer:
        assert "multipart/related" in request.headers["Accept"]
        assert "transfer-syntax=*" in request.headers["Accept"]  # as stored, not transcoded
        if urlsplit(request.url).path.endswith("/9.9.9"):
            return 200, {"Content-Type": "text/json"}, b"{}"
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
        return 200, {"Content-Type": content_type}, body  # read 7 bytes at a time (Trickle)

    client = DicomWebClient("http://127.0.0.1:1/dicom-web", session=fake_session(handler))
    got = client.retrieve_study("1.2.3", tmp_path / "got")
    expected = {f"{pydicom.dcmread(f).SOPInstanceUID}.dcm": pydicom.dcmread(f) for f in files}
    assert {p.name: pydicom.dcmread(p) for p in got} == expected
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(expected)
    with pytest.raises(PacsError, match="multipart/related"):
        client.retrieve_study("9.9.9", tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []
    with pytest.raises(InputError, match="not a DICOM UID"):
        client.retrieve_study("1.2/../../x", tmp_path / "bad")


def test_stow_refusal_names_the_instance_and_reason(tmp_path: Path) -> None:
    failed = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                    "00081197": {"vr": "US", "Value": [272]},
                }
            ],
        }
    }

    def handler(request: requests.PreparedRequest) -> Answer:
        assert request.headers["Content-Type"].startswith("multipart/related")
        return 409, JSON, json.dumps(failed).encode()

    path = tmp_path / "x.dcm"
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    client = DicomWebClient("http://127.0.0.1:1/dicom-web", session=fake_session(handler))
    with pytest.raises(PacsError, match=r"refused 1 instance.*1\.2\.3\.4 \(reason 272\)"):
        client.store([path])


def test_ledger_survives_crashes_backs_off_and_gives_up(tmp_path: Path) -> None:
    now = [1000.0]
    ledger = StudyLedger(tmp_path, max_attempts=3, retry_after_s=10.0, clock=lambda: now[0])
    assert ledger.discover(["1.2.3", "1.2.4"]) == ["1.2.3", "1.2.4"]
    assert ledger.discover(["1.2.3"]) == []
    ledger.start("1.2.3")
    with pytest.raises(InputError, match="another lungcad watch"):
        StudyLedger(tmp_path)  # one watcher per state folder; the running study is untouched
    assert ledger.get("1.2.3")["status"] == "running"
    ledger.close()
    # The process died there. A new ledger finds the study "running": one failed attempt,
    # retried at once, not lost.
    ledger = StudyLedger(tmp_path, max_attempts=3, retry_after_s=10.0, clock=lambda: now[0])
    entry = ledger.get("1.2.3")
    assert entry["status"] == "failed" and entry["failures"] == 1
    assert "interrupted" in entry["last_error"] and ledger.is_due("1.2.3")
    ledger.fail("1.2.3", "RuntimeError: boom")  # second failure: pause 10 * 2 s
    assert ledger.get("1.2.3")["next_attempt_at"] == pytest.approx(1020.0)
    assert not ledger.is_due("1.2.3")
    now[0] = 1020.0
    assert ledger.is_due("1.2.3")
    ledger.defer("1.2.3", "PACS down")  # not the study's fault: no failure counted
    assert ledger.get("1.2.3")["status"] == "pending" and ledger.get("1.2.3")["failures"] == 2
    ledger.fail("1.2.3", "RuntimeError: boom again")
    assert ledger.get("1.2.3")["status"] == "gave_up" and not ledger.is_due("1.2.3")
    ledger.succeed("1.2.4", {"study_uid": "1.2.4"})
    assert dict(ledger.counts()) == {"gave_up": 1, "done": 1}
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["studies"]["1.2.3"]["last_error"] == "RuntimeError: boom again"
    ledger.close()
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(InputError, match="ledger.json.*not a lungcad PACS ledger"):
        StudyLedger(tmp_path)


class ArrivingPacs:
    """A fake PACS for the watcher: CT studies whose instance counts the test changes."""

    def __init__(self) -> None:
        self.counts: dict[str, int | None] = {}

    def search_studies(self, *, modality=None, date_from=None) -> list[pydicom.Dataset]:
        found = []
        for uid, count in self.counts.items():
            ds = pydicom.Dataset()
            ds.StudyInstanceUID, ds.ModalitiesInStudy = uid, ["CT"]
            if count is not None:
                ds.NumberOfStudyRelatedInstances = count
            found.append(ds)
        return found

    def search_series(self, study_uid: str) -> list[pydicom.Dataset]:
        return []  # no lungcad outputs yet


def test_watcher_logs_name_studies_by_a_salted_tag_never_the_uid(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.7310499"

    def failing(client, predictor, study_uid, work):
        raise RuntimeError(f"cannot read {work}/DOE_JANE/IM1.dcm of study {study_uid}")

    monkeypatch.setattr("lungcad.service.pacs.watch.process_study", failing)
    pacs = ArrivingPacs()
    pacs.counts = {uid: 3}
    with (
        caplog.at_level(logging.DEBUG, logger="lungcad"),
        StudyLedger(tmp_path / "state", max_attempts=2, retry_after_s=0.0) as ledger,
    ):
        watch_round(pacs, lambda: "model", ledger, tmp_path / "work", settle_s=0.0)
        pacs.counts[uid] = 4  # more images came
        watch_round(pacs, lambda: "model", ledger, tmp_path / "work", settle_s=0.0)
        tag = ledger.tag(uid)
        assert ledger.get(uid)["status"] == "gave_up"
    assert tag == tag_of(tmp_path / "state", uid) and uid not in tag
    assert f"study {tag} failed: RuntimeError: cannot read <path> of study <uid>" in caplog.text
    assert f"study {tag}: 3 -> 4 instances" in caplog.text
    assert f"study {tag}: giving up after 2 failed attempts" in caplog.text
    for secret in (uid, "DOE_JANE", str(tmp_path)):
        assert secret not in caplog.text, secret
    # The full error stays in the ledger, in the state folder that only its owner may read.
    ledger_doc = json.loads((tmp_path / "state" / "ledger.json").read_text())
    assert uid in ledger_doc["studies"][uid]["last_error"]
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0


def test_watch_waits_until_a_study_stops_arriving(tmp_path: Path, monkeypatch) -> None:
    processed: list[str] = []

    def fake_process(client, predictor, uid, work):
        processed.append(uid)
        return PacsStudyResult(uid, "1.9", 0.1, False, 0)

    monkeypatch.setattr("lungcad.service.pacs.watch.process_study", fake_process)
    now = [1000.0]
    pacs = ArrivingPacs()
    pacs.counts = {"1.2.1": 3, "1.2.2": None}  # 1.2.2: a PACS that does not report counts

    def round_(ledger: StudyLedger, **kw):
        return watch_round(pacs, lambda: "model", ledger, tmp_path / "work", settle_s=30.0, **kw)

    with StudyLedger(tmp_path / "state", clock=lambda: now[0]) as ledger:
        report = round_(ledger)
        assert processed == [] and report.settling == {"1.2.1": 30.0, "1.2.2": 30.0}
        now[0] = 1040.0
        pacs.counts["1.2.1"] = 5  # more images came: the wait starts again
        report = round_(ledger)
        assert processed == ["1.2.2"]  # no count: processed settle_s after first seen
        assert report.settling == {"1.2.1": 30.0}
        now[0] = 1060.0
        assert round_(ledger).settling == {"1.2.1": pytest.approx(10.0)} and len(processed) == 1
        assert ledger.get("1.2.1")["status"] == "pending"
    # The counts are in the ledger: a restarted watcher (or the next --once) goes on waiting.
    now[0] = 1070.0
    with StudyLedger(tmp_path / "state", clock=lambda: now[0]) as ledger:
        assert ledger.get("1.2.1")["instances"] == 5
        report = round_(ledger)
        assert processed == ["1.2.2", "1.2.1"] and report.settling == {}
        assert ledger.get("1.2.1")["status"] == "done"
        pacs.counts["1.2.3"] = 8
        report = watch_round(pacs, lambda: "model", ledger, tmp_path / "work", settle_s=0.0)
        assert processed[-1] == "1.2.3" and report.settling == {}  # 0: no wait
        pacs.counts["1.2.4"] = 1
        assert round_(ledger).settling == {"1.2.4": 30.0}
        round_(ledger, study_uids=["1.2.4"])  # named by the operator: not waited for
        assert processed[-1] == "1.2.4"
        with pytest.raises(InputError, match="settle"):
            watch_round(pacs, lambda: "model", ledger, tmp_path / "work", settle_s=-1.0)


# -- against a real Orthanc ----------------------------------------------------------------


def test_qido_search_by_uid_date_and_modality(orthanc: Orthanc, make_study) -> None:
    study_uid, series_uid, files = make_study(1, "20240315")
    with orthanc.client() as client:
        stored = client.store(files)
        assert len(stored) == len(files)
        (study,) = client.search_studies(study_uid=study_uid)
        assert "CT" in study.ModalitiesInStudy
        assert int(study.NumberOfStudyRelatedInstances) == len(files)
        in_range = client.search_studies(date_from="2024-03-01", date_to="20240331", modality="CT")
        assert study_uid in {str(s.StudyInstanceUID) for s in in_range}
        later = client.search_studies(date_from="20240316")
        assert study_uid not in {str(s.StudyInstanceUID) for s in later}
        (series,) = client.search_series(study_uid)
        assert series.SeriesInstanceUID == series_uid and series.Modality == "CT"
    with orthanc.client(username=None, password=None) as anonymous:
        with pytest.raises(PacsError, match="credentials"):
            anonymous.search_studies()


def test_wado_fetches_identical_pixels(orthanc: Orthanc, make_study, tmp_path: Path) -> None:
    study_uid, _, files = make_study(2, "20240316")
    with orthanc.client() as client:
        client.store(files)
        got = client.retrieve_study(study_uid, tmp_path / "got")
    sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, files)}
    received = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, got)}
    assert received == sent
    original, fetched = read_image(files[0].parent), read_image(tmp_path / "got")
    assert np.array_equal(original.array, fetched.array) and original.same_geometry(fetched)


def test_round_trip_stores_seg_and_sr_in_the_study(
    orthanc: Orthanc, make_study, predictor, tmp_path: Path
) -> None:
    study_uid, ct_series, files = make_study(3, "20240317")
    with orthanc.client() as client:
        client.store(files)
        result = process_study(client, predictor, study_uid, tmp_path / "work")
        assert result.series_uid == ct_series and not result.reused_outputs
        assert len(result.stored) == 3  # SEG, SR and KOS
        series = client.search_series(study_uid)
        assert sorted(str(s.Modality) for s in series) == ["CT", "KO", "SEG", "SR"]
        seg_series = next(s for s in series if s.Modality == "SEG")
        (seg_file,) = client.retrieve_series(
            study_uid, str(seg_series.SeriesInstanceUID), tmp_path / "seg"
        )
        seg = hd.seg.segread(seg_file)
        assert seg.StudyInstanceUID == study_uid and seg.Manufacturer == "lungcad"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series
        assert str(seg.SOPInstanceUID) in result.stored
        # A repeated round trip (e.g. after a crash before the ledger was updated) sends the
        # same objects again: the PACS still holds one SEG, one SR and one KOS.
        again = process_study(client, predictor, study_uid, tmp_path / "work")
        assert again.reused_outputs and sorted(again.stored) == sorted(result.stored)
        assert modalities(client, study_uid) == ["CT", "KO", "SEG", "SR"]
        assert (
            int(client.search_studies(study_uid=study_uid)[0].NumberOfStudyRelatedInstances)
            == len(files) + 3
        )
    assert not (tmp_path / "work" / "dicom").exists()  # no copy of the images is kept


def watch(orthanc: Orthanc, run_dir: Path, state: Path, *extra: str) -> int:
    return cli_main(
        [
            "watch",
            "--checkpoint",
            str(run_dir),
            "--pacs",
            orthanc.url,
            "--user",
            USER,
            "--password",
            PASSWORD,
            "--state-dir",
            str(state),
            "--threads",
            "1",
            "--settle-seconds",
            "0",
            *extra,
        ]
    )


def test_watch_once_processes_only_new_studies(
    orthanc: Orthanc, make_study, run_dir: Path, tmp_path: Path, capsys
) -> None:
    # Dates after the other tests' studies: --since keeps this test to its own studies.
    first, _, files = make_study(11, "20250601")
    state = tmp_path / "state"
    with orthanc.client() as client:
        client.store(files)
        assert watch(orthanc, run_dir, state, "--once", "--since", "20250601") == 0
        out = capsys.readouterr().out
        assert f"done    {tag_of(state, first)}" in out and "1 processed" in out
        assert first not in out  # studies are named by their tag, never by the UID
        assert modalities(client, first) == ["CT", "KO", "SEG", "SR"]
        assert json.loads((state / "ledger.json").read_text())["studies"][first]["status"] == "done"

        assert watch(orthanc, run_dir, state, "--once", "--since", "20250601") == 0
        assert "0 processed" in capsys.readouterr().out  # the ledger remembers

        second, _, files = make_study(12, "20250602")
        client.store(files)
        # With a settle time, --once sees the new study, waits, polls again, then processes.
        assert (
            watch(
                orthanc, run_dir, state, "--once", "--since", "20250601", "--settle-seconds", "0.5"
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "0 processed, 0 failed, 0 already analysed, 1 still arriving" in out
        assert f"done    {tag_of(state, second)}" in out and "1 processed" in out
        assert tag_of(state, first) not in out
        assert modalities(client, first) == ["CT", "KO", "SEG", "SR"]  # nothing sent twice
        assert modalities(client, second) == ["CT", "KO", "SEG", "SR"]

    # A lost ledger: studies that already hold lungcad's SEG/SR are adopted, not redone.
    assert watch(orthanc, run_dir, tmp_path / "fresh", "--once", "--since", "20250601") == 0
    out = capsys.readouterr().out
    assert "0 processed" in out and "2 already analysed" in out


def test_orthanc_down_keeps_the_study_pending(
    orthanc: Orthanc, make_study, run_dir: Path, tmp_path: Path, capsys
) -> None:
    study_uid, _, files = make_study(21, "20250701")
    with orthanc.client() as client:
        client.store(files)
    state = tmp_path / "state"
    fast_retries = ("--retries", "3", "--backoff", "0.05")
    orthanc.stop()
    try:
        assert watch(orthanc, run_dir, state, "--once", *fast_retries) == 3
        err = capsys.readouterr().err
        assert "retry 1/2" in err and "retry 2/2" in err
        assert "did not answer usefully after 3 attempts" in err and "Orthanc" in err

        assert watch(orthanc, run_dir, state, "--study", study_uid, *fast_retries) == 3
        entry = json.loads((state / "ledger.json").read_text())["studies"][study_uid]
        assert entry["status"] == "pending" and "after 3 attempts" in entry["last_error"]
        assert entry["failures"] == 0
    finally:
        orthanc.start()
    capsys.readouterr()
    assert watch(orthanc, run_dir, state, "--once", "--since", "20250701") == 0
    out = capsys.readouterr().out
    assert f"done    {tag_of(state, study_uid)}" in out and study_uid not in out
    entry = json.loads((state / "ledger.json").read_text())["studies"][study_uid]
    assert entry["status"] == "done" and entry["result"]["stored"]


@pytest.mark.slow
def test_watch_loop_picks_up_new_studies_and_stops_cleanly(
    orthanc: Orthanc, make_study, run_dir: Path, tmp_path: Path
) -> None:
    """The polling service as deployed: a separate process, SIGTERM ends it with exit 0."""
    state = tmp_path / "state"

    def status(uid: str) -> str | None:
        try:
            doc = json.loads((state / "ledger.json").read_text())
        except FileNotFoundError:
            return None
        return doc["studies"].get(uid, {}).get("status")

    def wait_done(uid: str, process: subprocess.Popen, limit_s: float = 180.0) -> None:
        deadline = time.monotonic() + limit_s
        while status(uid) != "done":
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"study {uid} not processed in {limit_s} s"
            time.sleep(0.2)

    first, _, files = make_study(31, "20250801")
    with orthanc.client() as client:
        client.store(files)
        command = [
            str(Path(sys.executable).with_name("lungcad")),
            "watch",
            "--checkpoint",
            str(run_dir),
            "--pacs",
            orthanc.url,
            "--user",
            USER,
            "--state-dir",
            str(state),
            "--interval",
            "0.5",
            "--since",
            "20250801",
            "--settle-seconds",
            "1",
            "--threads",
            "1",
        ]
        env = {**os.environ, "LUNGCAD_PACS_PASSWORD": PASSWORD}
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_done(first, process)
            second, _, files = make_study(32, "20250802")
            client.store(files)
            wait_done(second, process)
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err
        assert (
            f"done    {tag_of(state, first)}" in out and f"done    {tag_of(state, second)}" in out
        )
        assert first not in out + err and second not in out + err
        assert modalities(client, second) == ["CT", "KO", "SEG", "SR"]
