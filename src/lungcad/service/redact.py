"""Keeping patient data out of logs and error messages: redacted text, short study hashes.

What a service or watcher log line, or an error message returned by the API, may not hold:
server paths (they name job folders and, for uploads, the files a client sent), uploaded file
names, and raw DICOM UIDs (a StudyInstanceUID identifies a patient's examination across
systems). Exception text can hold any of these (a reader names the file it failed on, a PACS
error names the study), so it never goes into a log or a response as it is:

* :func:`redact` replaces the paths under known folders by a short name (``upload``), the
  names of the files in them (:func:`names_under`: a reader's message may name a file without
  its folder) by ``<file>``, every other absolute path by ``<path>`` and every DICOM UID by
  ``<uid>``;
* :func:`describe` is an exception as ``"TypeName: redacted message"``, at most
  :data:`MAX_MESSAGE` characters: what a log line or an API error says about a failure;
* :func:`study_tag` names a study in a log line by the first 12 hex digits of the same salted
  SHA-256 the audit log records (:meth:`lungcad.service.audit.AuditLog.hash_uid`), so an
  auditor who holds the UID and the install's salt can find its lines, and nobody else can
  match them to a UID;
* :class:`RedactingFormatter` is the safety net for the lines of libraries (``lungcad.io``
  names the files and series it reads, pydicom and uvicorn their own): ``lungcad serve`` and
  ``lungcad watch`` format every log line through it (:func:`redact_log_handlers`), which
  takes paths and UIDs out of the finished line, tracebacks included.

The full exception text, where it is kept at all, goes only to a protected place (a job's
``error.txt`` in the service's data folder, mode 0700; the watcher's ledger in its state
folder).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

__all__ = [
    "MAX_MESSAGE",
    "UID_PATTERN",
    "RedactingFormatter",
    "describe",
    "names_under",
    "redact",
    "redact_log_handlers",
    "study_tag",
]

#: Longest redacted message kept (a reader's message is one line; a traceback is not).
MAX_MESSAGE = 300
#: A DICOM UID: digits in at least five dot-separated parts (real UIDs have many more; four
#: would catch IPv4 addresses, three version numbers).
UID_PATTERN = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
# The rest of a path after a folder: up to white space, a quote or a separator of prose.
_PATH_TAIL = r"""(?:[/\\][^\s'"`,;:()\[\]{}<>]*)?"""
#: Folder -> the name that replaces it and everything below it (see :func:`redact`).
Folders = Mapping[Path, str] | Mapping[str, str]
# An absolute POSIX path that is not part of a URL, a relative path or a fraction, nor one of
# the service's own URL paths (uvicorn's access log: job ids and output names, no patient data).
_ABSOLUTE_PATH = re.compile(
    r"""(?<![\w:/.~-])/(?!api/v\d+/|static/|(?:health|ready|docs|redoc|openapi\.json)\b)"""
    r"""[^\s'"`,;:()\[\]{}<>]+"""
)


def names_under(folder: str | Path) -> set[str]:
    """The names (and stems) of the files and folders below ``folder``, for :func:`redact`.

    Names shorter than 3 characters or made of digits only are left out: replacing ``1`` or
    ``01`` everywhere would garble a message's numbers, and such names say nothing of anyone.
    """
    names: set[str] = set()
    for path in Path(folder).rglob("*"):
        names.update({path.name, path.stem})
    return {n for n in names if len(n) >= 3 and not n.isdigit()}


def redact(text: str, folders: Folders | None = None, names: Collection[str] = ()) -> str:
    """``text`` with server paths, upload file names and DICOM UIDs taken out.

    Args:
        text: a message (e.g. ``str(exception)``).
        folders: folder -> the name that replaces it *and everything below it*
            (``{job/"upload": "upload"}``: ``/srv/jobs/1f../upload/DOE_J/IM1.dcm: bad`` becomes
            ``upload: bad``, so a client's own file names are not repeated either). Both the
            folder as given and resolved are recognised.
        names: file names to replace by ``<file>`` wherever they stand alone (not inside a
            longer name), e.g. :func:`names_under` of an upload.

    Returns:
        The redacted text: remaining absolute paths become ``<path>``, UIDs ``<uid>``.
    """
    forms: dict[str, str] = {}
    items: list[tuple[str | Path, str]] = list((folders or {}).items())
    for folder, name in items:
        for form in {str(folder), str(Path(folder).resolve())}:
            forms[form.rstrip("/")] = name
    for form in sorted(forms, key=len, reverse=True):  # longest first: nested folders
        # The name escaped: a plain replacement string would read its backslashes as escapes.
        text = re.sub(re.escape(form) + _PATH_TAIL, forms[form].replace("\\", "\\\\"), text)
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", "<file>", text)
    text = _ABSOLUTE_PATH.sub("<path>", text)
    return UID_PATTERN.sub("<uid>", text)


def describe(
    exc: BaseException, folders: Folders | None = None, names: Collection[str] = ()
) -> str:
    """An exception for a log line or an API error: ``"TypeName: redacted message"``.

    Args:
        exc: the exception.
        folders, names: as for :func:`redact`.

    Returns:
        One line of at most :data:`MAX_MESSAGE` characters (longer ones end in ``...``).
    """
    message = " ".join(redact(str(exc), folders, names).split())  # one line
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def study_tag(uid: str | None, salt: bytes) -> str:
    """A study's name in log lines: ``"sha256:<12 hex>"`` of ``salt + uid``, or ``"-"``.

    The 12 digits are the start of the audit log's study hash for the same salt (see the module
    notes); 48 bits tell a site's studies apart in its logs without being reversible.
    """
    if not uid:
        return "-"
    return "sha256:" + hashlib.sha256(bytes(salt) + str(uid).encode("utf-8")).hexdigest()[:12]


class RedactingFormatter(logging.Formatter):
    """Formats a record with another formatter, then :func:`redact` s the whole line.

    Records are not changed (other handlers see them as they were); the finished text,
    exception and stack text included, loses its absolute paths and UIDs.

    Args:
        inner: the formatter whose output is redacted (None: ``logging.Formatter()``).
    """

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_log_handlers(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Make ``handlers`` (default: the root logger's) format through :class:`RedactingFormatter`.

    Called by the service and watcher commands after the CLI set up logging; the library never
    configures logging itself.
    """
    for handler in list(logging.getLogger().handlers if handlers is None else handlers):
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
