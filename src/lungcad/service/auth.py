"""Bearer-token authentication for everything under ``/api``.

Tokens are opaque random strings (e.g. ``python -c "import secrets;
print(secrets.token_urlsafe(32))"``), read from a token file (one per line, ``#`` comments) and/or
the ``LUNGCAD_API_TOKENS`` environment variable (separated by commas or whitespace). The
service never stores or logs a token: users are named in logs by :func:`token_id`, a short
SHA-256 prefix that identifies a token without revealing it.

Comparison is constant-time: the SHA-256 digest of the presented token is compared with
``hmac.compare_digest`` against the digest of every configured token (all of them, so timing
says nothing about which one matched or how much of one did).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lungcad.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "bearer_dependency",
    "load_tokens",
    "token_id",
]

TOKEN_ENV = "LUNGCAD_API_TOKENS"
#: Shorter tokens are refused: a token is the only thing between the network and patient data.
MIN_TOKEN_LENGTH = 16
#: The user name recorded when authentication is switched off (``--insecure-no-auth``).
ANONYMOUS = "anonymous"


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


def load_tokens(
    token_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The API tokens from a token file and the ``LUNGCAD_API_TOKENS`` environment variable.

    Args:
        token_file: a text file with one token per line; blank lines and lines starting with
            ``#`` are ignored. None: environment only.
        env: the environment to read (default ``os.environ``).

    Returns:
        The union of both sources (may be empty; the caller decides whether that is allowed).

    Raises:
        MissingInputError: ``token_file`` does not exist.
        InputError: a token shorter than :data:`MIN_TOKEN_LENGTH` characters.
    """
    env = os.environ if env is None else env
    tokens: set[str] = set()
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
                tokens.add(_check_token(line, f"{path} line {number}"))
    for token in env.get(TOKEN_ENV, "").replace(",", " ").split():
        tokens.add(_check_token(token, TOKEN_ENV))
    return frozenset(tokens)


def bearer_dependency(tokens: Iterable[str], *, enabled: bool = True) -> Callable[..., str]:
    """A FastAPI dependency that checks ``Authorization: Bearer <token>`` and names the user.

    Args:
        tokens: the accepted tokens.
        enabled: False switches authentication off (every caller is :data:`ANONYMOUS`).

    Returns:
        The dependency; it returns the caller's :func:`token_id` or raises HTTP 401 with a
        ``WWW-Authenticate: Bearer`` header.
    """
    digests = [(hashlib.sha256(t.encode("utf-8")).digest(), token_id(t)) for t in tokens]
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
