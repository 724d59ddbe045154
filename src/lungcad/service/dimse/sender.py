"""Where ``lungcad listen`` sends its results: a DICOM node (C-STORE) or a DICOMweb server.

A destination has a ``name`` (what the ledger queues deliveries under) and ``send(files,
study_uid)``, which returns only when the destination has taken every file, and raises
:class:`DeliveryError` otherwise. Re-sending is harmless (the objects keep their
SOPInstanceUIDs), which is what lets the ledger retry a delivery until it succeeds.

* :class:`DimseDestination`: one association per delivery to ``AET@host:port`` (pynetdicom
  SCU), one presentation context per SOP class and transfer syntax of the files.
* :class:`StowDestination`: STOW-RS into the study with
  :class:`lungcad.service.pacs.dicomweb.DicomWebClient`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lungcad.errors import InputError
from lungcad.service.pacs.dicomweb import DicomWebClient, PacsError

__all__ = [
    "DeliveryError",
    "DimseDestination",
    "StowDestination",
    "check_ae_title",
    "parse_destination",
]

#: C-STORE statuses that mean "stored" (success, and the warnings of PS3.4 B.2.3: coerced,
#: elements discarded, does not match SOP class).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable chars, no backslash


class DeliveryError(RuntimeError):
    """A destination did not take the results (down, refused the association or an object)."""


def check_ae_title(title: str, name: str = "--ae-title") -> str:
    """``title`` when it is a valid AE title (1 to 16 printable characters, no backslash, not
    only spaces), else InputError."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise InputError(
            f"not a DICOM AE title (1 to 16 printable characters, no backslash): {title!r}", name
        )
    return title.strip()


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM node that takes C-STORE requests.

    Attributes:
        ae_title: the destination's (called) AE title.
        host: its address.
        port: its DICOM port.
        calling_ae: lungcad's own AE title on the association.
        timeout_s: seconds allowed for the association and each response.
    """

    ae_title: str
    host: str
    port: int
    calling_ae: str = "LUNGCAD"
    timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return f"dimse:{self.ae_title}@{self.host}:{self.port}"

    def send(self, files: Sequence[Path], study_uid: str) -> None:
        """C-STORE every file on one association.

        Raises:
            DeliveryError: no association (the node is down, or rejected lungcad's AE
                title), the association broke, or an object was refused.
        """
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        contexts: dict[str, set[str]] = {}
        for path in files:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            syntaxes = contexts.setdefault(str(meta.MediaStorageSOPClassUID), set())
            syntaxes.add(str(meta.TransferSyntaxUID))
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(
                sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
            )
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise DeliveryError(f"{self.name} {why}")
        try:
            for path in files:
                status = assoc.send_c_store(path)
                if "Status" not in status:
                    raise DeliveryError(f"{self.name}: the association broke or timed out")
                if int(status.Status) not in STORED_STATUSES:
                    raise DeliveryError(
                        f"{self.name} refused an object (C-STORE status 0x{int(status.Status):04X})"
                    )
        finally:
            if assoc.is_established:
                assoc.release()


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server that takes STOW-RS into the study."""

    client: DicomWebClient

    @property
    def name(self) -> str:
        return f"stow:{self.client.url}"

    def send(self, files: Sequence[Path], study_uid: str) -> None:
        """STOW-RS every file into ``study_uid``.

        Raises:
            DeliveryError: the server was unreachable or refused an object.
        """
        try:
            self.client.store(list(files), study_uid=study_uid)
        except PacsError as exc:
            raise DeliveryError(f"{self.name}: {exc}") from exc


def parse_destination(text: str, calling_ae: str, timeout_s: float = 30.0) -> DimseDestination:
    """``AET@host:port`` (e.g. ``PACS@10.0.0.5:104``) as a :class:`DimseDestination`.

    Raises:
        InputError: not of that form, an invalid AE title or port.
    """
    match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)", text)
    if match is None:
        raise InputError(
            f"expected a destination as AET@host:port (e.g. PACS@127.0.0.1:104); got {text!r}",
            "--send-to",
        )
    port = int(match["port"])
    if not 0 < port < 65536:
        raise InputError(f"port must be in 1..65535; got {port}", "--send-to")
    return DimseDestination(
        check_ae_title(match["aet"], "--send-to"),
        match["host"].strip("[]"),
        port,
        calling_ae=calling_ae,
        timeout_s=timeout_s,
    )
