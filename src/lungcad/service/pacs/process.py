"""The PACS round trip: fetch a CT study by DICOMweb, predict, store DICOM SEG + SR back.

:func:`process_study` is one study's round trip with a
:class:`~lungcad.service.pacs.dicomweb.DicomWebClient` (import the client and its errors from
:mod:`lungcad.service.pacs.dicomweb`); the ledger of processed studies and the polling round
live in :mod:`lungcad.service.pacs.watch`, the command in ``lungcad watch``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from lungcad.errors import InputError
from lungcad.io.atomic import atomic_dir
from lungcad.service.pacs.dicomweb import (
    DicomWebClient,
    PacsError,
)

if TYPE_CHECKING:
    from lungcad.inference.predictor import Predictor

log = logging.getLogger(__name__)

__all__ = [
    "PacsStudyResult",
    "candidate_studies",
    "instance_count",
    "is_lungcad_output",
    "lungcad_output_series",
    "process_study",
]

#: Manufacturer that lungcad writes into its SEG and SR objects.
LUNGCAD_MANUFACTURER = "lungcad"
OUTPUT_MODALITIES = ("SEG", "SR", "KO")
#: The DICOM results lungcad stores back, when written (no SEG without a lesion, no KOS
#: without a key image).
DICOM_OUTPUTS = ("seg.dcm", "sr.dcm", "ko.dcm")


def is_lungcad_output(series: pydicom.Dataset) -> bool:
    """True for a SEG, SR or KO series that lungcad wrote (by Manufacturer or SeriesDescription)."""
    if str(series.get("Modality", "")).upper() not in OUTPUT_MODALITIES:
        return False
    manufacturer = str(series.get("Manufacturer", "")).strip().lower()
    description = str(series.get("SeriesDescription", "")).strip().lower()
    return manufacturer == LUNGCAD_MANUFACTURER or description.startswith("lungcad ")


@dataclass
class PacsStudyResult:
    """What :func:`process_study` did for one study.

    Attributes:
        study_uid: the StudyInstanceUID.
        series_uid: the CT series that was read and analysed.
        study_probability: cancer probability of the study; None without a decision.
        is_cancer: the decision (probability >= the run's threshold); None without one.
        n_lesions: lesions found.
        outputs: output name -> local path (``findings.json``, ``seg.dcm``, ``sr.dcm``, ...).
        stored: SOPInstanceUIDs the PACS acknowledged (the SEG and the SR).
        reused_outputs: True when an earlier interrupted attempt's outputs were sent again
            rather than predicted anew (same UIDs, so the PACS holds no duplicates).
        status: the finding's status (:mod:`lungcad.finding`: "cancer suspected", "no
            cancer suspected", "cannot assess", "no classifier").
        reason: why there is no decision (None with one).
    """

    study_uid: str
    series_uid: str
    study_probability: float | None
    is_cancer: bool | None
    n_lesions: int
    outputs: dict[str, Path] = field(default_factory=dict)
    stored: list[str] = field(default_factory=list)
    reused_outputs: bool = False
    status: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the outputs by name, without the server's paths)."""
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "study_probability": self.study_probability,
            "is_cancer": self.is_cancer,
            "status": self.status,
            "reason": self.reason,
            "n_lesions": self.n_lesions,
            "stored": list(self.stored),
            "reused_outputs": self.reused_outputs,
            "outputs": sorted(self.outputs),  # names: the local paths are the server's
        }


def _fetch_ct(client: DicomWebClient, study_uid: str, images: Path) -> None:
    """The study's CT series into ``images`` (complete or absent: atomic folder)."""
    series = [
        s
        for s in client.search_series(study_uid, modality="CT")
        if str(s.get("Modality", "CT")).upper() == "CT"
    ]
    if not series:
        raise InputError(
            "the study holds no CT series on the PACS; lungcad analyses chest CT",
            f"study {study_uid}",
        )
    with atomic_dir(images) as tmp:
        for s in series:
            client.retrieve_series(study_uid, str(s.SeriesInstanceUID), tmp)


def _complete_outputs(out_dir: Path) -> dict[str, Path] | None:
    names = ("findings.json", "sr.dcm")  # the folder is written atomically: all or nothing
    if all((out_dir / n).is_file() for n in names):
        return {p.name: p for p in sorted(out_dir.iterdir()) if p.is_file()}
    return None


