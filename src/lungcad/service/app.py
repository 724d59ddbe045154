"""The lungcad REST service: upload a chest CT, get tumour masks, a decision and a viewer.

``create_app(predictor, settings)`` returns a FastAPI app; ``lungcad serve`` runs it with
uvicorn. Endpoints (all under ``/api`` need ``Authorization: Bearer <token>``; the OpenAPI
description is at ``/openapi.json``, interactive docs at ``/docs`` and ``/redoc``). The only
routes open without a token are :data:`PUBLIC_PATHS` (health, readiness, the viewer's page and
its static files, the API description); they carry no patient data::

    GET  /health                              {"status": "ok"} (no auth)
    GET  /ready                               200 {"ready": true, ...} when the model is loaded
                                              and the queue accepts work, else 503
    GET  /, /static/*                         the web viewer (no auth; it asks for a token)
    GET  /api/v1/model                        model info and intended use
    POST /api/v1/studies                      multipart "file": .zip of one DICOM series or
                                              .nii/.nii.gz -> 202 {"job_id", "status"};
                                              400 corrupt / not CT, 413 too large or too many
                                              files, 503 queue full
    GET  /api/v1/jobs                         the caller's jobs' status, newest first (an
                                              admin: every job, with its "owner")
    GET  /api/v1/jobs/{id}                    {"job_id", "status", "error", "created_at",
                                              "started_at", "finished_at"}
    DELETE /api/v1/jobs/{id}                  remove a done or failed job and its results ->
                                              204; 409 while queued or running
    GET  /api/v1/jobs/{id}/result             the result document (409 until done)
    GET  /api/v1/jobs/{id}/files/{name}       mask.nii.gz, seg.dcm, sr.dcm, report.html, ...
    GET  /api/v1/jobs/{id}/slices/{z}.png     axial slice, ?window=lung|mediastinal|bone
                                              &overlay=0|1&cam=0|1

A job belongs to the client whose token submitted it (``lungcad.service.auth``): only that
client, or an admin, sees it in the list or reads, renders or deletes it; to anybody else it
answers 404, as an unknown job does, so its existence does not leak. Every response under
``/api`` carries ``Cache-Control: no-store`` (results, slices, masks, reports and job lists are
patient data), and errors never carry server paths, uploaded file names, UIDs or raw exception
text (``lungcad.service.redact``).

Jobs start and stop with the app's lifespan: under uvicorn that is automatic; with
``fastapi.testclient.TestClient`` use it as a context manager (``with TestClient(app) as c:``),
otherwise no worker runs and ``/ready`` says 503.
"""

from __future__ import annotations

import logging
import mimetypes
import re
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lungcad import __version__
from lungcad.errors import InputError
from lungcad.service.audit import AuditLog
from lungcad.service.auth import ANONYMOUS, bearer_dependency, load_clients, token_id
from lungcad.service.jobs.manager import JobManager
from lungcad.service.jobs.schema import API_PREFIX, JobStatus, is_job_id
from lungcad.service.jobs.store import RESULT_FILE, JobBusy
from lungcad.service.jobs.workers import QueueFull
from lungcad.service.redact import describe
from lungcad.service.rendering import SliceRenderer
from lungcad.service.uploads import UploadRejected, prepare_study, receive_upload

log = logging.getLogger(__name__)

__all__ = ["PUBLIC_PATHS", "STATIC_DIR", "ServiceSettings", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"
# The viewer is ES modules, which browsers run only when served with a JavaScript MIME type;
# StaticFiles takes the type from the system's MIME table, which on some systems maps .js to
# text/plain, so the right one is registered here.
mimetypes.add_type("text/javascript", ".js")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MEDIA_TYPES = {
    ".dcm": "application/dicom",
    ".gz": "application/gzip",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
}
_NO_STORE = "no-store"
#: The routes that need no token (every other one does; tests/service/test_privacy.py checks
#: every route of the app against this list).
PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/",
        "/static",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)


