"""``lungcad listen``'s work loop: analyse settled studies, deliver their results, retry.

:class:`Listener` ties the :class:`~lungcad.service.dimse.scp.StoreSCP` (instances in), the
:class:`~lungcad.service.dimse.ledger.ListenLedger` (what happened) and the destinations
(:mod:`lungcad.service.dimse.sender`, results out). :meth:`Listener.step` is one pass:

1. every study that has settled (no new instance for ``settle_s`` seconds) is read
   (``lungcad.io.read_image``: the CT series with most slices, classic or enhanced), predicted
   and written with ``lungcad.inference.outputs.write_study_outputs`` into
   ``studies/<tag>/outputs`` (atomically; a complete earlier result is reused, so a restart
   re-sends the same SOPInstanceUIDs rather than new objects), then one delivery per
   destination is queued;
2. every due delivery sends the result's DICOM files (SEG, SR and whatever DICOM objects the
   study outputs hold); a destination that fails is retried after a doubling pause and not
   tried again in the same pass.

Once every destination has the results the received images are deleted (unless
``keep_images``): the PACS holds them, lungcad keeps only its results. Log lines name studies
by their ledger tag and errors by their type and a redacted message (no UIDs, no paths); the
full error text goes only to the ledger in the state folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lungcad.errors import InputError
from lungcad.service.dimse.ledger import ListenLedger
from lungcad.service.dimse.scp import StoreSCP

log = logging.getLogger(__name__)

__all__ = [
    "Destination",
    "Listener",
    "RedactingFilter",
    "StepReport",
    "analyse_study",
    "redacted",
]

# A DICOM UID has at least five dot-separated parts (four would catch IPv4 addresses).
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
_PATH = re.compile(r"""(?<![\w:/.~-])/[^\s'"`,;:()\[\]{}<>]+""")


def _redact(text: str) -> str:
    return _PATH.sub("<path>", _UID.sub("<uid>", text))


def redacted(exc: BaseException) -> str:
    """An exception as a log line may show it: type and message without UIDs or paths."""
    text = _redact(" ".join(str(exc).split()))[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedactingFilter(logging.Filter):
    """A handler filter that takes DICOM UIDs and absolute paths out of every record.

    ``lungcad listen`` puts it on its log handlers: the modules it calls (the readers, the
    DICOM writers) name files and series in their messages, which is right for a command run
    by hand on one's own files and wrong in the log of a node that receives patients' studies.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _redact(record.getMessage()), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redacted(record.exc_info[1])
            record.exc_info = None
        return True


class Destination(Protocol):
    """Anything with a ``name`` and ``send(files, study_uid)`` (see :mod:`.sender`)."""

    @property
    def name(self) -> str: ...

    def send(self, files: Sequence[Path], study_uid: str) -> None: ...


@dataclass
class StepReport:
    """What one :meth:`Listener.step` did (studies named by their ledger tags)."""

    analysed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    delivered: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def analyse_study(predictor: Any, images: Path, out_dir: Path) -> dict[str, Path]:
    """Predict one received study and write its outputs (or reuse a complete earlier result).

    Args:
        predictor: a :class:`lungcad.inference.predictor.Predictor` (``predict_volume``).
        images: the study's folder of received instances.
        out_dir: its output folder (written atomically: complete or absent).

    Returns:
        Output name -> path (``findings.json``, ``seg.dcm``, ``sr.dcm``, ...).

    Raises:
        InputError: the study holds no usable CT series.
    """
    from lungcad.inference.outputs import FINDINGS_FILE, write_study_outputs
    from lungcad.io import read_image

    if (out_dir / FINDINGS_FILE).is_file():  # an earlier attempt finished writing
        return {p.name: p for p in sorted(out_dir.iterdir()) if p.is_file()}
    volume = read_image(images)
    result = predictor.predict_volume(volume)
    return write_study_outputs(volume, result, out_dir)


def _summary(outputs: dict[str, Path]) -> dict[str, Any]:
    """The ledger's result record: the study's decision and the DICOM files to deliver."""
    doc = json.loads(outputs["findings.json"].read_text(encoding="utf-8"))
    study = doc.get("study") or {}
    return {
        "probability": study.get("probability"),
        "is_cancer": study.get("is_cancer"),
        "n_lesions": study.get("n_lesions"),
        "dicom": sorted(name for name in outputs if name.endswith(".dcm")),
    }


class Listener:
    """Analyse what the SCP received and deliver the results, step by step.

    Args:
        predictor: a Predictor, or a zero-argument callable that loads one (called once, on
            the first study, so an idle listener never loads the model).
        ledger: the :class:`ListenLedger`.
        scp: the :class:`StoreSCP` writing the studies (its folders are read here).
        state_dir: the state folder (outputs in ``studies/<tag>/outputs``).
        destinations: where results go (none: they stay in the state folder).
        settle_s: seconds without a new instance before a study is analysed.
        keep_images: keep the received images after delivery.
        on_event: called as ``(kind, tag, text)`` for "analysed", "failed", "delivered",
            "deferred" and "done" (the command prints them).
    """

    def __init__(
        self,
        predictor: Any,
        ledger: ListenLedger,
        scp: StoreSCP,
        state_dir: str | Path,
        destinations: Sequence[Destination] = (),
        *,
        settle_s: float = 30.0,
        keep_images: bool = False,
        on_event: Callable[[str, str, str], None] | None = None,
    ) -> None:
        if settle_s < 0:
            raise InputError(
                f"settle time must be >= 0 seconds; got {settle_s}", "--settle-seconds"
            )
        names = [d.name for d in destinations]
        if len(set(names)) != len(names):
            raise InputError(f"a destination is named twice: {names}", "--send-to")
        self._predictor = predictor
        self.ledger, self.scp = ledger, scp
        self.studies = Path(state_dir) / "studies"
        self.destinations = {d.name: d for d in destinations}
        self.settle_s = float(settle_s)
        self.keep_images = keep_images
        self._on_event = on_event
        self._unknown: set[str] = set()

    def _event(self, kind: str, tag: str, text: str = "") -> None:
        if self._on_event is not None:
            self._on_event(kind, tag, text)

    def _get_predictor(self) -> Any:
        if not hasattr(self._predictor, "predict_volume"):
            self._predictor = self._predictor()
        return self._predictor

    def outputs_dir(self, study_uid: str) -> Path:
        """Where a study's results are written."""
        return self.studies / self.ledger.tag(study_uid) / "outputs"

    def step(self, should_stop: Callable[[], bool] | None = None) -> StepReport:
        """Analyse every settled study, then try every due delivery once."""
        report = StepReport()
        for uid in self.ledger.settled(self.settle_s):
            if should_stop is not None and should_stop():
                return report
            self._analyse(uid, report)
        down: set[str] = set()
        for delivery in self.ledger.due_deliveries():
            name, tag = delivery.destination, delivery.tag
            destination = self.destinations.get(name)
            if destination is None:
                if name not in self._unknown:
                    self._unknown.add(name)
                    log.warning("deliveries to %s wait: it is not configured now", name)
                continue
            if name in down:
                continue
            files = sorted(self.outputs_dir(delivery.study_uid).glob("*.dcm"))
            try:
                destination.send(files, delivery.study_uid)
            except Exception as exc:  # down, refused, or a result file gone: stays queued
                down.add(name)
                pause = self.ledger.delivery_failed(delivery.study_uid, name, str(exc))
                text = f"{redacted(exc)}; attempt {delivery.attempts + 1}, next in {pause:.1f} s"
                log.warning("study %s: delivery to %s failed: %s", tag, name, text)
                report.deferred.append((tag, name))
                self._event("deferred", tag, f"{name}: {text}")
                continue
            report.delivered.append((tag, name))
            self._event("delivered", tag, f"{len(files)} file(s) to {name}")
            if self.ledger.delivered(delivery.study_uid, name):
                self._finish(delivery.study_uid, tag, report)
        return report

    def _analyse(self, uid: str, report: StepReport) -> None:
        tag = self.ledger.tag(uid)
        self.ledger.start(uid)
        try:
            outputs = analyse_study(
                self._get_predictor(), self.scp.study_folder(uid), self.outputs_dir(uid)
            )
            summary = _summary(outputs)
        except Exception as exc:  # one bad study must not stop the listener
            status = self.ledger.fail(uid, f"{type(exc).__name__}: {exc}")
            log.warning("study %s: analysis failed (%s): %s", tag, status, redacted(exc))
            report.failed[tag] = redacted(exc)
            self._event("failed", tag, f"{redacted(exc)} ({status})")
            return
        destinations = list(self.destinations) if summary["dicom"] else []
        self.ledger.analysed(uid, summary, destinations)
        report.analysed.append(tag)
        log.info("study %s analysed; %d delivery(ies) queued", tag, len(destinations))
        self._event("analysed", tag, _describe(summary, len(destinations)))
        if not destinations:
            self._finish(uid, tag, report)

    def _finish(self, uid: str, tag: str, report: StepReport) -> None:
        if not self.keep_images:
            shutil.rmtree(self.scp.study_folder(uid), ignore_errors=True)
        report.done.append(tag)
        self._event("done", tag, "")

    def serve(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Receive and work until ``stop`` is set; the study in hand is finished first."""
        if not self.scp.running:
            self.scp.start()
        try:
            while not stop.is_set():
                self.step(should_stop=stop.is_set)
                wait = self.ledger.settle_remaining(self.settle_s)
                stop.wait(poll_s if wait is None else min(poll_s, max(wait, 0.05)))
        finally:
            self.scp.stop()


def _describe(summary: dict[str, Any], n_destinations: int) -> str:
    p, cancer = summary.get("probability"), summary.get("is_cancer")
    decision = (
        "no decision"
        if cancer is None
        else ("cancer suspected" if cancer else "no cancer suspected")
    )
    prob = f"p={p:.3f} " if isinstance(p, int | float) else ""
    return (
        f"{prob}{decision}, {summary.get('n_lesions')} lesion(s), "
        f"{len(summary['dicom'])} DICOM object(s) for {n_destinations} destination(s)"
    )
