"""``lungcad listen`` on loopback, with the field's DICOM network tools as its peers.

dcmtk's ``storescu`` sends studies and ``echoscu`` verifies, ``storescp`` is the destination
that takes lungcad's results; Orthanc is the PACS that routes a study to lungcad by C-STORE
and receives the results back by C-STORE and STOW-RS. The analysis is the real Predictor on
the tiny trained run of ``tests.inference_helpers``; the settle time is a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.inference.predictor import Predictor
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.dimse.ledger import ListenLedger
from lungcad.service.dimse.listener import Listener
from lungcad.service.dimse.scp import StoreSCP
from lungcad.service.dimse.sender import DimseDestination
from lungcad.service.pacs.dicomweb import DicomWebClient
from tests.inference_helpers import shared_trained_run
from tests.system_tools import require_tool

torch.set_num_threads(1)

ORTHANC_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "orthanc.sh"
USER, PASSWORD = "lungcad", "test-secret"
MODALITY = "MODALITY01"


def need_dcmtk() -> None:
    require_tool(
        all(shutil.which(t) for t in ("storescu", "storescp", "echoscu")),
        "dcmtk (storescu, storescp, echoscu) is not installed: scripts/dcmtk.sh as root "
        "(make system-deps)",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def storescu(port: int, files: list[Path], aet: str = MODALITY) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", "LUNGCAD", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def storescp(folder: Path, port: int, aet: str = "VIEWER") -> Iterator[Path]:
    """dcmtk's storescp on ``port``, writing what it receives into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["storescp", "-aet", aet, "-od", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["echoscu", "-aec", aet, "127.0.0.1", str(port)], capture_output=True
                ).returncode
                == 0
            ),
            "storescp to answer C-ECHO",
            20.0,
        )
        yield folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def written(listener: Listener, uid: str) -> list[str]:
    """Modalities of the DICOM results lungcad wrote for a study (SEG, SR, KOS, ...)."""
    found = listener.outputs_dir(uid).glob("*.dcm")
    modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in found)
    assert {"SEG", "SR"} <= set(modalities)
    return modalities


def received(folder: Path) -> dict[str, list[str]]:
    """Modalities of the objects in ``folder`` by StudyInstanceUID."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.Modality))
    return {k: sorted(v) for k, v in found.items()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return Predictor.from_checkpoint(run_dir, batch_size=4)


@pytest.fixture(scope="module")
def make_study(tmp_path_factory: pytest.TempPathFactory):
    """``make(seed)`` -> (StudyInstanceUID, files) of a new 8-slice CT study of a phantom."""
    phantom = make_phantom(5, shape_zyx=(8, 64, 64), matrix=64, n_nodules=1, size_mm=20.0)
    root = tmp_path_factory.mktemp("studies")

    def make(seed: int) -> tuple[str, list[Path]]:
        files = write_dicom_series(
            phantom.volume,
            root / f"ct{seed}",
            patient_id=f"LISTEN-{seed}",
            patient_name=f"Doe^Listen{seed}",
            uid_seed=f"listen-test-{seed}",
        )
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files

    return make


class Counting:
    """The predictor, counting the studies it analyses."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.calls = predictor, 0

    def predict_volume(self, volume, **kw):
        self.calls += 1
        return self.predictor.predict_volume(volume, **kw)


@contextlib.contextmanager
def listening(
    state: Path, predictor, destinations=(), *, settle_s: float = 0.3, **ledger_kw
) -> Iterator[tuple[Listener, StoreSCP, list[tuple[str, str, str]]]]:
    """A Listener serving in a thread on a free port; stopped (and its ledger closed) after."""
    events: list[tuple[str, str, str]] = []
    ledger_kw.setdefault("retry_after_s", 0.2)
    ledger = ListenLedger(state, **ledger_kw)
    scp = StoreSCP(
        ledger, state / "incoming", ae_title="LUNGCAD", host="127.0.0.1", port=0, allowed=[MODALITY]
    )
    listener = Listener(
        predictor,
        ledger,
        scp,
        state,
        destinations,
        settle_s=settle_s,
        on_event=lambda *e: events.append(e),
    )
    scp.start()
    stop = threading.Event()
    thread = threading.Thread(target=listener.serve, args=(stop, 0.05), daemon=True)
    thread.start()
    try:
        yield listener, scp, events
    finally:
        stop.set()
        thread.join(timeout=120)
        ledger.close()


