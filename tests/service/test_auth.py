"""Bearer tokens: loading them, naming them in logs, and the FastAPI dependency that checks them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from lungcad.errors import InputError
from lungcad.service.auth import (
    ANONYMOUS,
    TOKEN_ENV,
    ApiClient,
    bearer_dependency,
    load_clients,
    load_tokens,
    token_id,
)
from tests.service_helpers import OTHER_TOKEN, TOKEN


def whoami_app(tokens: frozenset[str] | dict[str, str], *, enabled: bool = True) -> TestClient:
    """A one-endpoint app returning the user the dependency names."""
    require_token = bearer_dependency(tokens, enabled=enabled)
    app = FastAPI()

    @app.get("/whoami")
    def whoami(user: str = Depends(require_token)) -> dict[str, str]:
        return {"user": user}

    return TestClient(app)


def test_load_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"# api tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n")
    assert load_tokens(path, env={}) == {TOKEN, OTHER_TOKEN}
    assert load_tokens(None, env={TOKEN_ENV: f"{TOKEN},{OTHER_TOKEN}"}) == {TOKEN, OTHER_TOKEN}
    assert load_tokens(None, env={}) == frozenset()
    with pytest.raises(InputError, match="at least 16"):
        load_tokens(None, env={TOKEN_ENV: "short"})
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.txt", env={})
    assert token_id(TOKEN) != token_id(OTHER_TOKEN) and TOKEN not in token_id(TOKEN)


def test_token_file_and_environment_are_merged_and_a_short_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN}\n")
    assert load_tokens(path, env={TOKEN_ENV: f" {OTHER_TOKEN} "}) == {TOKEN, OTHER_TOKEN}
    path.write_text(f"{TOKEN}\nshort\n")
    with pytest.raises(InputError, match="line 2"):
        load_tokens(path, env={})


def test_token_file_names_clients_and_admins(tmp_path: Path) -> None:
    third = "third-token-0123456789abcdef"
    path = tmp_path / "tokens.txt"
    path.write_text(
        f"{TOKEN}  client=ris-gateway\n"
        f"{OTHER_TOKEN} client=ris-gateway  # rotated: the same client, the same jobs\n"
        f"{third} client=it-admin role=admin\n"
    )
    path.chmod(0o600)
    clients = load_clients(path, env={TOKEN_ENV: "plain-env-token-0123456789"})
    assert clients == {
        TOKEN: ApiClient("ris-gateway"),
        OTHER_TOKEN: ApiClient("ris-gateway"),
        third: ApiClient("it-admin", admin=True),
        "plain-env-token-0123456789": ApiClient(token_id("plain-env-token-0123456789")),
    }
    assert load_tokens(path, env={}) == {TOKEN, OTHER_TOKEN, third}
    for line, words in (
        (f"{TOKEN} role=root", "role=admin"),
        (f"{TOKEN} client=", "client=NAME"),
        (f"{TOKEN} client=a/b", "client=NAME"),
        (f"{TOKEN} admin", "cannot read 'admin'"),
        (f"{TOKEN} client=a\n{TOKEN} client=b", "given twice"),
    ):
        path.write_text(line + "\n")
        with pytest.raises(InputError, match=words) as err:
            load_clients(path, env={})
        assert str(path) in str(err.value) and TOKEN not in str(err.value)


def test_dependency_names_the_caller_by_client_id() -> None:
    client = whoami_app({TOKEN: "ris-gateway", OTHER_TOKEN: ""})
    who = {
        token: client.get("/whoami", headers={"Authorization": f"Bearer {token}"}).json()["user"]
        for token in (TOKEN, OTHER_TOKEN)
    }
    assert who == {TOKEN: "ris-gateway", OTHER_TOKEN: token_id(OTHER_TOKEN)}


def test_token_id_is_stable_and_short() -> None:
    name = token_id(TOKEN)
    assert name == token_id(TOKEN)
    assert name.startswith("tok-") and len(name) == 14
    assert int(name.removeprefix("tok-"), 16) >= 0  # hex digits


def test_dependency_names_the_caller_by_token_id() -> None:
    client = whoami_app(frozenset({TOKEN, OTHER_TOKEN}))
    for token in (TOKEN, OTHER_TOKEN):
        response = client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
        assert response.json() == {"user": token_id(token)}


def test_dependency_refuses_missing_and_wrong_tokens_with_401() -> None:
    client = whoami_app(frozenset({TOKEN}))
    missing = client.get("/whoami")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/whoami", headers={"Authorization": "Bearer " + OTHER_TOKEN})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    prefix = client.get("/whoami", headers={"Authorization": "Bearer " + TOKEN[:-1]})
    assert prefix.status_code == 401
    assert TOKEN not in wrong.text + prefix.text


def test_disabled_dependency_lets_everyone_in_as_anonymous() -> None:
    client = whoami_app(frozenset(), enabled=False)
    assert client.get("/whoami").json() == {"user": ANONYMOUS}