@dataclass
class ServiceSettings:
    """How the service runs.

    Attributes:
        data_dir: jobs, uploads, results and the audit log live here (see ``service.jobs.store``).
        tokens: accepted API tokens (:func:`lungcad.service.auth.load_clients`).
        clients: token -> client id, the owner of the jobs the token submits; a token not
            named here is its own client, :func:`lungcad.service.auth.token_id`.
        admins: client ids with the admin role: they see, read and delete every client's
            jobs (a token file's ``role=admin``). With authentication off the one user,
            ``anonymous``, is an admin.
        insecure_no_auth: allow starting with no token, which switches authentication off.
            Only for a single-user machine; never on a network.
        max_upload_mb: largest request body accepted (MB).
        max_unpacked_mb: most bytes a zip may unpack to, or a NIfTI may declare (MB).
        max_files: most files in an uploaded zip.
        queue_size: most jobs waiting at once; more get 503.
        workers: worker threads (1: inference is CPU-bound and multi-threaded already).
        model_version: recorded with results and in the audit log; default
            ``<lungcad version>+<checkpoint sha256[:12]>``.
        retention_days: done and failed jobs (results hold patient data) are deleted this many
            days after they finished; None keeps them until deleted through the API.
        retention_check_s: seconds between retention sweeps (one also runs at start).
    """

    data_dir: Path
    tokens: frozenset[str] = field(default_factory=frozenset)
    clients: Mapping[str, str] = field(default_factory=dict)
    admins: frozenset[str] = field(default_factory=frozenset)
    insecure_no_auth: bool = False
    max_upload_mb: float = 512.0
    max_unpacked_mb: float = 2048.0
    max_files: int = 2000
    queue_size: int = 16
    workers: int = 1
    model_version: str | None = None
    retention_days: float | None = None
    retention_check_s: float = 3600.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.tokens = frozenset(self.tokens)
        self.clients = dict(self.clients)
        self.admins = frozenset(self.admins)

    @classmethod
    def from_sources(
        cls,
        data_dir: str | Path,
        *,
        token_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ServiceSettings:
        """Settings with tokens, clients and admins read from ``token_file`` and
        ``LUNGCAD_API_TOKENS`` (see :func:`lungcad.service.auth.load_clients`).

        Args:
            data_dir: the data folder.
            token_file: optional token file (one token per line, optionally with
                ``client=NAME`` and ``role=admin``).
            env: environment to read the variable from (default ``os.environ``).
            **options: the other attributes (``admins`` adds to the token file's admins).
        """
        clients = load_clients(token_file, env)
        admins = {c.client_id for c in clients.values() if c.admin}
        return cls(
            data_dir=Path(data_dir),
            tokens=frozenset(clients),
            clients={token: c.client_id for token, c in clients.items()},
            admins=frozenset(admins | set(options.pop("admins", ()))),
            **options,
        )

    def validate(self) -> None:
        """Refuse unusable settings.

        Raises:
            InputError: no token without ``insecure_no_auth``; non-positive limits.
        """
        if not self.tokens and not self.insecure_no_auth:
            raise InputError(
                "no API token configured; the service refuses to expose patient data without "
                "authentication. Pass --token-file FILE (one token per line) or set "
                "LUNGCAD_API_TOKENS; for a local single-user test only, --insecure-no-auth",
                "tokens",
            )
        unknown = sorted(self.admins - set(self.client_ids().values()))
        if unknown and self.auth_enabled:
            raise InputError(
                f"{', '.join(unknown)} is no configured client; an admin must be the client id "
                "of a token (`client=NAME` in the token file, or the token's tok-... id)",
                "admins",
            )
        for name in ("max_upload_mb", "max_unpacked_mb", "max_files", "queue_size", "workers"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0; got {getattr(self, name)}", name)
        if self.retention_days is not None and not self.retention_days > 0:
            raise InputError(
                f"must be > 0 days (or unset to keep results); got {self.retention_days}",
                "retention_days",
            )
        if not self.retention_check_s > 0:
            raise InputError(
                f"must be > 0 seconds; got {self.retention_check_s}", "retention_check_s"
            )

    @property
    def auth_enabled(self) -> bool:
        """False only when started with no token and ``insecure_no_auth``."""
        return bool(self.tokens)

    def client_ids(self) -> dict[str, str]:
        """Token -> the client id that owns its jobs (see ``clients``)."""
        return {token: self.clients.get(token) or token_id(token) for token in self.tokens}

    def is_admin(self, client_id: str) -> bool:
        """True for a client with the admin role (and for everyone with auth off)."""
        return client_id in self.admins or (not self.auth_enabled and client_id == ANONYMOUS)


def model_version_of(info: Mapping[str, Any]) -> str:
    """``<lungcad version>+<checkpoint sha256[:12]>`` (the version DICOM outputs carry)."""
    sha = info.get("checkpoint_sha256") or ""
    version = info.get("lungcad_version") or __version__
    return f"{version}+{sha[:12]}" if sha else str(version)


class _SecurityHeaders:
    """Pure-ASGI middleware: no MIME sniffing, no referrer, no framing by other sites, and no
    API response stored by any cache (each one is patient data, or says which jobs exist).

    ``no-store`` replaces whatever an endpoint set: a slice kept in a browser cache would
    outlive ``DELETE /api/v1/jobs/{id}``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "SAMEORIGIN")
                if api:
                    headers["Cache-Control"] = _NO_STORE
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _SafeErrors:
    """Pure-ASGI middleware: an unhandled exception becomes a plain 500 and one log line with
    the exception's type and redacted message (``lungcad.service.redact``), instead of a
    traceback in the server's log whose text may name an uploaded file or a study."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            # The route template, not the path: no job ids or file names in this line.
            route = getattr(scope.get("route"), "path", "?")
            log.error("unhandled error in %s %s: %s", scope["method"], route, describe(exc))
            if started:  # the client sees a cut-off response; nothing more can be sent
                return
            response = JSONResponse(
                {"detail": "internal error; the service's log has its type"},
                status_code=500,
                headers={"Cache-Control": _NO_STORE},
            )
            await response(scope, receive, send)


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "a .zip of one DICOM CT series, or a .nii/.nii.gz CT volume",
                    }
                },
            }
        }
    },
}


