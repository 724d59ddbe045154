"""Test helpers for the service tests: a fake predictor, tiny studies, uploads, polling.

Not a test module (no ``test_`` prefix); imported by the tests in tests/service/. The viewer and
PACS tests may use it too: :class:`FakePredictor` has a real ``Predictor``'s ``info`` and
``predict_volume`` API and returns a real ``StudyResult`` (a box-shaped "tumour" in the middle
of the volume, a Grad-CAM map on the middle slice) in milliseconds.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lungcad.finding import StudyFinding
from lungcad.inference.lesions import find_lesions
from lungcad.inference.predictor import StudyResult
from lungcad.service.jobs.schema import API_PREFIX, FINISHED
from lungcad.volume import Volume, reorient

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "another-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakePredictor:
    """Stands in for ``lungcad.inference.predictor.Predictor`` where inference itself is not under
    test.

    Args:
        probability: the study probability it reports.
        fail_times: the first ``fail_times`` calls raise RuntimeError("model exploded").
        block: when given, ``predict_volume`` waits for this event first (to hold a job in
            "running").
    """

    def __init__(
        self, probability: float = 0.8, fail_times: int = 0, block: threading.Event | None = None
    ) -> None:
        self.probability = probability
        self.fail_times = fail_times
        self.block = block
        self.calls = 0
        self.started = threading.Event()

    @property
    def info(self) -> dict[str, Any]:
        return {
            "model_name": "fake",
            "lungcad_version": "0.1.0",
            "config_hash": "c0ffee",
            "checkpoint_sha256": "ab" * 32,
            "checkpoint_path": "/secret/run/best.pt",
            "threshold": 0.5,
            "intended_use": "Research use only (test).",
        }

    def predict_volume(self, volume: Volume) -> StudyResult:
        self.calls += 1
        self.started.set()
        if self.block is not None:
            self.block.wait(timeout=60)
        if self.calls <= self.fail_times:
            raise RuntimeError("model exploded")
        z, h, w = volume.shape
        mask = np.zeros(volume.shape, np.uint8)
        mask[z // 2, h // 4 : h // 2, w // 4 : w // 2] = 1
        prob = mask.astype(np.float32) * 0.9
        cam = np.zeros(volume.shape, np.float32)
        cam[z // 2, : h // 2, : w // 2] = 1.0
        mask_v = volume.with_array(mask, intensity="windowed")
        prob_v = volume.with_array(prob, intensity="windowed")
        slice_probs = np.full(z, 0.1)
        slice_probs[z // 2] = self.probability
        return StudyResult(
            mask=mask_v,
            probability=prob_v,
            slice_probabilities=slice_probs,
            finding=StudyFinding.decide(self.probability, 0.5),
            lesions=find_lesions(mask_v, volume, prob_v),
            lung_slices=np.arange(z),
            cam=volume.with_array(cam, intensity="windowed"),
            cam_slices=[z // 2],
            model_info=self.info,
            timings={"total_s": 0.0},
        )


def hu_volume(shape: tuple[int, int, int] = (4, 32, 32), seed: int = 0) -> Volume:
    """A small HU volume (air outside a soft-tissue disc, 2 mm slices, 1.5 mm pixels)."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    body = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.4 * min(h, w)) ** 2
    array = np.where(body, 40.0, -1000.0)[None].repeat(z, 0) + rng.normal(0, 10, shape)
    return Volume(
        array=array.astype(np.float32),
        spacing=(2.0, 1.5, 1.5),
        origin=(-24.0, -24.0, 0.0),
        meta={"source_orientation": "LPS"},
    )


def nifti_bytes(volume: Volume, folder: Path, orientation: str = "RAS") -> bytes:
    """The volume as .nii.gz bytes, stored in ``orientation`` (default RAS, like most NIfTI)."""
    path = folder / "study.nii.gz"
    sitk.WriteImage(reorient(volume, orientation).to_sitk(), str(path))
    return path.read_bytes()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deflated zip of ``{member name: content}``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def zip_folder(folder: Path, prefix: str = "series") -> bytes:
    """A zip of every file under ``folder`` (paths below ``prefix/``)."""
    return zip_bytes(
        {
            f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    )


def stage_nifti(staging: Path, data: bytes) -> tuple[Path, dict[str, Any]]:
    """A checked upload as ``uploads.prepare_study`` leaves it: ``staging/upload/study.nii.gz``.

    Args:
        staging: an empty folder (e.g. ``JobStore.new_staging_dir()``).
        data: the .nii.gz bytes (:func:`nifti_bytes`).

    Returns:
        ``(staging, input_info)``, ready for ``JobStore.create`` or ``JobWorkers.submit``.
    """
    (staging / "upload").mkdir()
    (staging / "upload" / "study.nii.gz").write_bytes(data)
    return staging, {"format": "nifti", "input_path": "upload/study.nii.gz", "n_files": 1}


def submit(client: Any, data: bytes, filename: str, headers: dict[str, str] | None = None):
    """POST a study; returns the response."""
    return client.post(
        f"{API_PREFIX}/studies",
        files={"file": (filename, data)},
        headers=AUTH if headers is None else headers,
    )


def wait_for(
    client: Any,
    job_id: str,
    statuses: Collection[str] = FINISHED,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll a job (as ``headers``' client, default :data:`AUTH`'s) until its status is one of
    ``statuses``; returns the job document."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{API_PREFIX}/jobs/{job_id}", headers=headers or AUTH).json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.02)
