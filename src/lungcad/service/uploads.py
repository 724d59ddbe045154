"""Receiving a study upload safely: streamed to disk with limits, unpacked, checked.

A study arrives as ``multipart/form-data`` with one field ``file``: a ``.zip`` of one DICOM
series, or a ``.nii``/``.nii.gz`` file. Everything that could exhaust the disk is bounded while
the bytes flow, not after:

* the request body is parsed as it streams (:func:`receive_upload`, python-multipart's push
  parser) and refused with 413 the moment it passes ``max_upload_bytes`` (a declared
  ``Content-Length`` above the limit is refused before a byte is read);
* a zip is unpacked member by member (:func:`extract_zip`) with its member count bounded
  (``max_files``) and every byte written counted against ``max_unpacked_bytes`` (the sizes a
  zip declares can lie; a "zip bomb" stops at the limit). Member paths are resolved inside the
  destination (no ``..``, absolute paths, drive letters or symlinks: "zip slip");
* a NIfTI's header is read (nibabel reads only the first bytes, even of a ``.gz``) and the
  voxel data size it declares is bounded the same way.

Cheap validation happens before a job is queued, so a bad upload gets an immediate 400 that
says what is wrong: a corrupt zip, no DICOM image in it, a series that is not CT (the message
of ``lungcad.io.read_image``, which refuses non-CT from the headers alone, before decoding any
pixel), or an unreadable NIfTI header. Reading the pixels is left to the job.

Messages never repeat the client's file names or the server's paths (a zip's members are
named by their number, ``member 3 of the zip``; a reader's message has the upload's folder and
everything below it replaced by ``upload``: ``lungcad.service.redact``): file names of DICOM
exports often hold the patient's name.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from lungcad.service.redact import names_under, redact

if TYPE_CHECKING:  # the callbacks' TypedDict exists for type checkers only
    from python_multipart.multipart import MultipartCallbacks

__all__ = [
    "StagedUpload",
    "UploadRejected",
    "extract_zip",
    "prepare_study",
    "receive_upload",
]

UPLOAD_FILE = "upload.bin"
CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"


class UploadRejected(Exception):
    """An upload refused with an HTTP status, a message for the user and an audit category.

    Args:
        status_code: 400 (bad input) or 413 (too large / too many files).
        message: what is wrong, what was expected and how to fix it.
        reason: category for the audit log (``lungcad.service.audit.REASONS``).
    """

    def __init__(self, status_code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.reason = reason


@dataclass
class StagedUpload:
    """A received upload: ``folder/upload.bin`` plus the client's file name (for its suffix)."""

    folder: Path
    filename: str
    size: int

    @property
    def path(self) -> Path:
        """The raw uploaded bytes."""
        return self.folder / UPLOAD_FILE


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


