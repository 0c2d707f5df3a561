"""Shared fixtures for SOAKP's black-box tests.

They build on each other: `test_ca` -> `upstream_server` (a FakeUpstream, see fake_upstream.py) ->
`soakp` (a factory that starts `soakp.py serve` as a subprocess pointed at it) -> `proxy` (one shared
SOAKP for tests that need no special flags) -> `minted` / `token`.

Every key, token, secret and password a test hands to SOAKP goes into `secrets_registry`, and every
SOAKP log file too, so that tests/test_secrets_in_logs.py (run last) can check no log ever held one.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

try:
    import httpx2 as httpx  # the HTTP client of openai 3.x
except ImportError:  # openai 1.x and 2.x use httpx
    import httpx

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # so that --import-mode=importlib finds the helper module too
    sys.path.insert(0, str(TESTS_DIR))

from fake_upstream import (  # noqa: E402
    CertAuthority,
    FakeUpstream,
    RawConnection,
    RawResponse,
    build_request,
    exchange,
)
from proc_helpers import memory_kib  # noqa: E402

ROOT = TESTS_DIR.parent
SOAKP_PY = ROOT / "soakp.py"
LISTENING = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


# Secrets registry ###########################################################################################


@dataclass
class SecretsRegistry:
    """Every secret value used in the session, and every log file SOAKP wrote."""

    values: set[str] = field(default_factory=set)
    logs: list[Path] = field(default_factory=list)

    def add(self, value: str) -> str:
        if value:
            self.values.add(value)
        return value

    def new_key(self) -> str:
        """Return a fresh fake OpenAI key, registered."""
        return self.add("sk-test-" + secrets.token_urlsafe(24))


# SOAKP as a subprocess ######################################################################################


@dataclass(frozen=True)
class Minted:
    """A token minted through POST /jwt/generate, with the key it carries."""

    token: str
    key: str
    jti: str
    expires_at: int


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def soakp_env() -> dict[str, str]:
    """The environment for a SOAKP child: ours without SOAKP_* (flags are the only input) or OPENAI_*."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SOAKP_", "OPENAI_"))}


