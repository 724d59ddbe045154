"""Provenance stamps shared by every file lungcad writes: UTC timestamps.

Times are always UTC ISO 8601 (``2026-12-01T09:46:41+00:00``), never local time, so files from
machines in different time zones sort and compare correctly.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

Timespec = Literal["seconds", "milliseconds"]


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def utc_timestamp(timespec: Timespec = "seconds") -> str:
    """The current UTC time in ISO 8601, e.g. ``2026-12-01T09:46:41+00:00``."""
    return utc_now().isoformat(timespec=timespec)
