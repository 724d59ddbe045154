"""A small DICOMweb client: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

:class:`DicomWebClient` speaks the three DICOMweb services a CAD node needs, against Orthanc's
DICOMweb plugin or any conforming server:

* QIDO-RS  ``GET  {base}/studies``, ``/studies/{uid}/series``  (search, DICOM JSON answers),
* WADO-RS  ``GET  {base}/studies/{uid}[/series/{uid}]`` (``multipart/related`` of
  ``application/dicom`` parts, parsed as a stream straight to files),
* STOW-RS  ``POST {base}/studies`` (``multipart/related`` upload).

Every request has a timeout and is retried on connection errors, timeouts and 5xx/429 answers
with exponential backoff and jitter (:class:`RetryPolicy`); when the server stays down the
caller gets one :class:`PacsUnavailableError` that says where, how often and why.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pydicom
from python_multipart.multipart import MultipartParser, parse_options_header

from lungcad.errors import InputError, MissingInputError

if TYPE_CHECKING:  # the callbacks' TypedDict exists for type checkers only
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

__all__ = [
    "DicomWebClient",
    "PacsError",
    "PacsUnavailableError",
    "RetryPolicy",
    "check_uid",
]

DICOM_JSON = "application/dicom+json"
#: Ask for the instances as stored (``transfer-syntax=*``), not transcoded by the server.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Answers worth retrying: the server is overloaded, restarting or timed out.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_STUDY_FIELDS = (
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "PatientID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_FIELDS = (
    "Modality",
    "SeriesDescription",
    "Manufacturer",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PacsError(RuntimeError):
    """The PACS answered, but with an error or an unusable answer (not worth retrying)."""


class PacsUnavailableError(PacsError):
    """The PACS could not be reached or kept failing (5xx) through every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a request.

    Attempt ``n`` (0-based) that fails is followed by a pause of ``d/2 + uniform(0, d/2)``
    seconds with ``d = min(max_delay_s, base_delay_s * 2**n)`` ("equal jitter": exponential
    growth, and many clients restarting together do not retry in lock step).

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


class _Retry(Exception):
    """Internal: an answer that should be retried (5xx, 429, 408)."""


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