class _FileSink:
    """python-multipart callbacks writing the part named ``file`` into ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filename: str | None = None
        self.size = 0
        self._fh: Any = None
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._writing = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file" or self.filename is not None:
            return  # other fields (and a second "file") are read past, not stored
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self._fh = self.path.open("wb")
        self._writing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writing:
            self._fh.write(data[start:end])
            self.size += end - start

    def _part_end(self) -> None:
        if self._writing:
            self._fh.close()
            self._writing = False

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


async def receive_upload(
    headers: dict[str, str], body: AsyncIterable[bytes], folder: Path, max_upload_bytes: int
) -> StagedUpload:
    """Stream a multipart body's ``file`` field to ``folder/upload.bin``, within limits.

    Args:
        headers: the request headers (lower-case names).
        body: the request body chunks (``Request.stream()``).
        folder: an empty staging folder.
        max_upload_bytes: the largest body accepted.

    Returns:
        The staged upload.

    Raises:
        UploadRejected: 413 when the body passes the limit (declared or counted), 400 for a
            body that is not multipart or has no ``file`` field.
    """
    limit_text = f"the upload limit is {_mb(max_upload_bytes)}"
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
        raise UploadRejected(
            413,
            f"upload of {_mb(int(declared))} is too large; {limit_text}. "
            "Send one series at a time, or ask the administrator to raise "
            "--max-upload-mb",
            "too_large",
        )
    ctype, options = parse_options_header(headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadRejected(
            400,
            "expected a multipart/form-data request with a field named "
            "'file' (e.g. `curl -F file=@study.zip ...`)",
            "bad_request",
        )
    sink = _FileSink(folder / UPLOAD_FILE)
    parser = MultipartParser(boundary, sink.callbacks())
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_upload_bytes:
                raise UploadRejected(
                    413,
                    f"upload is too large (over {_mb(max_upload_bytes)}); {limit_text}",
                    "too_large",
                )
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadRejected(
            400, f"malformed multipart body ({redact(str(exc))})", "bad_request"
        ) from exc
    finally:
        sink.close()
    if sink.filename is None:
        raise UploadRejected(
            400,
            "the request has no field named 'file'; send the study as multipart field 'file'",
            "bad_request",
        )
    return StagedUpload(folder, sink.filename, sink.size)


def _member_path(name: str, label: str) -> PurePosixPath:
    """A zip member name as a safe relative path, or UploadRejected (zip slip).

    ``label`` names the member in the message (``member 3 of the zip``), never its name.
    """
    path = PurePosixPath(name.replace("\\", "/"))
    parts = path.parts
    if (
        not parts
        or path.is_absolute()
        or ".." in parts
        or ":" in parts[0]
        or any("\0" in p for p in parts)
    ):
        raise UploadRejected(
            400,
            f"unsafe path in the zip ({label}): members must be relative paths inside the archive",
            "corrupt",
        )
    return PurePosixPath(*[p for p in parts if p != "."])


def extract_zip(archive: Path, dest: Path, *, max_files: int, max_unpacked_bytes: int) -> int:
    """Unpack ``archive`` into ``dest`` safely (see the module notes); returns the file count.

    Raises:
        UploadRejected: 400 for a corrupt, encrypted or empty archive or an unsafe member path;
            413 for too many members or too many unpacked bytes.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UploadRejected(
            400,
            f"the upload is not a valid zip archive ({redact(str(exc))}); zip the "
            "series folder again (e.g. `zip -r study.zip SERIES/`)",
            "corrupt",
        ) from exc
    dest = dest.resolve()
    written = 0
    with zf:
        members = [
            m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
        ]
        if not members:
            raise UploadRejected(
                400, "the zip holds no files; expected the DICOM files of one CT series", "corrupt"
            )
        if len(members) > max_files:
            raise UploadRejected(
                413,
                f"the zip holds {len(members)} files; the limit is "
                f"{max_files}. Send one series per upload",
                "too_many_files",
            )
        declared = sum(m.file_size for m in members)
        if declared > max_unpacked_bytes:
            raise UploadRejected(
                413,
                f"the zip unpacks to {_mb(declared)}; the limit is {_mb(max_unpacked_bytes)}",
                "too_large",
            )
        for number, member in enumerate(members, start=1):
            label = f"member {number} of the zip"
            if member.flag_bits & 0x1:
                raise UploadRejected(
                    400, f"{label} is encrypted; upload an unencrypted zip", "corrupt"
                )
            if stat.S_ISLNK(member.external_attr >> 16):
                raise UploadRejected(
                    400,
                    f"{label} is a symbolic link; links are not accepted in uploads",
                    "corrupt",
                )
            target = dest.joinpath(_member_path(member.filename, label))
            if not target.resolve().is_relative_to(dest):
                raise UploadRejected(400, f"unsafe path in the zip ({label})", "corrupt")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, target.open("xb") as out:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > max_unpacked_bytes:
                            raise UploadRejected(
                                413,
                                f"the zip unpacks to more than {_mb(max_unpacked_bytes)} "
                                "(more than its directory declares)",
                                "too_large",
                            )
                        out.write(chunk)
            except FileExistsError as exc:
                raise UploadRejected(
                    400, f"the zip holds the path of {label} twice", "corrupt"
                ) from exc
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
                raise UploadRejected(
                    400,
                    f"the zip is corrupt: {label} cannot be "
                    f"unpacked ({redact(str(exc), {dest: 'upload'})}); zip the series again",
                    "corrupt",
                ) from exc
    return len(members)


