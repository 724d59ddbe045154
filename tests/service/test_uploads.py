"""Receiving uploads without the web app: the multipart stream, zip unpacking, the study check.

The same paths through the app (413s, zip bombs, zip slip, non-CT series) are in
test_faults.py; these tests pin the functions' own contracts.
"""

from __future__ import annotations

import asyncio
import stat
import zipfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lungcad.io.dicom_writer import write_dicom_series
from lungcad.service.uploads import (
    UPLOAD_FILE,
    StagedUpload,
    UploadRejected,
    extract_zip,
    prepare_study,
    receive_upload,
)
from tests.service_helpers import hu_volume, nifti_bytes, zip_bytes

BOUNDARY = "lungcad-test-boundary"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
MB = 1 << 20


def multipart(fields: Iterable[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart/form-data body of ``(name, filename or None, content)`` parts."""
    out = b""
    for name, filename, content in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


async def chunks(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def receive(body: bytes, folder: Path, limit: int = MB, headers=None) -> StagedUpload:
    return asyncio.run(receive_upload(headers or HEADERS, chunks(body), folder, limit))


def test_the_file_field_is_streamed_to_disk(tmp_path: Path) -> None:
    content = bytes(range(256)) * 40
    body = multipart([("note", None, b"ignored"), ("file", "scan.nii.gz", content)])
    upload = receive(body, tmp_path)
    assert upload.filename == "scan.nii.gz" and upload.size == len(content)
    assert (tmp_path / UPLOAD_FILE).read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [UPLOAD_FILE]


def test_a_declared_size_over_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("the body was read")
        yield b""

    headers = {**HEADERS, "content-length": str(2 * MB)}
    with pytest.raises(UploadRejected) as err:
        asyncio.run(receive_upload(headers, never(), tmp_path, MB))
    assert err.value.status_code == 413 and err.value.reason == "too_large"
    assert "2.0 MB" in err.value.message and "--max-upload-mb" in err.value.message


def test_the_limit_holds_while_streaming_and_bad_bodies_are_400(tmp_path: Path) -> None:
    big = multipart([("file", "x.nii", b"\0" * 5000)])  # no Content-Length: counted
    with pytest.raises(UploadRejected) as err:
        receive(big, tmp_path, limit=4096)
    assert err.value.status_code == 413
    for body, headers, words in (
        (b"plain", {"content-type": "text/plain"}, "multipart/form-data"),
        (multipart([("other", "x.zip", b"x")]), HEADERS, "no field named 'file'"),
    ):
        folder = tmp_path / str(len(words))
        folder.mkdir()
        with pytest.raises(UploadRejected, match=words) as err:
            receive(body, folder, headers=headers)
        assert err.value.status_code == 400 and err.value.reason == "bad_request"


def test_extract_zip_unpacks_files_only_and_counts_them(tmp_path: Path) -> None:
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("series/", b"")  # a directory entry
        zf.writestr("series/./1.dcm", b"one")
        zf.writestr("series/sub/2.dcm", b"two")
        zf.writestr("__MACOSX/series/._1.dcm", b"finder junk")
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract_zip(archive, dest, max_files=2, max_unpacked_bytes=MB) == 2
    assert (dest / "series" / "1.dcm").read_bytes() == b"one"
    assert (dest / "series" / "sub" / "2.dcm").read_bytes() == b"two"
    assert not (dest / "__MACOSX").exists()


def test_extract_zip_refuses_links_duplicates_and_empty_archives(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("series/evil.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archives = {}
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    archives["symbolic link"] = tmp_path / "link.zip"
    with zipfile.ZipFile(tmp_path / "twice.zip", "w") as zf:
        zf.writestr("a/1.dcm", b"x")
        zf.writestr("a/./1.dcm", b"y")
    archives["twice"] = tmp_path / "twice.zip"
    (tmp_path / "empty.zip").write_bytes(zip_bytes({}))
    archives["no files"] = tmp_path / "empty.zip"
    for words, archive in archives.items():
        dest = tmp_path / f"out-{archive.stem}"
        dest.mkdir()
        with pytest.raises(UploadRejected, match=words) as err:
            extract_zip(archive, dest, max_files=5, max_unpacked_bytes=MB)
        assert err.value.status_code == 400 and err.value.reason == "corrupt"
    assert not (tmp_path / "out-link" / "series" / "evil.dcm").is_symlink()


def staged(folder: Path, data: bytes, filename: str) -> StagedUpload:
    folder.mkdir()
    (folder / UPLOAD_FILE).write_bytes(data)
    return StagedUpload(folder, filename, len(data))


def test_prepare_study_recognises_nifti_and_dicom(tmp_path: Path) -> None:
    volume = hu_volume((3, 16, 16))
    nifti = staged(tmp_path / "n", nifti_bytes(volume, tmp_path), "scan.gz")  # gzip magic
    info = prepare_study(nifti, max_files=10, max_unpacked_bytes=MB)
    assert info == {"format": "nifti", "input_path": "upload/study.nii.gz", "n_files": 1}
    assert not nifti.path.exists() and (tmp_path / "n" / info["input_path"]).is_file()

    write_dicom_series(volume, tmp_path / "ct", uid_seed=3)
    files = {f"s/{p.name}": p.read_bytes() for p in sorted((tmp_path / "ct").iterdir())}
    dicom = staged(tmp_path / "d", zip_bytes(files), "study.zip")
    info = prepare_study(dicom, max_files=10, max_unpacked_bytes=MB)
    assert info == {"format": "dicom", "input_path": "upload/dicom", "n_files": 3}
    assert not dicom.path.exists()

    with pytest.raises(UploadRejected, match="unsupported upload") as err:
        prepare_study(
            staged(tmp_path / "t", b"hello", "notes.txt"), max_files=1, max_unpacked_bytes=MB
        )
    assert err.value.status_code == 400


def test_a_nifti_declaring_too_many_voxels_is_413(tmp_path: Path) -> None:
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), path)  # 1 MB
    upload = staged(tmp_path / "b", path.read_bytes(), "big.nii.gz")
    with pytest.raises(UploadRejected) as err:
        prepare_study(upload, max_files=1, max_unpacked_bytes=MB // 2)
    assert err.value.status_code == 413 and err.value.reason == "too_large"
