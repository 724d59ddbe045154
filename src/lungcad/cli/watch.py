"""``lungcad watch``: analyse new CT studies on a PACS and store the results back.

Polls the PACS (QIDO-RS) for CT studies not yet in the ledger under ``--state-dir``,
fetches each (WADO-RS), predicts, and stores a DICOM SEG and a Comprehensive 3D SR into the
same study (STOW-RS). Studies holding only SEG/SR (lungcad's own outputs among them) are never
candidates. ``--once`` does one pass and exits (tests, cron); ``--study UID`` processes the
named studies only.

A study still arriving on the PACS is not read half-sent: it is processed only once its
instance count has stayed unchanged for ``--settle-seconds`` (default 30; the ledger keeps the
counts, so the wait also spans ``--once`` runs). With ``--once``, studies still settling are
polled once more after their wait; any still changing then stay pending for the next run.

Exit codes: 0 all went well (or nothing to do), 1 a study failed (recorded; retried later),
2 bad input, 3 the PACS was unreachable (work stays pending).

Example::

    lungcad watch --checkpoint runs/best --pacs http://127.0.0.1:8042/dicom-web \\
        --user lungcad --password-file ~/.orthanc-pw --state-dir /var/lib/lungcad-watch
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from lungcad.cli._options import add_checkpoint_option, add_dicomweb_auth_options

NAME = "watch"
HELP = "analyse new CT studies on a PACS (DICOMweb) and store SEG + SR results back"

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_option(parser)
    parser.add_argument(
        "--pacs", required=True, help="DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web"
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="folder for the ledger of processed studies and working files",
    )
    auth = parser.add_argument_group("authentication (basic or bearer token)")
    add_dicomweb_auth_options(auth)
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between polls (default 10)"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="one pass (plus one re-poll of studies still settling), then exit",
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=30.0,
        help="process a study only once its instance count has not changed "
        "for this long, so a study still arriving is not read half-sent "
        "(default 30; 0 disables)",
    )
    parser.add_argument(
        "--study",
        action="append",
        metavar="UID",
        help="process only this StudyInstanceUID (repeatable); retries given-up studies too",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --study: process again even when already done"
    )
    parser.add_argument("--since", help="only studies with StudyDate on or after YYYYMMDD")
    pacs = parser.add_argument_group("PACS connection")
    pacs.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    pacs.add_argument(
        "--retries",
        type=int,
        default=5,
        help="attempts per request before the PACS counts as down (default 5)",
    )
    pacs.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="first retry pause in seconds; doubles per retry, with jitter",
    )
    pacs.add_argument("--max-backoff", type=float, default=30.0, help="cap on a retry pause")
    jobs = parser.add_argument_group("failed studies")
    jobs.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="failed attempts before a study is given up (default 5)",
    )
    jobs.add_argument(
        "--retry-after",
        type=float,
        default=60.0,
        help="seconds before a failed study is retried; doubles per failure",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")


def _secret(value: str | None, path: Path | None, name: str) -> str | None:
    from lungcad.errors import MissingInputError

    if path is None:
        return value
    if not path.is_file():
        raise MissingInputError(f"{name} file not found; create it holding only the {name}", path)
    return path.read_text(encoding="utf-8").strip()


def _client(args: argparse.Namespace):
    from lungcad.errors import InputError
    from lungcad.service.pacs.dicomweb import DicomWebClient, RetryPolicy

    password = _secret(args.password, args.password_file, "password")
    token = _secret(args.token, args.token_file, "token")
    if args.user and token:
        raise InputError("choose --user/--password or --token, not both", "--token")
    if args.user and not password:
        raise InputError(
            "--user needs --password, --password-file or $LUNGCAD_PACS_PASSWORD", "--password"
        )
    return DicomWebClient(
        args.pacs,
        username=args.user or None,
        password=password if args.user else None,
        token=None if args.user else token,
        timeout_s=args.timeout,
        retry=RetryPolicy(
            attempts=args.retries, base_delay_s=args.backoff, max_delay_s=args.max_backoff
        ),
    )


def _print_outcome(tag, result, error) -> None:
    """One line per study, naming it by its ledger tag (a UID identifies a patient)."""
    from lungcad.service.redact import redact

    if result is not None:
        if result.study_probability is None:  # no decision: say which and why
            decision = f"{str(result.status).upper()}: {result.reason}"
        else:
            status = result.status or (
                "cancer suspected" if result.is_cancer else "no cancer suspected"
            )
            decision = f"p={result.study_probability:.3f} {status}"
        again = " (earlier outputs re-sent)" if result.reused_outputs else ""
        print(
            f"done    {tag}: {decision}, {result.n_lesions} lesion(s); stored SEG + SR{again}",
            flush=True,
        )
    else:
        print(f"FAILED  {tag}: {redact(error)}", flush=True)


def run(args: argparse.Namespace) -> int:
    from lungcad.errors import InputError
    from lungcad.service.pacs.dicomweb import PacsError, PacsUnavailableError
    from lungcad.service.pacs.watch import StudyLedger, watch_round
    from lungcad.service.redact import redact, redact_log_handlers

    redact_log_handlers()  # library log lines (readers, PACS client) lose paths and UIDs

    if args.interval <= 0:
        raise InputError(f"--interval must be > 0 seconds; got {args.interval}", "--interval")
    if args.settle_seconds < 0:
        raise InputError(
            f"--settle-seconds must be >= 0; got {args.settle_seconds}", "--settle-seconds"
        )
    if args.force and not args.study:
        raise InputError("--force only applies to studies named with --study", "--force")
    if not Path(args.checkpoint).exists():
        from lungcad.errors import MissingInputError

        raise MissingInputError(
            "checkpoint run folder not found; pass the folder `lungcad train` wrote",
            args.checkpoint,
        )
    client = _client(args)

    def load_predictor():
        from lungcad.inference.predictor import Predictor

        log.info("loading the model from %s", args.checkpoint)
        return Predictor.from_checkpoint(
            args.checkpoint, device=args.device, num_threads=args.threads
        )

    predictor: list = []

    def predictor_once():  # loaded on first need, then kept across rounds
        if not predictor:
            predictor.append(load_predictor())
        return predictor[0]

    stop = threading.Event()

    def stop_after_this_study(*_: object) -> None:
        log.info("stopping after this study")
        stop.set()

    if not args.once and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Finish the study in hand, then leave: its result is recorded, nothing is lost.
            signal.signal(sig, stop_after_this_study)

    exit_code = 0
    settle_repoll_done = False  # --once: studies still settling get one more poll
    with (
        client,
        StudyLedger(
            args.state_dir, max_attempts=args.max_attempts, retry_after_s=args.retry_after
        ) as ledger,
    ):
        while True:
            try:
                report = watch_round(
                    client,
                    predictor_once,
                    ledger,
                    args.state_dir / "studies",
                    study_uids=args.study,
                    since=args.since,
                    force=args.force,
                    on_result=lambda uid, r, e: _print_outcome(ledger.tag(uid), r, e),
                    should_stop=stop.is_set,
                    settle_s=args.settle_seconds,
                )
            except PacsUnavailableError as exc:
                log.error("%s", redact(str(exc)))
                if args.once or args.study:
                    return EXIT_UNAVAILABLE
            except PacsError as exc:
                log.error("%s", redact(str(exc)))
                if args.once or args.study:
                    return EXIT_FAILED
            else:
                counts = ledger.counts()
                print(
                    f"round: {report.found} CT studies, {len(report.processed)} processed, "
                    f"{len(report.failed)} failed, {len(report.already_on_pacs)} already "
                    f"analysed, {len(report.settling)} still arriving; "
                    f"ledger: {dict(sorted(counts.items()))}",
                    flush=True,
                )
                if report.unavailable:
                    log.error("%s", redact(report.unavailable))
                    code = EXIT_UNAVAILABLE
                elif report.failed:
                    code = EXIT_FAILED
                else:
                    code = 0
                # --once with a re-poll keeps the worse outcome of its two rounds.
                exit_code = max(exit_code, code) if settle_repoll_done else code
                if (
                    args.once
                    and report.settling
                    and not report.unavailable
                    and not settle_repoll_done
                ):
                    settle_repoll_done = True
                    wait = max(report.settling.values())
                    log.info(
                        "%d study(ies) may still be arriving; polling again in %.1f s",
                        len(report.settling),
                        wait,
                    )
                    stop.wait(wait)
                    continue
            if args.once or args.study or stop.wait(args.interval):
                return exit_code
