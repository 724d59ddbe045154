"""Bearer-token authentication for everything under ``/api``, and who owns which job.

Tokens are opaque random strings (e.g. ``python -c "import secrets;
print(secrets.token_urlsafe(32))"``), read from a token file and/or the ``LUNGCAD_API_TOKENS``
environment variable (separated by commas or whitespace). The service never stores or logs a
token: a caller is named by its *client id*, which owns the jobs it submits.

A token file has one token per line (blank lines and ``#`` comments ignored), optionally
followed by ``client=NAME`` and ``role=admin``::

    # token                                     client id          role
    3q2-7lq0Q8kqzJ1pDSf9Gk8kVvJk2Rk1X3y9l0xUQw  client=ris-gateway
    p0Vb7cdu1cS3w5bcVjG7r8iC9qDfX0aAqBnZ1aI3mE  client=ris-gateway  # rotated: same jobs
    Zr1bm0b7cZkC8wq3E0yq2hX5gWn8uYt6fPqL4sKdVc  client=it-admin     role=admin

Without ``client=``, the client id is :func:`token_id`, a short SHA-256 prefix of the token
(``tok-...``) that identifies it without revealing it. Tokens that share a client id share its
jobs (so a token can be replaced without losing them). ``role=admin`` lets a client see, read
and delete every client's jobs; the others see only their own.

Comparison is constant-time: the SHA-256 digest of the presented token is compared with
``hmac.compare_digest`` against the digest of every configured token (all of them, so timing
says nothing about which one matched or how much of one did).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lungcad.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

__all__ = [
    "ADMIN_ROLE",
    "ANONYMOUS",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "ApiClient",
    "bearer_dependency",
    "load_clients",
    "load_tokens",
    "token_id",
]

TOKEN_ENV = "LUNGCAD_API_TOKENS"
#: Shorter tokens are refused: a token is the only thing between the network and patient data.
MIN_TOKEN_LENGTH = 16
#: The user name recorded when authentication is switched off (``--insecure-no-auth``).
ANONYMOUS = "anonymous"
#: The role that sees every client's jobs.
ADMIN_ROLE = "admin"
ROLES = ("client", ADMIN_ROLE)
#: A client id named in a token file: short, printable, safe in logs and JSON.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class ApiClient:
    """Who a token belongs to.

    Attributes:
        client_id: owns the jobs this token submits (named in logs and the audit log).
        admin: sees, reads and deletes every client's jobs.
    """

    client_id: str
    admin: bool = False


def token_id(token: str) -> str:
    """A loggable name for a token: ``"tok-"`` + the first 10 hex digits of its SHA-256."""
    return "tok-" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:10]


def _check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputError(
            f"an API token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "random characters, e.g. from "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`',
            where,
        )
    return token


def _parse_line(line: str, where: str) -> tuple[str, ApiClient]:
    """``TOKEN [client=NAME] [role=client|admin]`` (a trailing ``# comment`` allowed)."""
    fields = line.split("#", 1)[0].split()
    token = _check_token(fields[0], where)
    client_id, role = token_id(token), "client"
    for option in fields[1:]:
        key, sep, value = option.partition("=")
        if key == "client" and sep and CLIENT_ID_PATTERN.fullmatch(value):
            client_id = value
        elif key == "role" and sep and value in ROLES:
            role = value
        else:
            raise InputError(
                f"cannot read {option!r} after the token; expected `client=NAME` (letters, "
                f"digits, _.@-, at most 64) and/or `role=client` or `role={ADMIN_ROLE}`",
                where,
            )
    return token, ApiClient(client_id, admin=role == ADMIN_ROLE)


def load_clients(
    token_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> dict[str, ApiClient]:
    """The API tokens and their clients, from a token file and ``LUNGCAD_API_TOKENS``.

    Args:
        token_file: a text file with one token per line, each optionally followed by
            ``client=NAME`` and ``role=admin`` (see the module notes); blank lines and lines
            starting with ``#`` are ignored. None: environment only.
        env: the environment to read (default ``os.environ``); its tokens are plain clients
            named by :func:`token_id`.

    Returns:
        Token -> :class:`ApiClient`, from both sources (may be empty; the caller decides
        whether that is allowed).

    Raises:
        MissingInputError: ``token_file`` does not exist.
        InputError: a token shorter than :data:`MIN_TOKEN_LENGTH` characters, an unreadable
            option, or one token given twice with different clients or roles.
    """
    env = os.environ if env is None else env
    clients: dict[str, ApiClient] = {}

    def add(token: str, client: ApiClient, where: str) -> None:
        if clients.setdefault(token, client) != client:
            raise InputError("this token is given twice, with different clients or roles", where)

    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise MissingInputError(
                "token file not found; expected a text file with one API token per line", path
            )
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; `chmod 600` it", path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                where = f"{path} line {number}"
                add(*_parse_line(line, where), where)
    for token in env.get(TOKEN_ENV, "").replace(",", " ").split():
        add(_check_token(token, TOKEN_ENV), ApiClient(token_id(token)), TOKEN_ENV)
    return clients


def load_tokens(
    token_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The API tokens alone (see :func:`load_clients`, which this reads)."""
    return frozenset(load_clients(token_file, env))


def bearer_dependency(
    tokens: Iterable[str] | Mapping[str, str], *, enabled: bool = True
) -> Callable[..., str]:
    """A FastAPI dependency that checks ``Authorization: Bearer <token>`` and names the client.

    Args:
        tokens: the accepted tokens, or token -> client id (tokens it does not name are
            named by :func:`token_id`).
        enabled: False switches authentication off (every caller is :data:`ANONYMOUS`).

    Returns:
        The dependency; it returns the caller's client id or raises HTTP 401 with a
        ``WWW-Authenticate: Bearer`` header.
    """
    names: Mapping[str, str] = tokens if isinstance(tokens, Mapping) else {}
    digests = [
        (hashlib.sha256(t.encode("utf-8")).digest(), names.get(t) or token_id(t)) for t in tokens
    ]
    scheme = HTTPBearer(auto_error=False, description="An API token of this lungcad install.")

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(scheme),
    ) -> str:
        if not enabled:
            return ANONYMOUS
        if credentials is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing 'Authorization: Bearer <token>' header",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = hashlib.sha256(credentials.credentials.encode("utf-8")).digest()
        user = None
        for digest, name in digests:  # no early exit: every token is compared
            if hmac.compare_digest(given, digest):
                user = name
        if user is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "invalid API token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return user

    return require_token
