"""The PACS watcher's memory and one polling round: find new CT studies, process, record.

:class:`StudyLedger` is a small JSON file (``STATE_DIR/ledger.json``, rewritten atomically
after every change) with one entry per study the watcher has seen::

    pending  -> running -> done
                        -> failed (retried after a growing pause) -> ... -> gave_up
                        -> pending (the PACS went away: not the study's fault, retried next round)

A crash leaves an entry ``running``; on the next start it counts as one failed attempt and
is retried at once, so a study is never lost, and one that crashes the process every time is
given up after ``max_attempts``. Results are stored back with the same SOPInstanceUIDs when a
round trip is repeated (see :func:`lungcad.service.pacs.process.process_study`), so the PACS never
holds duplicates. :func:`watch_round` is one pass over the PACS; ``lungcad watch`` calls it
once (``--once``) or in a loop.

A study may still be arriving (a modality sends its images one by one), so a searched study
is processed only once it has *settled*: its instance count (QIDO NumberOfStudyRelatedInstances)
is unchanged between two polls at least ``settle_s`` seconds apart. The ledger keeps the last
count seen and since when (``instances``, ``instances_since`` on the ``pending``/``failed``
entry), so the wait spans rounds and restarts of the watcher; a change of count restarts the
wait. A PACS that does not report the count makes the wait a plain ``settle_s`` after the
study was first seen. ``settle_s=0`` disables the wait; studies named explicitly skip it.

Log lines name a study by :meth:`StudyLedger.tag`, a short salted hash of its UID (the salt is
``STATE_DIR/audit_salt``, made once), never by the UID itself, and failures by the exception's
type and redacted message (``lungcad.service.redact``). The full error text stays in the
ledger, inside the state folder (mode 0700), which maps the UIDs to what became of them.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lungcad.errors import InputError
from lungcad.io.atomic import write_text_atomic
from lungcad.service.audit import SALT_FILE, load_salt
from lungcad.service.pacs.dicomweb import DicomWebClient, PacsUnavailableError, check_uid
from lungcad.service.pacs.process import (
    PacsStudyResult,
    candidate_studies,
    instance_count,
    lungcad_output_series,
    process_study,
)
from lungcad.service.redact import describe, redact, study_tag

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SETTLE_S", "LEDGER_FILE", "RoundReport", "StudyLedger", "watch_round"]

LEDGER_FILE = "ledger.json"
LOCK_FILE = "watch.lock"
LEDGER_VERSION = 1
#: Seconds a study's instance count must stay unchanged before it is processed.
DEFAULT_SETTLE_S = 30.0


def _now_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


class StudyLedger:
    """Durable record of the studies seen on the PACS and what became of them.

    Args:
        state_dir: folder of the ledger (created).
        max_attempts: failed attempts after which a study is given up.
        retry_after_s: pause before the first retry of a failed study; doubles per failure.
        max_retry_after_s: cap on that pause.
        clock: time source in seconds since the epoch (tests pass a fake).

    The ledger holds an exclusive lock on ``state_dir`` until :meth:`close` (or the end of a
    ``with`` block), so one folder serves one watcher.

    Raises:
        InputError: another process holds the folder; the ledger file is not a lungcad
            ledger (corrupt or foreign).
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        max_attempts: int = 5,
        retry_after_s: float = 60.0,
        max_retry_after_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_attempts < 1 or retry_after_s < 0:
            raise InputError(
                f"need max_attempts >= 1 and retry_after_s >= 0; got "
                f"{max_attempts}, {retry_after_s}",
                "--max-attempts",
            )
        self.state_dir = Path(state_dir)
        # 0700: the ledger and the work folders are named by raw StudyInstanceUIDs.
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.state_dir / LEDGER_FILE
        self.max_attempts = int(max_attempts)
        self.retry_after_s = float(retry_after_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self._clock = clock
        # Own the state folder before reading it: a second watcher must neither run studies
        # twice nor "recover" the first one's study in hand.
        self._lock = self._acquire()
        try:
            self._salt = load_salt(self.state_dir / SALT_FILE)
            self.studies: dict[str, dict[str, Any]] = self._load()
        except BaseException:
            self.close()
            raise
        interrupted = [u for u, e in self.studies.items() if e["status"] == "running"]
        for uid in interrupted:  # the process that held the folder ended while on these
            self._failed(
                uid, "interrupted: lungcad stopped while processing this study", retry_now=True
            )
        if interrupted:
            self._save()

    def _acquire(self) -> IO[str]:
        handle = (self.state_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise InputError(
                f"another lungcad watch (pid {holder}) is using this state "
                "folder; stop it or choose another --state-dir",
                self.state_dir,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def tag(self, uid: str) -> str:
        """The study's name in log lines: a short salted hash of its UID (module notes)."""
        return study_tag(uid, self._salt)

    def close(self) -> None:
        """Release the state folder (the ledger is already saved after every change)."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> StudyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            studies = doc["studies"]
            if doc.get("version") != LEDGER_VERSION or not isinstance(studies, dict):
                raise ValueError(f"version {doc.get('version')!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"not a lungcad PACS ledger (version {LEDGER_VERSION}): {exc}. "
                "Move it away to start afresh (already processed studies would "
                "then be recognised by their lungcad SEG/SR on the PACS)",
                self.path,
            ) from exc
        return studies

    def _save(self) -> None:
        write_text_atomic(
            self.path,
            json.dumps(
                {"version": LEDGER_VERSION, "studies": self.studies}, indent=1, sort_keys=True
            ),
        )

    def _entry(self, uid: str) -> dict[str, Any]:
        now = self._clock()
        entry = self.studies.setdefault(
            uid,
            {
                "status": "pending",
                "failures": 0,
                "first_seen": _now_iso(now),
                "last_error": None,
                "next_attempt_at": None,
                "result": None,
            },
        )
        entry["updated"] = _now_iso(now)
        return entry

    def get(self, uid: str) -> dict[str, Any] | None:
        """The study's entry (status, failures, last_error, next_attempt_at, result)."""
        return self.studies.get(uid)

    def counts(self) -> Counter[str]:
        """Number of studies per status."""
        return Counter(e["status"] for e in self.studies.values())

    def is_due(self, uid: str) -> bool:
        """True when the study is new, pending, or failed and its pause is over."""
        entry = self.studies.get(uid)
        if entry is None or entry["status"] in ("pending", "running"):
            return True
        if entry["status"] == "failed":
            return self._clock() >= (entry["next_attempt_at"] or 0.0)
        return False

    def discover(self, uids: Sequence[str]) -> list[str]:
        """Record newly seen studies as pending; returns the ones that were new."""
        new = [u for u in uids if u not in self.studies]
        for uid in new:
            self._entry(uid)
        if new:
            self._save()
        return new

    def observe(self, counts: Mapping[str, int | None]) -> None:
        """Note the instance count of each study seen in a search.

        A study whose count differs from the one recorded (or that has none recorded) starts
        its settle clock now. Done and given-up studies are not tracked. Saved only when
        something changed.
        """
        now = self._clock()
        changed = False
        for uid, count in counts.items():
            entry = self.studies.get(uid)
            if entry is None or entry["status"] in ("done", "gave_up"):
                continue
            if "instances_since" not in entry or entry.get("instances") != count:
                if "instances_since" in entry:
                    log.info(
                        "study %s: %s -> %s instances; still arriving",
                        self.tag(uid),
                        entry.get("instances"),
                        count,
                    )
                entry.update(instances=count, instances_since=now)
                changed = True
        if changed:
            self._save()

    def settle_remaining(self, uid: str, settle_s: float) -> float:
        """Seconds until the study's instance count has been unchanged for ``settle_s``
        (0.0 when settled; ``settle_s`` when its count was never observed)."""
        if settle_s <= 0:
            return 0.0
        entry = self.studies.get(uid)
        if entry is None or "instances_since" not in entry:
            return float(settle_s)
        return max(0.0, float(entry["instances_since"]) + settle_s - self._clock())

    def start(self, uid: str) -> None:
        """Mark a study as being processed (persisted before any work starts)."""
        self._entry(uid)["status"] = "running"
        self._save()

    def succeed(self, uid: str, result: dict[str, Any], note: str | None = None) -> None:
        """Mark a study done with its result summary."""
        entry = self._entry(uid)
        entry.update(
            status="done", result=result, next_attempt_at=None, note=note, finished=entry["updated"]
        )
        self._save()

    def defer(self, uid: str, error: str) -> None:
        """Back to pending without counting a failure (the PACS was unreachable)."""
        entry = self._entry(uid)
        entry.update(status="pending", last_error=error, next_attempt_at=None)
        self._save()

    def fail(self, uid: str, error: str) -> None:
        """Count a failed attempt: retry later with a doubling pause, or give up."""
        self._failed(uid, error)
        self._save()

    def _failed(self, uid: str, error: str, retry_now: bool = False) -> None:
        entry = self._entry(uid)
        entry["failures"] += 1
        entry["last_error"] = error
        if entry["failures"] >= self.max_attempts:
            entry.update(status="gave_up", next_attempt_at=None)
            log.error(
                "study %s: giving up after %d failed attempts: %s",
                self.tag(uid),
                entry["failures"],
                redact(error),
            )
            return
        pause = (
            0.0
            if retry_now
            else min(self.max_retry_after_s, self.retry_after_s * 2.0 ** (entry["failures"] - 1))
        )
        entry.update(status="failed", next_attempt_at=self._clock() + pause)


@dataclass
class RoundReport:
    """What one :func:`watch_round` did.

    Attributes:
        found: CT studies considered (on the PACS, or named).
        processed: round trips that completed.
        failed: StudyInstanceUID -> error, for studies that failed this round.
        already_on_pacs: studies new to the ledger that already held lungcad outputs.
        unavailable: the error when the PACS became unreachable (the round stopped there).
        settling: StudyInstanceUID -> seconds still to wait, for due studies whose instance
            count has not settled yet (they may still be arriving; left pending).
    """

    found: int = 0
    processed: list[PacsStudyResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    already_on_pacs: list[str] = field(default_factory=list)
    unavailable: str | None = None
    settling: dict[str, float] = field(default_factory=dict)


def _has_lungcad_outputs(client: DicomWebClient, study_uid: str) -> bool:
    """True when the study already holds a lungcad SR (written for every analysed study; the
    SEG only when there are lesions)."""
    found = {str(s.get("Modality", "")).upper() for s in lungcad_output_series(client, study_uid)}
    return "SR" in found


PredictorSource = Any  # a Predictor, or a zero-argument callable that loads one


def watch_round(
    client: DicomWebClient,
    predictor: PredictorSource,
    ledger: StudyLedger,
    work_root: str | Path,
    *,
    study_uids: Sequence[str] | None = None,
    since: _dt.date | str | None = None,
    force: bool = False,
    on_result: Callable[[str, PacsStudyResult | None, str | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    settle_s: float = DEFAULT_SETTLE_S,
) -> RoundReport:
    """One pass: find CT studies not yet processed, run each round trip, record the outcome.

    Args:
        client: the PACS.
        predictor: a Predictor, or a callable returning one (called once, only when a study
            needs it, so an idle round never loads the model).
        ledger: the :class:`StudyLedger`.
        work_root: per-study working folders go in ``work_root/<StudyInstanceUID>``.
        study_uids: process these studies (ignoring retry pauses and given-up states)
            instead of searching the PACS.
        since: only search studies from this StudyDate on.
        force: with ``study_uids``, process studies even when already done.
        on_result: called after each study as ``(uid, result or None, error or None)``.
        should_stop: checked before each study; True ends the round there (the rest stay
            pending for the next round).
        settle_s: a searched study is processed only when its instance count has not
            changed for at least this many seconds (see the module docstring); 0 disables
            the wait. Studies named in ``study_uids`` are not waited for.

    Returns:
        The :class:`RoundReport`. A PACS outage does not raise: the study in hand goes back
        to pending and ``report.unavailable`` says what happened; only an outage during the
        initial search raises :class:`PacsUnavailableError`.
    """
    report = RoundReport()
    explicit = study_uids is not None
    if settle_s < 0:
        raise InputError(f"settle time must be >= 0 seconds; got {settle_s}", "--settle-seconds")
    if study_uids is not None:
        uids = [check_uid(u) for u in study_uids]
    else:
        studies = client.search_studies(modality="CT", date_from=since)
        uids = candidate_studies(studies)
        counts = {
            str(s.StudyInstanceUID): instance_count(s) for s in studies if "StudyInstanceUID" in s
        }
    report.found = len(uids)
    ledger.discover(uids)
    if not explicit:
        ledger.observe({uid: counts[uid] for uid in uids})
    loaded: list[Any] = []

    def get_predictor() -> Any:
        if not loaded:
            loaded.append(predictor if hasattr(predictor, "predict_volume") else predictor())
        return loaded[0]

    for uid in uids:
        if should_stop is not None and should_stop():
            break
        entry = ledger.get(uid) or {}
        if explicit:
            if entry.get("status") == "done" and not force:
                continue
        elif not ledger.is_due(uid):
            continue
        else:
            wait = ledger.settle_remaining(uid, settle_s)
            if wait > 0:  # images may still be arriving: a partial series must not be read
                report.settling[uid] = wait
                continue
        try:
            if not force and _has_lungcad_outputs(client, uid):
                # Already analysed (the ledger was lost, or a crash came after the results
                # were stored): adopt it rather than send a second SEG and SR.
                ledger.succeed(
                    uid,
                    {"study_uid": uid},
                    note="lungcad SEG and SR were already on the PACS; not processed again",
                )
                report.already_on_pacs.append(uid)
                continue
            ledger.start(uid)
            result = process_study(client, get_predictor(), uid, Path(work_root) / uid)
        except PacsUnavailableError as exc:
            ledger.defer(uid, str(exc))
            report.unavailable = str(exc)
            if on_result:
                on_result(uid, None, str(exc))
            break
        except Exception as exc:  # one bad study must not stop the service
            error = f"{type(exc).__name__}: {exc}"  # in full only in the ledger
            log.warning("study %s failed: %s", ledger.tag(uid), describe(exc))
            ledger.fail(uid, error)
            report.failed[uid] = error
            if on_result:
                on_result(uid, None, error)
            continue
        ledger.succeed(uid, result.to_dict())
        report.processed.append(result)
        if on_result:
            on_result(uid, result, None)
    return report