def kinds(events, kind: str) -> list[str]:
    return [tag for k, tag, _ in events if k == kind]


def test_echo_answers_and_only_allowed_callers_get_in(tmp_path: Path, predictor) -> None:
    need_dcmtk()
    with listening(tmp_path / "state", predictor) as (_, scp, _events):
        ok = subprocess.run(
            ["echoscu", "-aet", MODALITY, "-aec", "LUNGCAD", "127.0.0.1", str(scp.port)],
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0, ok.stderr
        stranger = subprocess.run(
            ["echoscu", "-aet", "STRANGER", "-aec", "LUNGCAD", "127.0.0.1", str(scp.port)],
            capture_output=True,
            text=True,
        )
        assert stranger.returncode != 0 and "Rejected" in stranger.stderr + stranger.stdout
        wrong_called = subprocess.run(
            ["echoscu", "-aet", MODALITY, "-aec", "OTHER", "127.0.0.1", str(scp.port)],
            capture_output=True,
        )
        assert wrong_called.returncode != 0
        assert scp.stats["echo"] == 1 and scp.stats["rejected"] == 2


def test_studies_from_storescu_are_analysed_and_results_reach_storescp(
    tmp_path: Path, predictor, make_study, caplog
) -> None:
    need_dcmtk()
    caplog.set_level(logging.DEBUG, logger="lungcad")
    first, first_files = make_study(1)
    second, second_files = make_study(2)
    port = free_port()
    counting = Counting(predictor)
    destination = DimseDestination("VIEWER", "127.0.0.1", port, calling_ae="LUNGCAD")
    with (
        storescp(tmp_path / "viewer", port) as viewer,
        listening(tmp_path / "state", counting, [destination], settle_s=1.0) as (
            listener,
            scp,
            events,
        ),
    ):
        # Two studies interleaved on one association, one instance twice: each study is
        # grouped by its own UID and holds the repeat once.
        interleaved = [f for pair in zip(first_files, second_files, strict=True) for f in pair]
        sent = storescu(scp.port, [*interleaved, first_files[0]])
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(kinds(events, "done")) == 2, "both studies delivered")
        assert scp.stats["new"] == 16 and scp.stats["repeat"] == 1
        assert counting.calls == 2
        assert received(viewer) == {
            first: written(listener, first),
            second: written(listener, second),
        }
        ledger = listener.ledger
        for uid in (first, second):
            record = ledger.get(uid)
            assert record.status == "done" and record.instances == 8
            dicom = sorted(p.name for p in listener.outputs_dir(uid).glob("*.dcm"))
            assert record.result["dicom"] == dicom and {"seg.dcm", "sr.dcm"} <= set(dicom)
            assert not scp.study_folder(uid).exists()  # images deleted once delivered
            assert (listener.outputs_dir(uid) / "findings.json").is_file()
        # The SEG references the CT that was sent.
        seg = next(
            pydicom.dcmread(p)
            for p in viewer.iterdir()
            if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
        )
        ct_series = {str(pydicom.dcmread(f).SeriesInstanceUID) for f in first_files + second_files}
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) in ct_series
    # No patient data in the listener's logs and events: no UID, patient id or name, no path.
    text = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("lungcad.service.dimse")
    ) + "".join(f"{e}" for e in events)
    for secret in (first, second, "LISTEN-1", "Listen1", str(tmp_path)):
        assert secret not in text
    assert listener.ledger.tag(first) in text


