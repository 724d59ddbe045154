"""Redaction of log lines and error messages: no server paths, upload file names or UIDs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lungcad.service.audit import AuditLog
from lungcad.service.redact import MAX_MESSAGE, describe, redact, study_tag

STUDY_UID = "1.2.826.0.1.3680043.8.498.73104242917"


def test_the_upload_folder_and_everything_below_it_become_one_name(tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "abc" / "upload"
    message = f"{folder}/DOE_JANE/0003.dcm: slice missing; see {folder.resolve()}"
    assert redact(message, {folder: "upload"}) == "upload: slice missing; see upload"
    assert redact("no path here", {folder: "upload"}) == "no path here"
    # other absolute paths and UIDs, not URLs, fractions, versions or IP addresses
    text = (
        f"cannot open /srv/lungcad/x.nii in study {STUDY_UID} (1/2 done, lungcad 0.1.0) "
        "from http://127.0.0.1:8042/dicom-web"
    )
    assert redact(text) == (
        "cannot open <path> in study <uid> (1/2 done, lungcad 0.1.0) "
        "from http://127.0.0.1:8042/dicom-web"
    )


def test_the_services_own_url_paths_stay_readable_in_access_logs() -> None:
    line = '127.0.0.1:5123 - "GET /api/v1/jobs/%s/slices/3.png?cam=1 HTTP/1.1" 200' % ("a" * 32)
    assert redact(line) == line
    assert redact('"GET /health HTTP/1.1" 200') == '"GET /health HTTP/1.1" 200'
    assert redact("read /apiary/x.dcm") == "read <path>"


def test_describe_is_one_short_line_with_the_type(tmp_path: Path) -> None:
    exc = RuntimeError(f"{tmp_path}/DOE_JANE.nii\nseries {STUDY_UID}.2 broken " + "x" * 500)
    line = describe(exc, {tmp_path: "upload"})
    assert line.startswith("RuntimeError: upload series <uid> broken")
    assert "\n" not in line and len(line) <= len("RuntimeError: ") + MAX_MESSAGE
    assert "DOE_JANE" not in line and str(tmp_path) not in line
    assert describe(KeyError()) == "KeyError"


def test_study_tag_is_the_start_of_the_audit_hash(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path)
    salt = bytes.fromhex((tmp_path / "audit_salt").read_text().strip())
    tag = study_tag(STUDY_UID, salt)
    assert tag.startswith("sha256:") and len(tag) == len("sha256:") + 12
    assert audit.hash_uid(STUDY_UID).startswith(tag)  # an auditor can match log and audit
    assert tag == "sha256:" + hashlib.sha256(salt + STUDY_UID.encode()).hexdigest()[:12]
    assert study_tag(STUDY_UID, b"another install") != tag and study_tag(None, salt) == "-"