def _kind(upload: StagedUpload) -> str:
    """ "zip", "nii.gz" or "nii", from the file's first bytes, then its name."""
    with upload.path.open("rb") as fh:
        head = fh.read(352)
    name = upload.filename.lower()
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if head[:2] == _GZIP_MAGIC and (name.endswith((".nii.gz", ".gz")) or not name):
        return "nii.gz"
    if head[344:348] in (b"n+1\0", b"ni1\0") or name.endswith(".nii"):
        return "nii"
    if name.endswith(".zip"):
        return "zip"  # not a zip inside: extract_zip reports it as corrupt
    if name.endswith(".nii.gz"):
        return "nii.gz"
    raise UploadRejected(
        400,
        "unsupported upload: expected a .zip of one DICOM series or a .nii/.nii.gz file "
        "(neither the file's name nor its first bytes say it is one)",
        "bad_request",
    )


def _check_dicom(folder: Path) -> None:
    from lungcad.io import read_image
    from lungcad.io.dicom import list_dicom_series

    try:
        series = list_dicom_series(folder)  # headers only
    except (ValueError, FileNotFoundError) as exc:
        raise UploadRejected(
            400, redact(str(exc), {folder: "upload"}, names_under(folder)), "corrupt"
        ) from exc
    if any(s.modality == "CT" for s in series):
        return
    try:
        read_image(folder)  # refuses non-CT from the headers, with the reader's own message
    except (ValueError, FileNotFoundError) as exc:
        raise UploadRejected(
            400, redact(str(exc), {folder: "upload"}, names_under(folder)), "not_ct"
        ) from exc
    found = ", ".join(sorted({s.modality for s in series}))
    raise UploadRejected(400, f"no CT series in the upload (found {found})", "not_ct")


def _check_nifti(path: Path, max_unpacked_bytes: int) -> None:
    import nibabel as nib

    try:
        header = nib.load(path).header  # reads the header only (also for .nii.gz)
        if not isinstance(header, nib.Nifti1Header):  # a NIfTI-2 header is one as well
            raise ValueError(f"{type(header).__name__} is not a NIfTI header")
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise UploadRejected(
            400,
            f"the upload is not a readable NIfTI file ({redact(str(exc), {path: 'upload'})})",
            "corrupt",
        ) from exc
    if len([s for s in shape if s > 1]) > 3 or len(shape) < 2:
        raise UploadRejected(
            400, f"the NIfTI image has shape {shape}; expected one 3D CT volume", "corrupt"
        )
    n_bytes = itemsize
    for s in shape:
        n_bytes *= s
    if n_bytes > max_unpacked_bytes:
        raise UploadRejected(
            413,
            f"the NIfTI image holds {_mb(n_bytes)} of voxels; the limit "
            f"is {_mb(max_unpacked_bytes)}",
            "too_large",
        )


def prepare_study(upload: StagedUpload, *, max_files: int, max_unpacked_bytes: int) -> dict:
    """Unpack and check a staged upload into ``folder/upload/``; drop the raw bytes.

    Args:
        upload: from :func:`receive_upload`.
        max_files: most files a zip may hold.
        max_unpacked_bytes: most bytes a zip may unpack to / a NIfTI may declare.

    Returns:
        ``{"format": "dicom"|"nifti", "input_path": path relative to the job folder,
        "n_files": int}``.

    Raises:
        UploadRejected: see :func:`extract_zip`; 400 for a non-CT or unreadable series or an
            unreadable NIfTI header.
    """
    kind = _kind(upload)
    target = upload.folder / "upload"
    target.mkdir()
    if kind == "zip":
        series = target / "dicom"
        series.mkdir()
        n_files = extract_zip(
            upload.path, series, max_files=max_files, max_unpacked_bytes=max_unpacked_bytes
        )
        upload.path.unlink()
        _check_dicom(series)
        return {"format": "dicom", "input_path": "upload/dicom", "n_files": n_files}
    name = "study.nii.gz" if kind == "nii.gz" else "study.nii"
    shutil.move(upload.path, target / name)
    _check_nifti(target / name, max_unpacked_bytes)
    return {"format": "nifti", "input_path": f"upload/{name}", "n_files": 1}
