"""``lungcad serve``: the REST service and web viewer for a trained run.

Examples::

    python -c "import secrets; print(secrets.token_urlsafe(32))" > tokens.txt; chmod 600 tokens.txt
    lungcad serve --checkpoint runs/cls --token-file tokens.txt --data-dir /srv/lungcad
    LUNGCAD_API_TOKENS=... lungcad serve --checkpoint runs/cls --port 8080

    curl -H "Authorization: Bearer $TOKEN" -F file=@study.zip http://127.0.0.1:8000/api/v1/studies

The service listens on loopback (127.0.0.1) by default; to serve a network, put it behind a
reverse proxy with TLS. Without a token it refuses to start (``--insecure-no-auth`` switches
authentication off, for a single-user machine only). Logs go to stderr; jobs, results and the
audit log to ``--data-dir``. See ``lungcad.service.app`` for the endpoints.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from lungcad.cli._options import add_checkpoint_option

NAME = "serve"
HELP = "run the REST service and web viewer for a trained run (loopback by default)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad serve``."""
    add_checkpoint_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--data-dir",
        default="lungcad-service",
        metavar="DIR",
        help="jobs, results and the audit log (default ./lungcad-service)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=(
            "API tokens, one per line, each optionally followed by client=NAME (the owner of "
            "its jobs) and role=admin (sees every job); also read: $LUNGCAD_API_TOKENS"
        ),
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="start without any token: authentication OFF (local tests only)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="job worker threads (1: inference is CPU-bound)"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=512.0, help="largest upload accepted (MB)"
    )
    parser.add_argument(
        "--max-unpacked-mb",
        type=float,
        default=2048.0,
        help="most data an upload may unpack to (MB)",
    )
    parser.add_argument("--max-files", type=int, default=2000, help="most files in a zip")
    parser.add_argument(
        "--queue-size", type=int, default=16, help="most jobs waiting at once (more get 503)"
    )
    parser.add_argument(
        "--backend", choices=("torch", "onnx"), default="torch", help="inference engine"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for inference (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument(
        "--retention-days",
        type=float,
        default=None,
        metavar="N",
        help="delete done/failed jobs (results hold patient data) N days after "
        "they finished, checked at start and hourly (default: keep)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve it until interrupted."""
    import uvicorn

    from lungcad.inference.predictor import Predictor
    from lungcad.service.app import ServiceSettings, create_app
    from lungcad.service.redact import redact_log_handlers

    # Library log lines (the DICOM reader names files and series) lose paths and UIDs.
    redact_log_handlers()

    settings = ServiceSettings.from_sources(
        args.data_dir,
        token_file=args.token_file,
        insecure_no_auth=args.insecure_no_auth,
        max_upload_mb=args.max_upload_mb,
        max_unpacked_mb=args.max_unpacked_mb,
        max_files=args.max_files,
        queue_size=args.queue_size,
        workers=args.workers,
        retention_days=args.retention_days,
    )
    settings.validate()  # before the model loads: a missing token fails in a second
    if not _is_loopback(args.host):
        log.warning("listening on %s, not loopback: serve it only behind TLS", args.host)
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=args.device, backend=args.backend, num_threads=args.threads
    )
    if not predictor.classifier_trained:
        print(
            "segmentation-only run: no trained cancer classifier; every result gives tumour "
            "masks and the finding 'no classifier', never a cancer decision",
            flush=True,
        )
    if not predictor.decoder_trained:
        print("this run's decoder is untrained: results give no tumour masks", flush=True)
    app = create_app(predictor, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"lungcad service: http://{host}:{args.port}/ (API docs: /docs; data: "
        f"{settings.data_dir}; {len(settings.tokens)} token(s))",
        flush=True,
    )
    # log_config=None: uvicorn logs through the root logger that the CLI set up (stderr).
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    from lungcad.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