class DicomWebClient:
    """DICOMweb (QIDO-RS, WADO-RS, STOW-RS) client with timeouts, auth and retries.

    Args:
        url: DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        username, password: HTTP basic authentication (both or neither).
        token: bearer token (instead of basic authentication).
        timeout_s: seconds allowed to connect and between bytes of an answer.
        retry: the :class:`RetryPolicy`.
        transport: an httpx transport (tests use ``httpx.MockTransport``).
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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
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
        headers = {"User-Agent": "lungcad-dicomweb"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url + "/",
            headers=headers,
            transport=transport,
            auth=(
                httpx.BasicAuth(username, password)
                if username is not None and password is not None  # both or neither (above)
                else None
            ),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            follow_redirects=False,
        )

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _with_retries(self, what: str, call: Callable[[], Any]) -> Any:
        """Run ``call`` (one HTTP exchange) until it succeeds or the retries are spent."""
        start = time.monotonic()
        for attempt in range(self.retry.attempts):
            try:
                return call()
            except (httpx.TransportError, _Retry) as exc:
                reason = _describe(exc)
                if attempt + 1 == self.retry.attempts:
                    raise PacsUnavailableError(
                        f"{what}: the PACS at {self.url} did not answer usefully after "
                        f"{self.retry.attempts} attempts over {time.monotonic() - start:.1f} s "
                        f"(last error: {reason}). Check that the PACS (Orthanc) is running and "
                        "that --pacs names its DICOMweb root."
                    ) from exc
                pause = self.retry.delay(attempt, self._rng)
                log.warning(
                    "%s: %s; retry %d/%d in %.2f s",
                    what,
                    reason,
                    attempt + 1,
                    self.retry.attempts - 1,
                    pause,
                )
                self._sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check(self, response: httpx.Response, what: str) -> None:
        """Raise for an error answer: _Retry for transient ones, PacsError for the rest."""
        status = response.status_code
        if status < 400:
            return
        if not response.is_closed:
            response.read()
        body = response.text[:300].strip()
        if status in RETRY_STATUS:
            raise _Retry(f"HTTP {status} {response.reason_phrase} {body}".strip())
        if status in (401, 403):
            raise PacsError(
                f"{what}: the PACS at {self.url} refused the credentials "
                f"(HTTP {status}); check --user/--password or --token"
            )
        if status == 404:
            raise PacsError(
                f"{what}: not found on the PACS at {self.url} (HTTP 404); check the "
                "UID and that --pacs names the DICOMweb root (e.g. .../dicom-web)"
            )
        raise PacsError(f"{what}: the PACS at {self.url} answered HTTP {status}: {body}")

    def _get_json(self, path: str, params: dict[str, Any], what: str) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            response = self._http.get(path, params=params, headers={"Accept": DICOM_JSON})
            self._check(response, what)
            if response.status_code == 204 or not response.content.strip():
                return []
            try:
                data = response.json()
            except json.JSONDecodeError as exc:
                raise PacsError(f"{what}: the PACS answered with invalid JSON: {exc}") from exc
            if not isinstance(data, list):
                raise PacsError(f"{what}: expected a JSON list of datasets; got {type(data)}")
            return data

        return self._with_retries(what, call)

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
        params: dict[str, Any] = {"includefield": ",".join(_STUDY_FIELDS)}
        if study_uid:
            params["StudyInstanceUID"] = study_uid
        if modality:
            params["ModalitiesInStudy"] = modality
        if patient_id:
            params["PatientID"] = patient_id
        if date_from is not None or date_to is not None:
            low = "" if date_from is None else _dicom_date(date_from, "--since")
            high = "" if date_to is None else _dicom_date(date_to, "--until")
            params["StudyDate"] = f"{low}-{high}"
        return self._paged("studies", params, page_size, "QIDO-RS study search")

    def search_series(
        self, study_uid: str, *, modality: str | None = None
    ) -> list[pydicom.Dataset]:
        """QIDO-RS series search within one study (Modality, SeriesDescription, Manufacturer,
        NumberOfSeriesRelatedInstances, ...)."""
        params: dict[str, Any] = {"includefield": ",".join(_SERIES_FIELDS)}
        if modality:
            params["Modality"] = modality
        return self._paged(
            f"studies/{check_uid(study_uid, 'study UID')}/series",
            params,
            1000,
            f"QIDO-RS series search in study {study_uid}",
        )

    def _paged(
        self, path: str, params: dict[str, Any], page_size: int, what: str
    ) -> list[pydicom.Dataset]:
        found: dict[str, pydicom.Dataset] = {}
        offset = 0
        while True:
            page = self._get_json(path, {**params, "limit": page_size, "offset": offset}, what)
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
        return self._retrieve(
            f"studies/{check_uid(study_uid, 'study UID')}",
            Path(out_dir),
            f"WADO-RS retrieve of study {study_uid}",
        )

    def retrieve_series(self, study_uid: str, series_uid: str, out_dir: str | Path) -> list[Path]:
        """WADO-RS: every instance of one series into ``out_dir`` (``<SOPInstanceUID>.dcm``)."""
        path = (
            f"studies/{check_uid(study_uid, 'study UID')}"
            f"/series/{check_uid(series_uid, 'series UID')}"
        )
        return self._retrieve(path, Path(out_dir), f"WADO-RS retrieve of series {series_uid}")

    def _retrieve(self, path: str, out_dir: Path, what: str) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)

        def call() -> list[Path]:
            sink = _PartSink(out_dir)
            try:
                with self._http.stream("GET", path, headers={"Accept": WADO_ACCEPT}) as response:
                    self._check(response, what)
                    kind, options = parse_options_header(response.headers.get("content-type"))
                    boundary = options.get(b"boundary")
                    if kind != b"multipart/related" or not boundary:
                        raise PacsError(
                            f"{what}: expected multipart/related with a boundary; "
                            f"got {response.headers.get('content-type')!r}"
                        )
                    parser = MultipartParser(boundary, sink.callbacks())
                    for chunk in response.iter_bytes():
                        parser.write(chunk)
                    parser.finalize()
                return sink.finish(what)
            except BaseException:
                sink.discard()  # a retry starts from scratch; nothing half-written stays
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
            PacsError: the PACS refused some instance (its reasons are in the message).
        """
        parts = []
        for f in files:
            f = Path(f)
            if not f.is_file():
                raise MissingInputError("DICOM file to store does not exist", f)
            parts.append(f.read_bytes())
        if not parts:
            return []
        boundary = f"lungcad-{random.getrandbits(64):016x}"
        body = (
            b"".join(
                b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n"
                b"Content-Length: " + str(len(p)).encode() + b"\r\n\r\n" + p + b"\r\n"
                for p in parts
            )
            + b"--"
            + boundary.encode()
            + b"--\r\n"
        )
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        path = f"studies/{check_uid(study_uid, 'study UID')}" if study_uid else "studies"
        what = f"STOW-RS store of {len(parts)} instance(s)"

        def call() -> dict[str, Any]:
            response = self._http.post(
                path, content=body, headers={"Content-Type": content_type, "Accept": DICOM_JSON}
            )
            if response.status_code != 409:  # 409: all failed, and the body says why
                self._check(response, what)
            if not response.content.strip():
                return {}
            try:
                answer = response.json()
            except json.JSONDecodeError as exc:
                raise PacsError(
                    f"{what}: the PACS answered HTTP {response.status_code} with "
                    f"invalid JSON: {response.text[:200]!r}"
                ) from exc
            return answer if isinstance(answer, dict) else {}

        return _stow_outcome(self._with_retries(what, call), what)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def _stow_outcome(answer: dict[str, Any], what: str) -> list[str]:
    """SOPInstanceUIDs stored, from a STOW-RS answer; PacsError when any instance failed."""
    ds = pydicom.Dataset.from_json(answer) if answer else pydicom.Dataset()
    failed = ds.get("FailedSOPSequence") or []
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')} (reason {item.get('FailureReason', '?')})"
            for item in failed
        )
        raise PacsError(f"{what}: the PACS refused {len(failed)} instance(s): {reasons}")
    return [
        str(item.ReferencedSOPInstanceUID)
        for item in ds.get("ReferencedSOPSequence") or []
        if "ReferencedSOPInstanceUID" in item
    ]


class _PartSink:
    """Streams the parts of a WADO-RS answer to files, then names them by SOPInstanceUID."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.paths: list[Path] = []
        self._file: Any = None
        self._header = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_headers_finished": self._open,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers, self._header = {}, b""

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        key = self._header.strip().lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _open(self) -> None:
        self._header = b""
        kind = parse_options_header(self._headers.get(b"content-type", b""))[0]
        if kind not in (b"application/dicom", b""):
            log.warning("WADO-RS: skipping a part of type %s", kind.decode(errors="replace"))
            return
        path = self.out_dir / f".part{len(self.paths):05d}.tmp"
        self.paths.append(path)
        self._file = path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, what: str) -> list[Path]:
        """Rename the parts to ``<SOPInstanceUID>.dcm`` after checking each is DICOM."""
        final = []
        for path in self.paths:
            try:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            except Exception as exc:
                self.discard()
                raise PacsError(
                    f"{what}: a part of the answer is not a DICOM instance ({exc})"
                ) from exc
            final.append(path.replace(self.out_dir / f"{uid}.dcm"))
        self.paths = []
        return final

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths = []
