"""The DICOM receiver of ``lungcad listen``: a C-STORE and C-ECHO SCP (pynetdicom).

:class:`StoreSCP` listens on ``host:port`` under its AE title and accepts associations only
from the calling AE titles of its allow-list (others are rejected by pynetdicom's
``require_calling_aet``, "calling AE title not recognised"). It offers every storage SOP class
with every transfer syntax pynetdicom knows, so a PACS that routes a whole study (scouts,
dose reports, other objects) is not refused halfway; only CT images (CT, Enhanced CT and
Legacy Converted Enhanced CT Image Storage) are kept, the rest is acknowledged and dropped.

Each CT instance is recorded in the :class:`~lungcad.service.dimse.ledger.ListenLedger` and
then written as it arrived (the encoded dataset with its file meta, atomically) to
``incoming/<study tag>/<instance tag>.dcm``, tags being the ledger's salted hashes, so no
folder or file name carries a UID. The success status goes back only after the file is in
place, so a sender never believes an instance stored that is not on disk. The order (ledger
first) makes a crash in between harmless: the sender got no success and sends again, and the
repeat is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lungcad.errors import InputError
from lungcad.io.atomic import atomic_path
from lungcad.service.dimse.ledger import ListenLedger
from lungcad.service.dimse.sender import check_ae_title

log = logging.getLogger(__name__)

__all__ = ["CT_IMAGE_STORAGE", "StoreSCP"]

#: The SOP classes lungcad analyses; other storage requests are acknowledged and dropped.
CT_IMAGE_STORAGE = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)
# C-STORE failure statuses (PS3.4 B.2.3).
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000


class StoreSCP:
    """C-STORE + C-ECHO service class provider writing CT instances into study folders.

    Args:
        ledger: the listener's ledger (records instances and names the folders).
        incoming: folder of the received studies (``incoming/<study tag>/``).
        ae_title: lungcad's AE title (the called AE title senders must use).
        host: address to listen on (``0.0.0.0``: every interface).
        port: TCP port (0: a free one, see :attr:`port`).
        allowed: calling AE titles that may associate (at least one).

    Raises:
        InputError: an invalid AE title, or an empty allow-list.
    """

    def __init__(
        self,
        ledger: ListenLedger,
        incoming: str | Path,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed: Sequence[str],
    ) -> None:
        self.ledger = ledger
        self.incoming = Path(incoming)
        self.ae_title = check_ae_title(ae_title)
        self.allowed = [check_ae_title(a, "--allow") for a in allowed]
        if not self.allowed:
            raise InputError(
                "no calling AE title is allowed; name each sender with --allow AET", "--allow"
            )
        self.host, self._port = host, int(port)
        self.stats: Counter[str] = Counter()
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when 0 was asked for)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    def study_folder(self, study_uid: str) -> Path:
        """Where a study's instances are written."""
        return self.incoming / self.ledger.tag(study_uid)

    def start(self) -> None:
        """Listen in background threads (one per association) until :meth:`stop`."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.incoming.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # pynetdicom rejects any other caller ("calling AE title not recognised").
        ae.require_calling_aet = self.allowed
        ae.require_called_aet = True
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)
        log.info(
            "listening as %s on %s:%d for %d allowed calling AE title(s)",
            self.ae_title,
            self.host,
            self.port,
            len(self.allowed),
        )

    def stop(self) -> None:
        """Stop listening; associations in progress are ended."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StoreSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event handlers (run in the association's thread) -----------------------------------

    def _on_echo(self, event: Any) -> int:
        self.stats["echo"] += 1
        return 0x0000

    def _on_rejected(self, event: Any) -> None:
        self.stats["rejected"] += 1
        log.warning("refused an association from a calling AE title not on the allow-list")

    def _on_store(self, event: Any) -> int:
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            if sop_class not in CT_IMAGE_STORAGE:
                self.stats["ignored"] += 1
                return 0x0000  # not CT: acknowledged, not kept
            ds = event.dataset
            study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:  # an undecodable dataset, or one without its UIDs
            self.stats["refused"] += 1
            log.warning("refused an instance that could not be read (%s)", type(exc).__name__)
            return _CANNOT_UNDERSTAND
        outcome = self.ledger.record_instance(study_uid, sop_uid)
        self.stats[outcome] += 1
        tag = self.ledger.tag(study_uid)
        if outcome == "late":
            log.warning("study %s: an instance arrived after the study was analysed; not used", tag)
            return 0x0000
        path = self.study_folder(study_uid) / f"{self.ledger.tag(sop_uid)}.dcm"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(event.encoded_dataset())
        except OSError as exc:
            self.stats["refused"] += 1
            log.error("study %s: could not write an instance (%s)", tag, exc.strerror)
            return _OUT_OF_RESOURCES
        log.debug("study %s: instance %s stored (%s)", tag, self.ledger.tag(sop_uid), outcome)
        return 0x0000
