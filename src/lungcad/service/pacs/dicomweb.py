"""lungcad's DICOMweb client: QIDO-RS search, WADO-RS retrieve, STOW-RS store, with retries.

:class:`DicomWebClient` speaks the three DICOMweb services a CAD node needs, against Orthanc's
DICOMweb plugin or any conforming server. The protocol is the field's client library,
`dicomweb-client <https://github.com/ImagingDataCommons/dicomweb-client>`_ (URLs, query
strings, ``multipart/related`` encoding and streamed decoding); the retries are
`tenacity <https://tenacity.readthedocs.io>`_'s. What lungcad adds around them:

* typed errors: :class:`PacsUnavailableError` (down or overloaded, worth retrying later) and
  :class:`PacsError` (refused: credentials, not found, a STOW failure with each instance's
  reason), with a message that says where, how often and what to check;
* a retry policy that covers connection errors and timeouts as well as 408/429/5xx answers,
  with exponential back-off and jitter (:class:`RetryPolicy`), each retry logged; the
  library's own retrying (status codes only, no jitter, silent) is switched off;
* WADO-RS straight into files named by SOPInstanceUID, nothing half-written on failure;
* UIDs checked before they go into a request path (:func:`check_uid`).

``docs/dependencies.md`` says what the two libraries do not do that lungcad needs.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_attempt

from lungcad.errors import InputError, MissingInputError
from lungcad.service.redact import redact

log = logging.getLogger(__name__)

__all__ = [
    "DicomWebClient",
    "PacsError",
    "PacsUnavailableError",
    "RetryPolicy",
    "check_uid",
]

#: Retrieve instances as stored (``transfer-syntax=*``), not transcoded by the server.
WADO_MEDIA_TYPES = (("application/dicom", "*"),)
#: Answers worth retrying: the server is overloaded, restarting or timed out.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_STUDY_FIELDS = [
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "PatientID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
_SERIES_FIELDS = [
    "Modality",
    "SeriesDescription",
    "Manufacturer",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
]
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
T = TypeVar("T")


class PacsError(RuntimeError):
    """The PACS answered, but with an error or an unusable answer (not worth retrying)."""


class PacsUnavailableError(PacsError):
    """The PACS could not be reached or kept failing (5xx) through every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a request.

    Attempt ``n`` (0-based) that fails is followed by a pause of ``d/2 + uniform(0, d/2)``
    seconds with ``d = min(max_delay_s, base_delay_s * 2**n)`` ("equal jitter": exponential
    growth, and many clients restarting together do not retry in lock step). tenacity's
    ``wait_exponential_jitter`` adds its jitter on top of the cap instead, so the policy is
    this one function, given to tenacity as its wait.

    Attributes:
        attempts: tries in all (>= 1).
        base_delay_s: first pause before jitter, in seconds.
        max_delay_s: cap on any one pause.
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise InputError(
                f"retry policy needs attempts >= 1 and delays >= 0; got {self}", "--retries"
            )

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Pause in seconds after failed attempt ``attempt`` (0-based)."""
        d = min(self.max_delay_s, self.base_delay_s * 2.0**attempt)
        return d / 2 + rng.uniform(0.0, d / 2)


def _dicom_date(value: _dt.date | str, name: str) -> str:
    if isinstance(value, _dt.date):
        return value.strftime("%Y%m%d")
    text = str(value).replace("-", "")
    try:
        _dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise InputError(
            f"expected a date as YYYYMMDD or YYYY-MM-DD; got {value!r}", name
        ) from None
    return text


def check_uid(uid: str, name: str = "--study") -> str:
    """``uid`` when it is a DICOM UID (digits and dots, at most 64 characters; it goes into
    request paths), else InputError."""
    if not (isinstance(uid, str) and _UID.match(uid) and len(uid) <= 64):
        raise InputError(f"not a DICOM UID (digits and dots, at most 64 characters): {uid!r}", name)
    return uid


def _transient(exc: BaseException) -> bool:
    """Worth another attempt: no connection, a timeout, or a 408/429/5xx answer."""
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code in RETRY_STATUS
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed ({exc})"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        return f"HTTP {r.status_code} {r.reason or ''} {r.text[:300].strip()}".strip()
    return str(exc) or type(exc).__name__


class DicomWebClient:
    """DICOMweb (QIDO-RS, WADO-RS, STOW-RS) client with timeouts, auth and retries.

    Args:
        url: DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        username, password: HTTP basic authentication (both or neither).
        token: bearer token (instead of basic authentication).
        timeout_s: seconds allowed to read an answer (connecting: at most 10 s of it).
        retry: the :class:`RetryPolicy`.
        session: the ``requests.Session`` to use (tests mount a fake adapter on one).
        sleep: the pause function (tests pass a recorder).
        seed: seed of the jitter's random numbers (None: unpredictable).

    Raises:
        InputError: a malformed URL or contradictory credentials.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        match = re.fullmatch(r"(https?)://([^/:]+)(:\d+)?(/.*)?", url)
        if match is None:
            raise InputError(
                f"expected a DICOMweb URL like http://127.0.0.1:8042/dicom-web; got {url!r}",
                "--pacs",
            )
        if (username is None) != (password is None):
            raise InputError("give both a user name and a password, or neither", "--user")
        if token and username is not None:
            raise InputError(
                "choose basic authentication (--user/--password) or a bearer "
                "token (--token), not both",
                "--token",
            )
        if timeout_s <= 0:
            raise InputError(f"timeout must be > 0 seconds; got {timeout_s}", "--timeout")
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = "lungcad-dicomweb"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        if username is not None and password is not None:
            self._session.auth = (username, password)
        self._web = DICOMwebClient(
            self.url, session=self._session, timeout=(min(timeout_s, 10.0), timeout_s)
        )
        self._web.set_http_retry_params(retry=False)  # tenacity retries, see _with_retries

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._session.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call`` (one exchange with the PACS) until it succeeds or the retries are
        spent; answers that are not worth retrying become :class:`PacsError` at once."""
        start = time.monotonic()

        def checked() -> T:
            try:
                return call()
            except requests.HTTPError as exc:
                if _transient(exc):
                    raise
                raise self._refusal(exc, what) from exc
            except InputError:
                raise
            except ValueError as exc:  # dicomweb-client: not multipart, bad JSON, ...
                raise PacsError(f"{what}: the PACS sent an unusable answer: {exc}") from exc

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(  # redacted: ``what`` names the study or series by its UID
                "%s: %s; retry %d/%d in %.2f s",
                redact(what),
                redact(_describe(exc) if exc else "?"),
                state.attempt_number,
                self.retry.attempts - 1,
                state.next_action.sleep if state.next_action else 0.0,
            )

        retrying = Retrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=lambda state: self.retry.delay(state.attempt_number - 1, self._rng),
            retry=retry_if_exception(_transient),
            sleep=self._sleep,
            before_sleep=before_sleep,
        )
        try:
            return retrying(checked)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise PacsUnavailableError(
                f"{what}: the PACS at {self.url} did not answer usefully after "
                f"{self.retry.attempts} attempts over {time.monotonic() - start:.1f} s "
                f"(last error: {_describe(last) if last else '?'}). Check that the PACS "
                "(Orthanc) is running and that --pacs names its DICOMweb root."
            ) from last

    def _refusal(self, exc: requests.HTTPError, what: str) -> PacsError:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            return PacsError(
                f"{what}: the PACS at {self.url} refused the credentials "
                f"(HTTP {status}); check --user/--password or --token"
            )
        if status == 404:
            return PacsError(
                f"{what}: not found on the PACS at {self.url} (HTTP 404); check the "
                "UID and that --pacs names the DICOMweb root (e.g. .../dicom-web)"
            )
        return PacsError(f"{what}: the PACS at {self.url} answered {_describe(exc)}")

    # -- QIDO-RS ----------------------------------------------------------------------------

    def search_studies(
        self,
        *,
        study_uid: str | None = None,
        modality: str | None = None,
        date_from: _dt.date | str | None = None,
        date_to: _dt.date | str | None = None,
        patient_id: str | None = None,
        page_size: int = 100,
    ) -> list[pydicom.Dataset]:
        """QIDO-RS study search; all pages are fetched.

        Args:
            study_uid: match one StudyInstanceUID.
            modality: match ModalitiesInStudy (e.g. ``"CT"``).
            date_from, date_to: inclusive StudyDate range (``date`` or ``YYYYMMDD``); either
                end may be open.
            patient_id: match PatientID.
            page_size: studies per request (``limit``/``offset`` paging).

        Returns:
            One pydicom Dataset per study (StudyInstanceUID, StudyDate, ModalitiesInStudy,
            NumberOfStudyRelatedInstances, ...).
        """
        filters: dict[str, Any] = {}
        if study_uid:
            filters["StudyInstanceUID"] = check_uid(study_uid, "study UID")
        if modality:
            filters["ModalitiesInStudy"] = modality
        if patient_id:
            filters["PatientID"] = patient_id
        if date_from is not None or date_to is not None:
            low = "" if date_from is None else _dicom_date(date_from, "--since")
            high = "" if date_to is None else _dicom_date(date_to, "--until")
            filters["StudyDate"] = f"{low}-{high}"
        return self._paged(
            lambda limit, offset: self._web.search_for_studies(
                fields=_STUDY_FIELDS, search_filters=filters, limit=limit, offset=offset
            ),
            page_size,
            "QIDO-RS study search",
        )

    def search_series(
        self, study_uid: str, *, modality: str | None = None
    ) -> list[pydicom.Dataset]:
        """QIDO-RS series search within one study (Modality, SeriesDescription, Manufacturer,
        NumberOfSeriesRelatedInstances, ...)."""
        uid = check_uid(study_uid, "study UID")
        filters = {"Modality": modality} if modality else {}
        return self._paged(
            lambda limit, offset: self._web.search_for_series(
                study_instance_uid=uid,
                fields=_SERIES_FIELDS,
                search_filters=filters,
                limit=limit,
                offset=offset,
            ),
            1000,
            f"QIDO-RS series search in study {study_uid}",
        )

    def _paged(
        self, search: Callable[[int, int], Any], page_size: int, what: str
    ) -> list[pydicom.Dataset]:
        """Every page of a search (dicomweb-client's ``get_remaining`` would ask once more for
        an empty page and keep duplicates a paging server repeats)."""
        found: dict[str, pydicom.Dataset] = {}
        offset = 0
        while True:
            page = self._with_retries(what, partial(search, page_size, offset))
            if not isinstance(page, list):
                raise PacsError(f"{what}: expected a JSON list of datasets; got {type(page)}")
            for item in page:
                ds = pydicom.Dataset.from_json(item)
                key = str(ds.get("SeriesInstanceUID") or ds.get("StudyInstanceUID") or len(found))
                found.setdefault(key, ds)
            if len(page) < page_size:
                return list(found.values())
            offset += len(page)

    # -- WADO-RS ----------------------------------------------------------------------------

    def retrieve_study(self, study_uid: str, out_dir: str | Path) -> list[Path]:
        """WADO-RS: every instance of a study into ``out_dir`` (``<SOPInstanceUID>.dcm``)."""
        uid = check_uid(study_uid, "study UID")
        return self._retrieve(
            lambda: self._web.iter_study(uid, media_types=WADO_MEDIA_TYPES),
            Path(out_dir),
            f"WADO-RS retrieve of study {study_uid}",
        )

    def retrieve_series(self, study_uid: str, series_uid: str, out_dir: str | Path) -> list[Path]:
        """WADO-RS: every instance of one series into ``out_dir`` (``<SOPInstanceUID>.dcm``)."""
        study, series = check_uid(study_uid, "study UID"), check_uid(series_uid, "series UID")
        return self._retrieve(
            lambda: self._web.iter_series(study, series, media_types=WADO_MEDIA_TYPES),
            Path(out_dir),
            f"WADO-RS retrieve of series {series_uid}",
        )

    def _retrieve(
        self, instances: Callable[[], Iterable[pydicom.Dataset]], out_dir: Path, what: str
    ) -> list[Path]:
        """Write each streamed instance as it comes (one in memory at a time); a failed or
        retried attempt removes what it wrote."""
        out_dir.mkdir(parents=True, exist_ok=True)

        def call() -> list[Path]:
            written: list[Path] = []
            try:
                for ds in instances():
                    uid = ds.get("SOPInstanceUID")
                    if not uid:
                        raise PacsError(f"{what}: a part of the answer is not a DICOM instance")
                    path = out_dir / f".part{len(written):05d}.tmp"
                    written.append(path)
                    ds.save_as(path, enforce_file_format=True)
                    written[-1] = path.replace(out_dir / f"{check_uid(str(uid), 'SOP UID')}.dcm")
                return written
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise

        return self._with_retries(what, call)

    # -- STOW-RS ----------------------------------------------------------------------------

    def store(self, files: Sequence[str | Path], study_uid: str | None = None) -> list[str]:
        """STOW-RS: send DICOM files (e.g. seg.dcm, sr.dcm) in one request.

        Re-sending an instance the PACS already holds is harmless (same SOPInstanceUID: the
        server keeps one copy), which is what makes a retried round trip safe.

        Args:
            files: DICOM Part 10 files; they are read into memory (meant for result objects).
            study_uid: post to ``/studies/{uid}`` so the server checks they belong to it.

        Returns:
            The SOPInstanceUIDs the PACS reports as stored.

        Raises:
            MissingInputError: a file does not exist.
            InputError: a file is not DICOM.
            PacsError: the PACS refused some instance (its reasons are in the message).
        """
        datasets = []
        for f in map(Path, files):
            if not f.is_file():
                raise MissingInputError("DICOM file to store does not exist", f)
            try:
                datasets.append(pydicom.dcmread(f))
            except pydicom.errors.InvalidDicomError as exc:
                raise InputError(f"not a DICOM file; cannot store it ({exc})", f) from exc
        if not datasets:
            return []
        uid = check_uid(study_uid, "study UID") if study_uid else None
        what = f"STOW-RS store of {len(datasets)} instance(s)"

        def call() -> pydicom.Dataset:
            try:
                return self._web.store_instances(datasets, study_instance_uid=uid)
            except requests.HTTPError as exc:
                # 409: every instance failed, and the answer says why (FailedSOPSequence).
                if exc.response is not None and exc.response.status_code == 409:
                    try:
                        return pydicom.Dataset.from_json(exc.response.json())
                    except ValueError:
                        pass
                raise

        return _stow_outcome(self._with_retries(what, call), what)


def _stow_outcome(answer: pydicom.Dataset, what: str) -> list[str]:
    """SOPInstanceUIDs stored, from a STOW-RS answer; PacsError when any instance failed."""
    failed = answer.get("FailedSOPSequence") or []
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')} (reason {item.get('FailureReason', '?')})"
            for item in failed
        )
        raise PacsError(f"{what}: the PACS refused {len(failed)} instance(s): {reasons}")
    return [
        str(item.ReferencedSOPInstanceUID)
        for item in answer.get("ReferencedSOPSequence") or []
        if "ReferencedSOPInstanceUID" in item
    ]