def process_study(
    client: DicomWebClient, predictor: Predictor, study_uid: str, work_dir: str | Path
) -> PacsStudyResult:
    """Fetch a study's CT, predict, write the outputs, and store the SEG, SR and KOS back.

    Steps, each resumable so a crash or PACS outage never loses work nor duplicates it:

    1. WADO-RS the study's CT series into ``work_dir/dicom`` (reused when already complete);
    2. read it (``lungcad.io.read_image`` picks the CT series with most slices) and predict;
    3. ``write_study_outputs`` into ``work_dir/outputs`` (written atomically; when a complete
       earlier result is there, it is sent again instead, keeping its SOPInstanceUIDs);
    4. STOW-RS ``seg.dcm`` (when there are lesions), ``sr.dcm`` and ``ko.dcm`` into the study.

    Args:
        client: the PACS.
        predictor: a :class:`lungcad.inference.predictor.Predictor` (anything with
        ``predict_volume``).
        study_uid: StudyInstanceUID on the PACS.
        work_dir: this study's working folder (created).

    Returns:
        The :class:`PacsStudyResult`.

    Raises:
        PacsUnavailableError: the PACS could not be reached (worth retrying later).
        PacsError: the PACS refused a request.
        InputError: the study has no usable CT series.
    """
    from lungcad.inference.outputs import write_study_outputs
    from lungcad.io import read_image

    work_dir = Path(work_dir)
    images, out_dir = work_dir / "dicom", work_dir / "outputs"
    outputs = _complete_outputs(out_dir)
    reused = outputs is not None
    if outputs is None:
        if not images.is_dir():
            _fetch_ct(client, study_uid, images)
        volume = read_image(images)
        if volume.meta.get("study_instance_uid") not in (None, study_uid):
            raise PacsError(
                f"the PACS sent study {volume.meta['study_instance_uid']} when "
                f"asked for {study_uid}"
            )
        result = predictor.predict_volume(volume)
        outputs = write_study_outputs(volume, result, out_dir)
        if "sr.dcm" not in outputs:
            raise InputError(
                "no DICOM SR was written for this study (the input was not read as DICOM)",
                images,
            )
    else:
        # No UID in the line (the watcher logs the study's tag): a UID identifies a patient.
        log.info("sending the outputs of an earlier attempt again")
    stored = client.store([outputs[n] for n in DICOM_OUTPUTS if n in outputs], study_uid=study_uid)
    doc = json.loads(outputs["findings.json"].read_text(encoding="utf-8"))
    shutil.rmtree(images, ignore_errors=True)  # the images stay on the PACS; keep no copy
    return PacsStudyResult(
        study_uid=study_uid,
        series_uid=str(doc["input"].get("series_instance_uid")),
        study_probability=doc["study"].get("probability"),
        is_cancer=doc["study"].get("is_cancer"),
        n_lesions=int(doc["study"]["n_lesions"]),
        outputs=outputs,
        stored=stored,
        reused_outputs=reused,
        status=doc["study"].get("status"),
        reason=doc["study"].get("reason"),
    )


def lungcad_output_series(client: DicomWebClient, study_uid: str) -> list[pydicom.Dataset]:
    """The SEG/SR/KO series in a study that lungcad wrote (see :func:`is_lungcad_output`)."""
    return [s for s in client.search_series(study_uid) if is_lungcad_output(s)]


def candidate_studies(studies: Iterable[pydicom.Dataset]) -> list[str]:
    """StudyInstanceUIDs of studies that hold CT (not only SEG/SR or other modalities)."""
    uids = []
    for study in studies:
        modalities = study.get("ModalitiesInStudy") or []
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        if "CT" in {str(m).upper() for m in modalities} and "StudyInstanceUID" in study:
            uids.append(str(study.StudyInstanceUID))
    return uids


def instance_count(study: pydicom.Dataset) -> int | None:
    """A QIDO study result's NumberOfStudyRelatedInstances (0020,1208), or None when the PACS
    did not return it (or returned something that is not a number)."""
    value = study.get("NumberOfStudyRelatedInstances")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