def test_a_destination_that_is_down_is_queued_and_nothing_is_lost_across_a_restart(
    tmp_path: Path, predictor, make_study
) -> None:
    need_dcmtk()
    study, files = make_study(3)
    port = free_port()  # nothing listens there yet
    destination = DimseDestination("VIEWER", "127.0.0.1", port, timeout_s=5.0)
    counting = Counting(predictor)
    state = tmp_path / "state"
    with listening(state, counting, [destination], settle_s=30.0) as (listener, scp, events):
        # Half the study, then the listener stops before it settles...
        assert storescu(scp.port, files[:4]).returncode == 0
    # ... and the rest arrives after the restart, within the settle time (whose clock ran
    # on while the listener was down): one study of 8 instances.
    with listening(state, counting, [destination], settle_s=3.0) as (listener, scp, events):
        assert storescu(scp.port, files[4:]).returncode == 0
        wait_for(lambda: len(kinds(events, "deferred")) >= 2, "two failed deliveries")
        assert kinds(events, "analysed") == [listener.ledger.tag(study)]
        (queued,) = listener.ledger.deliveries("pending")
        assert queued.attempts >= 2 and "could not be reached" in queued.last_error
        assert scp.study_folder(study).is_dir()  # kept until delivered
    assert counting.calls == 1
    with (
        storescp(tmp_path / "viewer", port) as viewer,
        listening(state, counting, [destination]) as (listener, scp, events),
    ):
        wait_for(lambda: kinds(events, "done"), "the queued delivery")
        assert received(viewer) == {study: written(listener, study)}
        record = listener.ledger.get(study)
        assert record.status == "done" and record.instances == 8
        # The same instance again after the study was analysed: acknowledged, not redone.
        assert storescu(scp.port, files[:1]).returncode == 0
        time.sleep(1.0)
    assert counting.calls == 1  # analysed once over three listeners


def test_a_study_that_cannot_be_read_is_given_up_with_the_reason(
    tmp_path: Path, predictor, make_study
) -> None:
    need_dcmtk()
    _, files = make_study(4)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in files[:3]:  # three slices, one of them moved: slices missing in between
        ds = pydicom.dcmread(path)
        if ds.InstanceNumber == 3:
            ds.ImagePositionPatient = [
                *ds.ImagePositionPatient[:2],
                ds.ImagePositionPatient[2] + 40,
            ]
        ds.save_as(broken / path.name)
    with listening(tmp_path / "state", predictor, max_attempts=1) as (listener, scp, events):
        assert storescu(scp.port, sorted(broken.iterdir())).returncode == 0
        wait_for(lambda: kinds(events, "failed"), "the failure")
        (tag, text) = [(t, x) for k, t, x in events if k == "failed"][0]
        assert "InputError" in text and "slices missing" in text and "gave_up" in text
        assert str(tmp_path) not in text  # the reader names the folder; the event does not
        assert listener.ledger.counts()["gave_up"] == 1


# -- with Orthanc as the PACS --------------------------------------------------------------


