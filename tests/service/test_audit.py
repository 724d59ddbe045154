"""The audit log: one JSON line per event, salted study hashes, no free text, a kept salt."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import pytest

import lungcad.service.audit as audit_module
from lungcad.finding import StudyFinding
from lungcad.service.audit import AUDIT_FILE, SALT_FILE, AuditLog, result_summary

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERVICE_DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def lines(data_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (data_dir / AUDIT_FILE).read_text().splitlines()]


def test_records_are_json_lines_with_only_the_given_fields(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path)
    audit.record("service_started", user="system", model_version="0.1.0+abc")
    returned = audit.record(
        "job_done",
        user="tok-0123456789",
        job_id="f" * 32,
        result=result_summary(StudyFinding.decide(0.8312345, 0.5), 2),
    )
    first, second = lines(tmp_path)
    assert set(first) == {"time", "user", "action", "model_version"}
    assert second == returned
    assert second["result"] == {
        "probability": 0.8312,
        "decision": "cancer suspected",
        "n_lesions": 2,
    }
    assert second["time"].endswith("+00:00")  # UTC


def test_study_hash_is_salted_per_install_and_stable(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path / "a")
    again = AuditLog.open(tmp_path / "a")  # the salt file is reused, not replaced
    other = AuditLog.open(tmp_path / "b")
    digest = audit.hash_uid(STUDY_UID)
    salt = bytes.fromhex((tmp_path / "a" / SALT_FILE).read_text().strip())
    assert digest == "sha256:" + hashlib.sha256(salt + STUDY_UID.encode()).hexdigest()
    assert again.hash_uid(STUDY_UID) == digest
    assert other.hash_uid(STUDY_UID) != digest
    assert audit.hash_uid(None) is None and audit.hash_uid("") is None
    assert (tmp_path / "a" / SALT_FILE).stat().st_mode & 0o077 == 0


def test_raw_uids_and_free_text_reasons_are_refused(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path)
    with pytest.raises(ValueError, match="hashed"):
        audit.record("job_done", user="system", study=STUDY_UID)
    with pytest.raises(ValueError, match="reason"):
        audit.record("job_failed", user="system", reason="Doe^Jane's file is broken")
    assert not (tmp_path / AUDIT_FILE).exists() or lines(tmp_path) == []


def test_a_damaged_salt_is_not_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / SALT_FILE).write_text("abc\n")
    with pytest.raises(ValueError, match="damaged"):
        AuditLog.open(tmp_path)


def test_concurrent_records_are_whole_lines(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path)

    def write(i: int) -> None:
        for _ in range(25):
            audit.record("result_viewed", user=f"tok-{i:010d}", job_id=f"{i:032x}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines(tmp_path)
    assert len(records) == 100 and {r["action"] for r in records} == {"result_viewed"}


def test_the_audit_log_is_the_file_the_docs_name(tmp_path: Path) -> None:
    """docs/service.md tells an auditor where to look; the service writes exactly there."""
    named = re.search(r"audit log \(`DATA_DIR/([^`]+)`", SERVICE_DOC.read_text(encoding="utf-8"))
    assert named is not None, "docs/service.md no longer names the audit log's file"
    assert named[1] == AUDIT_FILE
    AuditLog.open(tmp_path).record("service_started", user="system")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({named[1], SALT_FILE})
    assert f"``DATA_DIR/{AUDIT_FILE}``" in (audit_module.__doc__ or "")


def test_result_summary_without_a_decision() -> None:
    finding = StudyFinding.not_assessed("cannot assess", "no lung in the image")
    assert result_summary(finding, 0) == {
        "probability": None,
        "decision": "cannot assess",
        "n_lesions": 0,
    }
