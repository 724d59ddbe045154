"""The listener's ledger: settling, crash recovery, delivery queue and back-off, persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lungcad.errors import InputError
from lungcad.service.dimse.ledger import DB_FILE, ListenLedger


def test_instances_settle_and_a_restart_neither_loses_nor_repeats(tmp_path: Path) -> None:
    now = [1000.0]

    def ledger(**kw) -> ListenLedger:
        return ListenLedger(tmp_path, retry_after_s=10.0, clock=lambda: now[0], **kw)

    with ledger() as book:
        assert book.record_instance("1.2.3", "1.2.3.1") == "new"
        assert book.record_instance("1.2.3", "1.2.3.1") == "repeat"  # sent twice: held once
        now[0] = 1005.0
        assert book.record_instance("1.2.3", "1.2.3.2") == "new"
        assert book.settled(10.0) == [] and book.settle_remaining(10.0) == pytest.approx(10.0)
        tag = book.tag("1.2.3")
        assert len(tag) == 16 and "1.2.3" not in tag and tag == book.tag("1.2.3")
    now[0] = 1016.0  # the listener was down while the wait ran out: the wait still counts
    with ledger() as book:
        assert book.tag("1.2.3") == tag  # the salt lives in the database
        assert book.settled(10.0) == ["1.2.3"]
        book.start("1.2.3")
    # It crashed while analysing: one failed attempt, retried at once.
    with ledger(max_attempts=2) as book:
        record = book.get("1.2.3")
        assert record.status == "failed" and record.failures == 1
        assert "interrupted" in record.last_error and book.settled(10.0) == ["1.2.3"]
        book.start("1.2.3")
        book.analysed("1.2.3", {"dicom": ["seg.dcm", "sr.dcm"]}, ["dimse:A@h:1", "stow:x"])
        assert book.get("1.2.3").status == "delivering" and book.settled(10.0) == []
        # An instance after analysis is acknowledged but not used: the study is not redone.
        assert book.record_instance("1.2.3", "1.2.3.9") == "late"
        assert book.record_instance("1.2.3", "1.2.3.2") == "late"  # held: not counted again
        assert book.record_instance("1.2.3", "1.2.3.9") == "late"
        assert book.get("1.2.3").late == 2 and book.get("1.2.3").instances == 2
    assert sqlite3.connect(tmp_path / DB_FILE).execute("SELECT COUNT(*) FROM studies").fetchone()


def test_a_destination_that_is_down_is_retried_with_backoff_and_never_dropped(
    tmp_path: Path,
) -> None:
    now = [0.0]
    book = ListenLedger(tmp_path, retry_after_s=5.0, max_retry_after_s=30.0, clock=lambda: now[0])
    book.record_instance("9.8.7", "9.8.7.1")
    book.start("9.8.7")
    book.analysed("9.8.7", {"dicom": ["seg.dcm"]}, ["down", "up"])
    assert [d.destination for d in book.due_deliveries()] == ["down", "up"]
    assert book.delivered("9.8.7", "up") is False  # one destination still owed
    pauses = [book.delivery_failed("9.8.7", "down", "refused") for _ in range(5)]
    assert pauses == [5.0, 10.0, 20.0, 30.0, 30.0]  # doubling, capped
    assert book.due_deliveries() == []
    (queued,) = book.deliveries("pending")
    assert queued.attempts == 5 and queued.last_error == "refused"
    book.close()
    now[0] = 100.0
    with ListenLedger(tmp_path, clock=lambda: now[0]) as book:  # still queued after a restart
        (due,) = book.due_deliveries()
        assert due.destination == "down" and due.tag == book.tag("9.8.7")
        assert book.delivered("9.8.7", "down") is True
        assert book.get("9.8.7").status == "done" and dict(book.counts()) == {"done": 1}


def test_failures_give_up_and_bad_state_is_refused(tmp_path: Path) -> None:
    now = [0.0]
    book = ListenLedger(tmp_path / "a", max_attempts=2, retry_after_s=4.0, clock=lambda: now[0])
    book.record_instance("5.5.5", "5.5.5.1")
    book.start("5.5.5")
    assert book.fail("5.5.5", "InputError: no CT") == "failed"
    assert book.settled(0.0) == []
    now[0] = 4.0
    assert book.settled(0.0) == ["5.5.5"]
    book.start("5.5.5")
    assert book.fail("5.5.5", "InputError: no CT") == "gave_up"
    now[0] = 1e6
    assert book.settled(0.0) == []
    with pytest.raises(InputError, match="another lungcad listen"):
        ListenLedger(tmp_path / "a")
    book.close()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / DB_FILE).write_text("not a database at all, just text" * 40)
    with pytest.raises(InputError, match="not a lungcad listen ledger"):
        ListenLedger(tmp_path / "b")
    with pytest.raises(InputError, match="retry"):
        ListenLedger(tmp_path / "c", retry_after_s=10.0, max_retry_after_s=1.0)