def create_app(predictor: Any, settings: ServiceSettings) -> FastAPI:
    """The service app for a predictor (see the module notes for the endpoints).

    Args:
        predictor: a :class:`lungcad.inference.predictor.Predictor`, or anything with its
            ``info`` and ``predict_volume(volume) -> StudyResult``.
        settings: limits, tokens and the data folder.

    Returns:
        The FastAPI app; its lifespan starts and stops the job workers.

    Raises:
        InputError: invalid settings (e.g. no token and no ``insecure_no_auth``).
    """
    from lungcad.inference.outputs import SERVER_PATH_KEYS
    from lungcad.inference.predictor import INTENDED_USE

    settings.validate()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = dict(predictor.info)
    model_version = settings.model_version or model_version_of(info)
    model_doc = {k: v for k, v in info.items() if k not in SERVER_PATH_KEYS}
    model_doc["model_version"] = model_version
    model_doc.setdefault("intended_use", INTENDED_USE)
    audit = AuditLog.open(settings.data_dir)
    jobs = JobManager(
        settings.data_dir,
        predictor,
        audit,
        model_version=model_version,
        workers=settings.workers,
        queue_size=settings.queue_size,
        retention_days=settings.retention_days,
        sweep_interval_s=settings.retention_check_s,
    )
    require_token = bearer_dependency(settings.client_ids(), enabled=settings.auth_enabled)
    if not settings.auth_enabled:
        log.warning(
            "authentication is OFF (--insecure-no-auth): anyone who can reach this "
            "port can read patient data"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        audit.record("service_started", user="system", model_version=model_version)
        try:
            yield
        finally:
            jobs.stop()
            audit.record("service_stopped", user="system", model_version=model_version)

    app = FastAPI(
        title="lungcad",
        version=__version__,
        lifespan=lifespan,
        description="Lung-cancer CAD for chest CT. " + INTENDED_USE,
    )
    app.add_middleware(_SafeErrors)  # inside the headers: its 500 gets them too
    app.add_middleware(_SecurityHeaders)
    app.state.settings, app.state.jobs, app.state.audit = settings, jobs, audit
    app.state.predictor = predictor

    # ---------------------------------------------------------------- open endpoints

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["service"], responses={503: {"description": "not ready"}})
    def ready() -> JSONResponse:
        """Readiness: the model is loaded, workers run and the queue accepts work."""
        counts = jobs.counts()
        if jobs.workers.accepting():
            return JSONResponse({"ready": True, "model_version": model_version, **counts})
        reason = "queue full" if jobs.workers.running else "job workers not running"
        return JSONResponse(
            {"ready": False, "reason": reason, **counts},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise HTTPException(404, "the web viewer is not installed (no static/index.html)")
        return FileResponse(page, media_type="text/html; charset=utf-8")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---------------------------------------------------------------- API (token required)

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)])
    unauthorized: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing or invalid bearer token"}
    }

    def known_job(job_id: str, user: str) -> dict[str, Any]:
        """The job's public status, if ``user`` may see it; else 404 (also for another
        client's job: a 403 would tell that the job exists)."""
        owner = jobs.store.owner(job_id) if is_job_id(job_id) else None
        job = jobs.store.public(job_id) if owner is not None else None
        if job is None or not (owner == user or settings.is_admin(user)):
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def done_job(job_id: str, user: str) -> Path:
        job = known_job(job_id, user)
        if job["status"] == JobStatus.FAILED:
            raise HTTPException(409, f"job failed: {job['error']}")
        if job["status"] != JobStatus.DONE:
            raise HTTPException(
                409,
                f"job is {job['status']}; poll GET {API_PREFIX}/jobs/{job_id} until its status "
                "is done",
            )
        return jobs.store.job_dir(job_id)

    def record_access(action: str, user: str, job_id: str, file: str | None = None) -> None:
        """Audit a read of a job's results (who saw which study's result or file)."""
        state = jobs.store.get(job_id) or {}  # {} when deleted since the request started
        audit.record(
            action,
            user=user,
            job_id=job_id,
            file=file,
            study=state.get("study"),
            model_version=model_version,
        )

    @api.get("/model", tags=["model"], responses=unauthorized)
    def model() -> dict[str, Any]:
        """The model: name, versions, config hash, checkpoint SHA-256, threshold, intended use."""
        return model_doc

    @api.post(
        "/studies",
        tags=["jobs"],
        status_code=202,
        openapi_extra={"requestBody": _UPLOAD_BODY},
        responses={
            **unauthorized,
            400: {"description": "corrupt upload or not a CT series"},
            413: {"description": "upload too large or too many files"},
            503: {"description": "queue full; retry later"},
        },
    )
    async def submit_study(request: Request, user: str = Depends(require_token)) -> JSONResponse:
        """Queue a study: multipart field ``file`` = .zip of one DICOM series or .nii/.nii.gz."""
        if not jobs.workers.accepting():
            audit.record("upload_rejected", user=user, reason="queue_full", status=503)
            raise HTTPException(
                503, "the queue is full; retry later", headers={"Retry-After": "30"}
            )
        staging = jobs.store.new_staging_dir()
        try:
            upload = await receive_upload(
                dict(request.headers),
                request.stream(),
                staging,
                int(settings.max_upload_mb * 2**20),
            )
            input_info = await run_in_threadpool(
                prepare_study,
                upload,
                max_files=settings.max_files,
                max_unpacked_bytes=int(settings.max_unpacked_mb * 2**20),
            )
            job = jobs.workers.submit(staging, input_info, user)
        except UploadRejected as exc:
            audit.record("upload_rejected", user=user, reason=exc.reason, status=exc.status_code)
            raise HTTPException(exc.status_code, exc.message) from None
        except QueueFull as exc:
            audit.record("upload_rejected", user=user, reason="queue_full", status=503)
            raise HTTPException(503, str(exc), headers={"Retry-After": "30"}) from None
        finally:
            if staging.exists():  # moved into jobs/ on success
                shutil.rmtree(staging, ignore_errors=True)
        return JSONResponse(
            {"job_id": job["job_id"], "status": job["status"]},
            status_code=202,
            headers={"Location": f"{API_PREFIX}/jobs/{job['job_id']}"},
        )

    @api.get("/jobs", tags=["jobs"], responses=unauthorized)
    def list_jobs(user: str = Depends(require_token)) -> list[dict[str, Any]]:
        """The caller's jobs' status, newest first (an admin: every job, with its owner)."""
        if settings.is_admin(user):
            return jobs.store.list_public(show_owner=True)
        return jobs.store.list_public(owner=user)

    @api.get("/jobs/{job_id}", tags=["jobs"], responses={**unauthorized, 404: {}})
    def job_status(job_id: str, user: str = Depends(require_token)) -> dict[str, Any]:
        """One job's status: queued, running, done or failed (with the error)."""
        return known_job(job_id, user)

    @api.delete(
        "/jobs/{job_id}",
        tags=["jobs"],
        status_code=204,
        response_class=Response,
        responses={
            **unauthorized,
            404: {"description": "unknown job"},
            409: {"description": "job is queued or running"},
        },
    )
    def delete_job(job_id: str, user: str = Depends(require_token)) -> Response:
        """Delete a done or failed job with its results (SEG, SR, findings: patient data)."""
        known_job(job_id, user)
        try:
            jobs.delete(job_id, user=user)
        except KeyError:  # deleted by another request or the retention sweep meanwhile
            raise HTTPException(404, f"no job {job_id!r}") from None
        except JobBusy as exc:
            raise HTTPException(409, str(exc)) from None
        return Response(status_code=204)

    @api.get(
        "/jobs/{job_id}/result", tags=["results"], responses={**unauthorized, 404: {}, 409: {}}
    )
    def job_result(job_id: str, user: str = Depends(require_token)) -> FileResponse:
        """Probability, decision, threshold, per-slice probabilities, lesions, file links."""
        folder = done_job(job_id, user)
        record_access("result_viewed", user, job_id)
        return FileResponse(folder / RESULT_FILE, media_type="application/json")

    @api.get(
        "/jobs/{job_id}/files/{name}",
        tags=["results"],
        responses={**unauthorized, 404: {}, 409: {}},
    )
    def job_file(job_id: str, name: str, user: str = Depends(require_token)) -> FileResponse:
        """Download an output (mask.nii.gz, probability.nii.gz, seg.dcm, sr.dcm, ...)."""
        folder = done_job(job_id, user) / "outputs"
        path = folder / name
        if not _FILE_NAME.fullmatch(name) or not path.is_file():
            names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            raise HTTPException(404, f"no output {name!r}; this job has {', '.join(names)}")
        record_access("file_downloaded", user, job_id, file=name)
        suffix = path.suffix.lower()
        return FileResponse(
            path, filename=name, media_type=_MEDIA_TYPES.get(suffix, "application/octet-stream")
        )

    @api.get(
        "/jobs/{job_id}/slices/{z}.png",
        tags=["results"],
        response_class=Response,
        responses={**unauthorized, 200: {"content": {"image/png": {}}}, 404: {}, 409: {}},
    )
    def job_slice(
        job_id: str,
        z: int,
        window: Literal["lung", "mediastinal", "bone"] = "lung",
        overlay: bool = True,
        cam: bool = False,
        user: str = Depends(require_token),
    ) -> Response:
        """Axial slice ``z`` as PNG (radiological view), mask in red, optional Grad-CAM."""
        renderer = SliceRenderer(done_job(job_id, user) / "render")
        try:
            png = renderer.png(z, window=window, overlay=overlay, cam=cam)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": _NO_STORE})

    app.include_router(api)
    return app
