"""The README's rotation procedure, end to end through the Makefile (issue #15, item 5).

`make run`, `make mint`, `make rotate`, a refresh and `make drop-old-secrets`, run as a user runs
them (each make in its own process group, stopped by SIGTERM to that group), against the fake
upstream, with VAR pointing at a temporary directory instead of ./var.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from conftest import MakeRun, SecretsRegistry
from fake_upstream import CertAuthority, FakeUpstream, build_request, exchange

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0  # the first `make run` may install soakp into .venv
MAKE_TIMEOUT_S = 120.0


def make_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOAKP_", "OPENAI_", "MAKE")) and k not in ("MFLAGS", "KEY")
    }


def make_run(variables: list[str], log_path: Path, registry: SecretsRegistry) -> MakeRun:
    return MakeRun(
        ["make", "-s", "-C", str(ROOT), *variables, "run"],
        log_path,
        registry,
        make_env(),
        START_TIMEOUT_S,
    )


@pytest.fixture
def var(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def runs(
    var: Path,
    test_ca: CertAuthority,
    fake_upstream: FakeUpstream,
    secrets_registry: SecretsRegistry,
) -> Iterator[list[MakeRun]]:
    started: list[MakeRun] = []
    yield started
    for run in started:
        run.stop()
    for name in ("secret", "old-secrets", "admin-pass"):
        if (var / name).exists():
            for line in (var / name).read_text().split():
                secrets_registry.add(line)


def make(
    var: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"VAR={var}", *args],
        capture_output=True,
        text=True,
        env={**make_env(), **(env or {})},
        timeout=MAKE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def status(port: int, ca: Path, method: str, path: str, token: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    request = build_request(
        method,
        path,
        [("Authorization", f"Bearer {token}")],
        b"" if method == "POST" else None,
        host=f"127.0.0.1:{port}",
    )
    response = exchange(port, request, method, 15.0, context)
    return response.status, response.body


def test_rotation_through_the_makefile_end_to_end(
    var: Path,
    runs: list[MakeRun],
    test_ca: CertAuthority,
    fake_upstream: FakeUpstream,
    secrets_registry: SecretsRegistry,
    tmp_path: Path,
) -> None:
    key = secrets_registry.new_key()
    variables = [
        f"VAR={var}",
        "LISTEN=127.0.0.1:0",
        f"ARGS=--upstream {fake_upstream.url} --upstream-ca {test_ca.ca_path}",
    ]

    def start(name: str) -> MakeRun:
        runs.append(make_run(variables, tmp_path / f"{name}.log", secrets_registry))
        return runs[-1]

    def mint() -> str:
        token = make(var, "mint", env={"OPENAI_API_KEY": key}).stdout.splitlines()[-1]
        return secrets_registry.add(token)

    first = start("first")
    ca = var / "tls" / "fullchain.pem"
    old_kid = re.search(r"signing tokens with the secret kid=(\w+)", first.log()).group(1)
    assert "also accepting" not in first.log()
    old_a, old_b = mint(), mint()
    assert kid_of(old_a) == kid_of(old_b) == old_kid
    assert status(first.port, ca, "GET", "/v1/models", old_a)[0] == 200
    first.stop()

    # 1. make rotate: a new current secret; the old one kept, accepted.
    rotated = make(var, "rotate").stdout
    assert "old-secrets" in rotated
    assert (var / "old-secrets").read_text().split() and oct((var / "secret").stat().st_mode)[
        -3:
    ] == "600"

    # 2. Plain make run again: signs with the new secret, names the old one it still accepts.
    second = start("second")
    new_kid = re.search(r"signing tokens with the secret kid=(\w+)", second.log()).group(1)
    assert new_kid != old_kid
    assert f"also accepting tokens of 1 old secret (--old-secrets): kid={old_kid}" in second.log()
    assert status(second.port, ca, "GET", "/v1/models", old_a)[0] == 200

    # 3. make mint signs with the new secret; a refresh trades an old token for a new-secret one.
    fresh = mint()
    assert kid_of(fresh) == new_kid
    assert status(second.port, ca, "GET", "/v1/models", fresh)[0] == 200
    code, body = status(second.port, ca, "POST", "/jwt/refresh", old_a)
    assert code == 201, body
    refreshed = secrets_registry.add(json.loads(body)["data"]["jwt"])
    assert kid_of(refreshed) == new_kid
    assert status(second.port, ca, "GET", "/v1/models", refreshed)[0] == 200
    second.stop()

    # 4. Drop the old secret: tokens of the old one stop, the new ones carry on.
    make(var, "drop-old-secrets")
    assert not (var / "old-secrets").exists()
    third = start("third")
    assert f"signing tokens with the secret kid={new_kid}" in third.log()
    assert "also accepting" not in third.log()
    assert status(third.port, ca, "GET", "/v1/models", old_b)[0] == 401
    for token in (fresh, refreshed):
        assert status(third.port, ca, "GET", "/v1/models", token)[0] == 200
    assert key not in first.log() + second.log() + third.log()


def test_make_mint_takes_the_key_from_openai_api_key_or_key(
    var: Path, secrets_registry: SecretsRegistry
) -> None:
    key = secrets_registry.new_key()
    from_env = make(var, "mint", env={"OPENAI_API_KEY": key}).stdout.splitlines()[-1]
    from_var = make(var, "mint", f"KEY={key}").stdout.splitlines()[-1]
    for token in (from_env, from_var):
        secrets_registry.add(token)
        assert token.count(".") == 2
    missing = subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"VAR={var}", "mint"],
        capture_output=True,
        text=True,
        env=make_env(),
        timeout=MAKE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert missing.returncode != 0
    assert "OPENAI_API_KEY" in missing.stderr and "KEY=" in missing.stderr