@pytest.fixture
def orthanc_pacs(tmp_path: Path) -> Iterator[dict]:
    """An Orthanc with a DICOM port that knows lungcad (AE LUNGCAD) as modality ``lungcad``."""
    plugin = subprocess.run([str(ORTHANC_SCRIPT), "plugin"], capture_output=True, text=True)
    require_tool(
        shutil.which("Orthanc") is not None and plugin.returncode == 0,
        "Orthanc with its DICOMweb plugin is not installed: scripts/orthanc.sh install",
    )
    folder, http, dicom, lungcad = tmp_path / "orthanc", free_port(), free_port(), free_port()
    subprocess.run(
        [
            str(ORTHANC_SCRIPT),
            "start",
            str(folder),
            "--http-port",
            str(http),
            "--dicom-port",
            str(dicom),
            "--user",
            USER,
            "--password",
            PASSWORD,
            "--modality",
            f"lungcad=LUNGCAD@127.0.0.1:{lungcad}",
            "--timeout",
            "20",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield {"http": http, "dicom": dicom, "lungcad": lungcad, "folder": folder}
    finally:
        subprocess.run([str(ORTHANC_SCRIPT), "stop", str(folder)], capture_output=True)


@pytest.mark.slow  # the command as deployed, a process of its own: about 30 s
def test_listen_with_orthanc_routing_by_c_store_and_results_back_by_c_store_and_stow(
    orthanc_pacs: dict, make_study, run_dir: Path, tmp_path: Path
) -> None:
    study, files = make_study(5)
    rest = httpx.Client(base_url=f"http://127.0.0.1:{orthanc_pacs['http']}", auth=(USER, PASSWORD))
    dicomweb = f"http://127.0.0.1:{orthanc_pacs['http']}/dicom-web"
    with DicomWebClient(dicomweb, username=USER, password=PASSWORD) as client:
        client.store(files)
    state = tmp_path / "state"
    command = [
        str(Path(sys.executable).with_name("lungcad")),
        "listen",
        "--checkpoint",
        str(run_dir),
        "--state-dir",
        str(state),
        "--port",
        str(orthanc_pacs["lungcad"]),
        "--allow",
        "LUNGCADTEST",  # Orthanc's AE title
        "--send-to",
        f"LUNGCADTEST@127.0.0.1:{orthanc_pacs['dicom']}",
        "--stow",
        dicomweb,
        "--user",
        USER,
        "--settle-seconds",
        "0.5",
        "--threads",
        "1",
    ]
    env = {**os.environ, "LUNGCAD_PACS_PASSWORD": PASSWORD}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening as LUNGCAD"), line + process.stderr.read()
        (found,) = rest.post("/tools/lookup", content=study).json()
        job = rest.post("/modalities/lungcad/store", json={"Resources": [found["ID"]]})
        assert job.status_code == 200, job.text  # Orthanc routed the study by C-STORE
        lines: list[str] = []
        while not any(x.startswith("done") for x in lines):
            lines.append(process.stdout.readline())
            assert lines[-1] or process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    text = "".join(lines) + out
    assert text.count("delivered") == 2 and "dimse:LUNGCADTEST" in text and "stow:" in text
    assert study not in text + err and str(tmp_path) not in text + err
    with DicomWebClient(dicomweb, username=USER, password=PASSWORD) as client:
        series = client.search_series(study)
    # The same SEG and SR came twice (C-STORE, then STOW-RS): Orthanc holds one of each.
    results = sorted(str(s.Modality) for s in series if s.Modality != "CT")
    assert {"SEG", "SR"} <= set(results) and len(results) == len(set(results))
    assert len(series) == len(results) + 1


def test_listen_refuses_bad_settings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    base = ["listen", "--checkpoint", str(run), "--state-dir", str(tmp_path / "s")]
    assert cli_main([*base, "--allow", "A", "--send-to", "no-port-here"]) == 2
    assert cli_main([*base, "--allow", "MUCH-TOO-LONG-AE-TITLE"]) == 2
    assert cli_main([*base, "--allow", "A", "--user", "u"]) == 2
    assert not (tmp_path / "s").exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main([*base, "--allow", "A", "--port", str(port)]) == 2


class FlakyDestination:
    """A destination that fails with ``errors`` (one per call) before it takes results."""

    def __init__(self, name: str, errors: list[Exception]) -> None:
        self.name, self.errors, self.got = name, errors, []

    def send(self, files, study_uid) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.got.append((study_uid, [p.name for p in files]))


def test_a_failing_destination_holds_up_neither_the_loop_nor_the_others(tmp_path: Path) -> None:
    now = [0.0]
    ledger = ListenLedger(tmp_path, retry_after_s=10.0, clock=lambda: now[0])
    scp = StoreSCP(
        ledger, tmp_path / "incoming", ae_title="LUNGCAD", host="127.0.0.1", port=0, allowed=["A"]
    )
    broken = FlakyDestination("broken", [ValueError("odd answer"), OSError("disk")])
    fine = FlakyDestination("fine", [])
    listener = Listener(lambda: None, ledger, scp, tmp_path, [broken, fine])
    for uid in ("1.2.3.4.5.1", "1.2.3.4.5.2"):  # two analysed studies, results on disk
        ledger.record_instance(uid, uid + ".1")
        ledger.start(uid)
        ledger.analysed(uid, {"dicom": ["sr.dcm"]}, ["broken", "fine"])
        listener.outputs_dir(uid).mkdir(parents=True)
        (listener.outputs_dir(uid) / "sr.dcm").write_bytes(b"x")
    report = listener.step()
    # The broken destination is tried once per pass, not once per study; the other gets all.
    assert len(report.deferred) == 1 and len(fine.got) == 2 and report.done == []
    now[0] = 10.0
    assert len(listener.step().deferred) == 1  # OSError: still queued, the loop goes on
    now[0] = 100.0
    report = listener.step()
    assert len(broken.got) == 2 and len(report.done) == 2
    assert dict(ledger.counts()) == {"done": 2}
    ledger.close()
