"""Tests for lungcad.provenance: UTC time stamps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from lungcad.provenance import utc_now, utc_timestamp


def test_timestamps_are_utc_iso8601() -> None:
    now = utc_now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    stamp = utc_timestamp()
    parsed = datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and parsed.tzinfo == timezone.utc
    assert abs(parsed - now) < timedelta(minutes=1)
    assert "." not in stamp  # seconds
    assert len(utc_timestamp("milliseconds").split(".")[1]) == len("123+00:00")