class SoakpProcess:
    """One running `soakp.py serve` (`entry` instead of soakp.py: `-m soakp`, say), its log file and
    helpers to talk to it."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        cwd: Path,
        registry: SecretsRegistry,
        admin: tuple[str, str],
        ca: CertAuthority,
        entry: Sequence[str] = (),
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.registry = registry
        self.admin = admin
        self.ca = ca
        registry.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, *(entry or [str(SOAKP_PY)]), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=soakp_env(),
            )
        self.scheme, self.port = self._wait_listening()

    def _wait_listening(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_text())
            if found:
                return found.group(1), int(found.group(2))
            if self.popen.poll() is not None:
                pytest.fail(f"soakp exited with {self.popen.returncode} before listening:\n{self.log_text()}")
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"soakp did not log 'listening on' within {START_TIMEOUT_S}s:\n{self.log_text()}")

    # Facts

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.ca.client_context() if self.scheme == "https" else None

    # Raw HTTP

    def connect(self, timeout_s: float = 15.0) -> RawConnection:
        return RawConnection(self.port, timeout_s=timeout_s, ssl_context=self.ssl_context())

    def raw(self, data: bytes, method: str | None = None, timeout_s: float = 15.0) -> RawResponse:
        """Send raw bytes on a new connection and return the first response."""
        return exchange(self.port, data, method, timeout_s, self.ssl_context())

    def request(
        self,
        method: str,
        target: str,
        token: str | None = None,
        headers: list[tuple[str, str]] | tuple[()] = (),
        body: bytes | None = None,
        timeout_s: float = 15.0,
    ) -> RawResponse:
        """Send one well-formed request on a new connection (with `Authorization: Bearer token` if given)."""
        all_headers = list(headers)
        if token is not None:
            all_headers.insert(0, ("Authorization", f"Bearer {token}"))
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        data = build_request(method, target, all_headers, body, host=f"127.0.0.1:{self.port}")
        return self.raw(data, method, timeout_s)

    # Tokens

    def mint_data(self, key: str | None = None, **claims: Any) -> Minted:
        """Mint a token via POST /jwt/generate (admin Basic auth); register key and token."""
        key = self.registry.add(key) if key is not None else self.registry.new_key()
        body = json.dumps({"key": key, **claims}).encode()
        response = self.request(
            "POST",
            "/jwt/generate",
            headers=[("Authorization", basic_auth(*self.admin)), ("Content-Type", "application/json")],
            body=body,
        )
        assert response.status == 201, f"mint failed: {response.status} {response.body[:500]!r}"
        data = response.json()["data"]
        self.registry.add(data["jwt"])
        return Minted(data["jwt"], key, data["jti"], data["expires_at"])

    def mint(self, key: str | None = None, **claims: Any) -> str:
        """Mint a token (see mint_data) and return it."""
        return self.mint_data(key, **claims).token

    # SDK clients

    def openai(self, token: str, **kwargs: Any) -> Any:
        """An `openai.OpenAI` client whose base URL is this SOAKP; no retries, so failures show."""
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        if self.scheme == "https" and "http_client" not in kwargs:
            kwargs["http_client"] = httpx.Client(verify=self.ssl_context())
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token, **kwargs)

    def async_openai(self, token: str, **kwargs: Any) -> Any:
        """An `openai.AsyncOpenAI` client whose base URL is this SOAKP; no retries."""
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        if self.scheme == "https" and "http_client" not in kwargs:
            kwargs["http_client"] = httpx.AsyncClient(verify=self.ssl_context())
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=token, **kwargs)

    # Lifecycle

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        return self.popen.returncode


MAKE_LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")


class MakeRun:
    """`make ... run` in its own process group (as a user's shell runs it), its output in a file, ready
    once SOAKP logs its port. stop() sends SIGTERM to the whole group (make and the SOAKP it runs)."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        registry: SecretsRegistry,
        env: dict[str, str],
        start_timeout_s: float,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        registry.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + start_timeout_s
        while not (found := MAKE_LISTENING.search(self.log())):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"make run did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(found.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class SoakpLauncher:
    """Starts SOAKP processes with the session's secret, admin, CA and fake upstream.

    `start(*extra_args, **options)`: options override the defaults by flag name (read_timeout="1s"
    becomes `--read-timeout 1s`; a value of None drops the flag); extra_args are appended as given.
    """

    def __init__(
        self,
        workdir: Path,
        secret: str,
        admin: tuple[str, str],
        ca: CertAuthority,
        upstream: FakeUpstream,
        registry: SecretsRegistry,
    ) -> None:
        self.workdir = workdir
        self.secret = secret
        self.admin = admin
        self.ca = ca
        self.upstream = upstream
        self.registry = registry
        self.processes: list[SoakpProcess] = []
        self._count = 0

    def default_options(self) -> dict[str, str | None]:
        return {
            "listen": "127.0.0.1:0",
            "secret": self.secret,
            "admin_user": self.admin[0],
            "admin_pass": self.admin[1],
            "upstream": self.upstream.url,
            "upstream_ca": str(self.ca.ca_path),
            "db": ":memory:",
            "connect_timeout": "5s",
            "read_timeout": "30s",
            "log_level": "debug",  # the most talkative level, for the secrets-in-logs check
        }

    def start(self, *extra_args: str, **options: str | None) -> SoakpProcess:
        return self.start_entry((), *extra_args, **options)

    def start_entry(
        self, entry: Sequence[str], *extra_args: str, **options: str | None
    ) -> SoakpProcess:
        """start(), with `entry` (say `-m soakp`) between the interpreter and SOAKP's arguments."""
        if not SOAKP_PY.exists():
            pytest.skip(f"{SOAKP_PY} does not exist yet")
        merged = {**self.default_options(), **options}
        args = ["serve"]
        for name, value in merged.items():
            if value is not None:
                args += [_flag(name), value]
        args += list(extra_args)
        self._count += 1
        process = SoakpProcess(
            args,
            self.workdir / f"soakp-{self._count}.log",
            self.workdir,
            self.registry,
            self.admin,
            self.ca,
            entry,
        )
        self.processes.append(process)
        return process

    def run_cli(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `soakp.py ARGS` to completion; its stderr is kept as a log for the secrets check."""
        if not SOAKP_PY.exists():
            pytest.skip(f"{SOAKP_PY} does not exist yet")
        result = subprocess.run(
            [sys.executable, str(SOAKP_PY), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.workdir,
            env=soakp_env(),
            timeout=timeout_s,
        )
        self._count += 1
        log_path = self.workdir / f"soakp-cli-{self._count}.log"
        log_path.write_text(result.stderr)
        self.registry.logs.append(log_path)
        return result

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


# Helpers for tests #########################################################################################


def token_claims(token: str) -> dict[str, Any]:
    """A token's payload, read without checking it."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def error_of(response: RawResponse, status: int) -> dict[str, Any]:
    """Assert `status` with OpenAI's error shape; return the error object."""
    assert response.status == status, f"expected {status}, got {response.status}: {response.body[:300]!r}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def admin_call(server: SoakpProcess, method: str, path: str, payload: Any = None,
               credentials: tuple[str, str] | None = None,
               headers: list[tuple[str, str]] | None = None) -> RawResponse:
    """An admin request with HTTP Basic (the server's own credentials unless others are given); a payload
    goes as JSON unless `headers` name another Content-Type."""
    sent = [("Authorization", basic_auth(*(credentials or server.admin))), *(headers or [])]
    body = None
    if payload is not None:
        if not any(name.lower() == "content-type" for name, _ in sent):
            sent.append(("Content-Type", "application/json"))
        body = json.dumps(payload).encode()
    return server.request(method, path, headers=sent, body=body)


# Fixtures ###################################################################################################


@pytest.fixture(scope="session")
def secrets_registry() -> SecretsRegistry:
    return SecretsRegistry()


@pytest.fixture(scope="session")
def secret(secrets_registry: SecretsRegistry) -> str:
    """The session's master secret (over 40 characters)."""
    return secrets_registry.add("soakp-test-secret-" + secrets.token_hex(20))


@pytest.fixture(scope="session")
def admin(secrets_registry: SecretsRegistry) -> tuple[str, str]:
    """(user, password) for SOAKP's admin endpoints."""
    return "admin", secrets_registry.add("admin-pass-" + secrets.token_hex(12))


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A throwaway CA; its PEM file (test_ca.ca_path) is what SOAKP gets as --upstream-ca."""
    return CertAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def upstream_server(test_ca: CertAuthority) -> Iterator[FakeUpstream]:
    """The session's fake OpenAI server (see fake_upstream.py); tests use `fake_upstream` instead."""
    cert_path, key_path = test_ca.issue("upstream")
    server = FakeUpstream(cert_path, key_path).start()
    yield server
    server.stop()


@pytest.fixture
def fake_upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream with no recorded requests and no scripts.

    At teardown, a malformed request head from SOAKP or a fault inside the fake fails the test.
    """
    upstream_server.reset()
    yield upstream_server
    errors = list(upstream_server.errors)
    upstream_server.reset()
    if errors:
        pytest.fail("the fake upstream recorded faults:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def soakp_launcher(
    tmp_path_factory: pytest.TempPathFactory,
    secret: str,
    admin: tuple[str, str],
    test_ca: CertAuthority,
    upstream_server: FakeUpstream,
    secrets_registry: SecretsRegistry,
) -> Iterator[SoakpLauncher]:
    launcher = SoakpLauncher(
        tmp_path_factory.mktemp("soakp"), secret, admin, test_ca, upstream_server, secrets_registry
    )
    yield launcher
    launcher.stop_all()


@pytest.fixture
def soakp(soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream) -> Iterator[Callable[..., SoakpProcess]]:
    """A factory: soakp(*extra_args, **options) starts a SOAKP for this test only (see SoakpLauncher)."""
    started: list[SoakpProcess] = []

    def start(*extra_args: str, **options: str | None) -> SoakpProcess:
        process = soakp_launcher.start(*extra_args, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@dataclass
class _Shared:
    process: SoakpProcess | None = None


@pytest.fixture(scope="session")
def _shared_proxy() -> _Shared:
    return _Shared()


@pytest.fixture
def proxy(soakp_launcher: SoakpLauncher, _shared_proxy: _Shared, fake_upstream: FakeUpstream) -> Iterator[SoakpProcess]:
    """The session's shared SOAKP with default flags (started on first use, restarted if it died).

    A test during which it exits gets an error at teardown, with its log.
    """
    if _shared_proxy.process is None or not _shared_proxy.process.alive:
        _shared_proxy.process = soakp_launcher.start()
    process = _shared_proxy.process
    yield process
    if not process.alive:
        pytest.fail(f"the shared soakp exited ({process.popen.returncode}) during this test:\n{process.log_text()[-4000:]}")


@pytest.fixture
def minted(proxy: SoakpProcess) -> Minted:
    """A fresh token (no org, no project) for the shared proxy, and the key it carries."""
    return proxy.mint_data()


@pytest.fixture
def token(minted: Minted) -> str:
    return minted.token


@pytest.fixture
def soakp_cli(soakp_launcher: SoakpLauncher) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a SOAKP command (mint, tokens, ...) to completion: soakp_cli("mint", "--key", K, ...)."""
    return soakp_launcher.run_cli


# Ordering ###################################################################################################


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests/test_secrets_in_logs.py after everything else, whatever the file order."""
    last = [item for item in items if item.path.name == "test_secrets_in_logs.py"]
    if last:
        items[:] = [item for item in items if item.path.name != "test_secrets_in_logs.py"] + last
