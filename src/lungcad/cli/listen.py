"""``lungcad listen``: a DICOM node that receives CT studies, analyses them, sends results back.

A C-STORE SCP (pynetdicom) under ``--ae-title`` on ``--bind``:``--port`` takes associations
only from the calling AE titles named with ``--allow``, and answers C-ECHO. Each CT instance is
written to ``--state-dir`` as it arrives, grouped by study. A study is analysed once no new
instance has come for ``--settle-seconds``; its DICOM SEG and SR (and any other DICOM result
lungcad writes) go by C-STORE to every ``--send-to AET@host:port`` and/or by STOW-RS to
``--stow URL``. A destination that is down is retried with a doubling pause (``--retry-after``,
capped at ``--max-retry-after``) and nothing is dropped: the ledger in ``--state-dir``
(SQLite) keeps the queue, so a restart neither loses nor repeats a study. Once every
destination has the results, the received images are deleted (``--keep-images`` keeps them).

Logs and the printed lines name a study by a salted hash (its tag in the ledger), never by
UID, patient name or path. SIGTERM or Ctrl-C stops it after the study in hand.

Examples::

    # a modality or PACS sends to LUNGCAD@this-host:11112; results go back to the PACS
    lungcad listen --checkpoint runs/cls --state-dir /var/lib/lungcad-listen \\
        --ae-title LUNGCAD --bind 0.0.0.0 --port 11112 --allow PACS --allow CT01 \\
        --send-to PACS@10.0.0.5:104

    # results by STOW-RS to the PACS's DICOMweb root instead
    lungcad listen --checkpoint runs/cls --state-dir state --allow ORTHANC \\
        --stow http://127.0.0.1:8042/dicom-web --user lungcad --password-file pw.txt
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from lungcad.cli._options import add_checkpoint_option, add_dicomweb_auth_options

NAME = "listen"
HELP = "receive CT studies by DICOM C-STORE, analyse them, send SEG + SR back (C-STORE/STOW)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_option(parser)
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="folder of the ledger, the received studies and their results",
    )
    node = parser.add_argument_group("DICOM node")
    node.add_argument("--ae-title", default="LUNGCAD", help="lungcad's AE title (default LUNGCAD)")
    node.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    node.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    node.add_argument(
        "--allow",
        action="append",
        required=True,
        metavar="AET",
        help="calling AE title that may send studies (repeatable; others are rejected)",
    )
    out = parser.add_argument_group("where results go")
    out.add_argument(
        "--send-to",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="C-STORE the results to this DICOM node (repeatable)",
    )
    out.add_argument("--stow", metavar="URL", help="STOW-RS the results to this DICOMweb root")
    add_dicomweb_auth_options(out, "STOW-RS: ")
    out.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request or association"
    )
    work = parser.add_argument_group("analysis and retries")
    work.add_argument(
        "--settle-seconds",
        type=float,
        default=30.0,
        help="analyse a study once no instance of it has arrived for this long (default 30)",
    )
    work.add_argument(
        "--retry-after",
        type=float,
        default=30.0,
        help="seconds before a failed delivery or analysis is retried; doubles per failure",
    )
    work.add_argument(
        "--max-retry-after", type=float, default=900.0, help="cap on that pause (default 900)"
    )
    work.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="failed analyses before a study is given up (default 3; deliveries never are)",
    )
    work.add_argument(
        "--keep-images", action="store_true", help="keep the received images after delivery"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")


def _destinations(args: argparse.Namespace) -> list:
    from lungcad.errors import InputError
    from lungcad.service.dimse.sender import StowDestination, parse_destination

    found: list = [parse_destination(d, args.ae_title, args.timeout) for d in args.send_to]
    if args.stow:
        from lungcad.cli.watch import _client

        # Few attempts per request: the ledger retries the whole delivery later.
        args.pacs, args.retries, args.backoff, args.max_backoff = args.stow, 2, 0.5, 2.0
        found.append(StowDestination(_client(args)))
    elif args.user or args.password_file or args.token_file:
        raise InputError("--user, --password-file and --token-file go with --stow", "--stow")
    return found


def run(args: argparse.Namespace) -> int:
    from lungcad.errors import InputError, MissingInputError
    from lungcad.service.dimse.ledger import ListenLedger
    from lungcad.service.dimse.listener import Listener
    from lungcad.service.dimse.scp import StoreSCP

    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be in 0..65535; got {args.port}", "--port")
    if not Path(args.checkpoint).exists():
        raise MissingInputError(
            "checkpoint run folder not found; pass the folder `lungcad train` wrote",
            args.checkpoint,
        )
    from lungcad.service.dimse.sender import check_ae_title

    for title in [args.ae_title, *args.allow]:  # before anything is created
        check_ae_title(title, "--allow" if title in args.allow else "--ae-title")
    destinations = _destinations(args)
    if not destinations:
        log.warning("no --send-to or --stow: results stay in %s only", "the state folder")
    from lungcad.service.dimse.listener import RedactingFilter

    # pynetdicom narrates every association at INFO and dumps UIDs at DEBUG: warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # no UID or path in any line of this log
        handler.addFilter(RedactingFilter())

    def load_predictor():
        from lungcad.inference.predictor import Predictor

        log.info("loading the model")
        return Predictor.from_checkpoint(
            args.checkpoint, device=args.device, num_threads=args.threads
        )

    def on_event(kind: str, tag: str, text: str) -> None:
        print(f"{kind:<9} study {tag}{': ' + text if text else ''}", flush=True)

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Finish the study in hand, then leave: the ledger holds the rest.
            signal.signal(sig, lambda *_: stop.set())
    with ListenLedger(
        args.state_dir,
        max_attempts=args.max_attempts,
        retry_after_s=args.retry_after,
        max_retry_after_s=args.max_retry_after,
    ) as ledger:
        scp = StoreSCP(
            ledger,
            args.state_dir / "incoming",
            ae_title=args.ae_title,
            host=args.bind,
            port=args.port,
            allowed=args.allow,
        )
        listener = Listener(
            load_predictor,
            ledger,
            scp,
            args.state_dir,
            destinations,
            settle_s=args.settle_seconds,
            keep_images=args.keep_images,
            on_event=on_event,
        )
        try:
            scp.start()
        except OSError as exc:
            raise InputError(
                f"cannot listen on {args.bind}:{args.port} ({exc.strerror or exc}); "
                "choose another --port or stop what uses it",
                "--port",
            ) from exc
        counts = dict(sorted(ledger.counts().items()))
        print(
            f"listening as {scp.ae_title} on {args.bind}:{scp.port}; "
            f"{len(destinations)} destination(s); ledger: {counts}",
            flush=True,
        )
        listener.serve(stop, poll_s=min(1.0, max(0.1, args.settle_seconds / 4)))
        print(f"stopped; ledger: {dict(sorted(ledger.counts().items()))}", flush=True)
    return 0
