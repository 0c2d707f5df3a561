"""The zipapp (`make zipapp` -> soakp.pyz, built with shiv): one file that runs on a bare system Python.

The zipapp is built once per test session by the Makefile target users run. It is started with
Debian's own /usr/bin/python3 under `-I -S`: `-I` drops the user site directory, the PYTHON*
variables and the script's directory from sys.path, and `-S` skips the `site` module, so Debian's
dist-packages (which has python3-jwt and python3-cryptography) are not on sys.path either. The first
test proves that under exactly these flags pyjwt, cryptography and certifi cannot be imported, so
whatever the zipapp imports comes from inside it.
"""

from __future__ import annotations

import platform
import re
import socket
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import SoakpProcess, soakp_env
from fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpLauncher

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, outside any venv; the Docker image runs this one too
BARE = ["-I", "-S"]
RUNTIME_DEPENDENCIES = ("jwt", "cryptography", "certifi")
BUILD_TIMEOUT_S = 300
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine values from the ELF specification


def system_python_version() -> str:
    result = subprocess.run([SYSTEM_PYTHON, *BARE, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip()


def make_zipapp(output: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    """Run `make zipapp ZIPAPP=output VARIABLES...`, with the test venv's shiv when it has one."""
    command = ["make", "--no-print-directory", "-C", str(ROOT), "zipapp", f"ZIPAPP={output}", *variables]
    if (Path(sys.prefix) / "bin" / "shiv").exists():  # `pip install -e '.[test]'` brings shiv
        command.append(f"SHIV_VENV={sys.prefix}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"make zipapp failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/soakp.pyz for the system Python's version, built once per session into a temporary dir."""
    assert Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing (Debian's python3; certbot depends on it)"
    output = tmp_path_factory.mktemp("zipapp") / "soakp.pyz"
    make_zipapp(output, f"PYVER={system_python_version()}")
    return output


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """The environment for the zipapp: no SOAKP_*, and shiv unpacks into this test's tmp_path."""
    return {**soakp_env(), "SHIV_ROOT": str(tmp_path / "shiv")}


class ZipappProcess(SoakpProcess):
    """A SoakpProcess (same helpers: mint, request, ...) started as `python3 -I -S soakp.pyz serve ...`."""

    def __init__(self, command: list[str], launcher: SoakpLauncher, log_path: Path, env: dict[str, str]) -> None:
        self.args = command
        self.log_path = log_path
        self.registry = launcher.registry
        self.admin = launcher.admin
        self.ca = launcher.ca
        launcher.registry.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=log_path.parent, env=env)
        self.scheme, self.port = self._wait_listening()


@pytest.fixture
def zipapp_server(zipapp: Path, soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream,
                  bare_env: dict[str, str], tmp_path: Path) -> Iterator[ZipappProcess]:
    """The zipapp serving with the same flags as every other test's SOAKP (fake upstream, test CA)."""
    args = ["serve"]
    for name, value in soakp_launcher.default_options().items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), value]
    process = ZipappProcess([SYSTEM_PYTHON, *BARE, str(zipapp), *args], soakp_launcher, tmp_path / "zipapp.log",
                            bare_env)
    yield process
    assert process.stop() == 0, process.log_text()


def test_the_bare_system_python_has_none_of_the_dependencies() -> None:
    """The premise of the tests below: under the same flags, Debian's python3 cannot import them."""
    for module in RUNTIME_DEPENDENCIES:
        result = subprocess.run([SYSTEM_PYTHON, *BARE, "-c", f"import {module}"], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 1 and f"No module named '{module}'" in result.stderr, (module, result.stderr)


def test_zipapp_prints_its_version(zipapp: Path, bare_env: dict[str, str]) -> None:
    result = subprocess.run([SYSTEM_PYTHON, *BARE, str(zipapp), "--version"], capture_output=True, text=True,
                            env=bare_env, timeout=60)
    assert result.returncode == 0, result.stderr
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "soakp.py").read_text(), re.M)
    assert version and result.stdout.strip() == f"soakp {version[1]}"


def test_zipapp_serves_mints_and_forwards(
    zipapp: Path, zipapp_server: ZipappProcess, fake_upstream: FakeUpstream, bare_env: dict[str, str],
    secret: str, secrets_registry: SecretsRegistry, tmp_path: Path,
) -> None:
    """`soakp.pyz serve`: mint over the admin API, then a chat call reaches the fake upstream with the
    key swapped in. `soakp.pyz mint` under the same secret makes a token that server accepts too."""
    minted = zipapp_server.mint_data()
    body = b'{"model":"gpt-fake-1","messages":[{"role":"user","content":"from the zipapp"}]}'
    answer = zipapp_server.request("POST", "/v1/chat/completions", minted.token,
                                   [("Content-Type", "application/json")], body)
    assert answer.status == 200, answer.body
    assert answer.json()["choices"][0]["message"]["content"] == "echo: from the zipapp"
    record = fake_upstream.wait_for_request("/v1/chat/completions")
    assert record.header_all("authorization") == [f"Bearer {minted.key}"]

    key = secrets_registry.new_key()
    result = subprocess.run([SYSTEM_PYTHON, *BARE, str(zipapp), "mint", "--secret", secret, "--db",
                             str(tmp_path / "cli.db"), "--key", key], capture_output=True, text=True,
                            env=bare_env, timeout=60)
    (tmp_path / "zipapp-mint.log").write_text(result.stderr)
    secrets_registry.logs.append(tmp_path / "zipapp-mint.log")
    assert result.returncode == 0, result.stderr
    token = secrets_registry.add(result.stdout.strip().splitlines()[-1])
    assert zipapp_server.request("GET", "/v1/models", token).status == 200
    assert fake_upstream.wait_for_request("/v1/models").header_all("authorization") == [f"Bearer {key}"]


def test_zipapp_serves_tls_and_answers_plain_http_on_the_system_python(
    zipapp: Path, soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream, bare_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The TLS port on Debian's python3 (3.11.2 on bookworm, the Docker image's): handshakes complete
    and a plain-HTTP request gets its 400. Before Python 3.11.3 a transport paused in connection_made
    still started reading, which swallowed every client's first TLS bytes (the container test's hang)."""
    certs = tmp_path / "tls"
    made = subprocess.run([SYSTEM_PYTHON, *BARE, str(zipapp), "selfsigned", "--dir", str(certs)],
                          capture_output=True, text=True, env=bare_env, timeout=60)
    assert made.returncode == 0, made.stderr
    args = ["serve", "--cert-dir", str(certs)]
    for name, value in soakp_launcher.default_options().items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), value]
    process = ZipappProcess([SYSTEM_PYTHON, *BARE, str(zipapp), *args], soakp_launcher, tmp_path / "tls.log",
                            bare_env)
    try:
        assert process.scheme == "https"
        context = ssl.create_default_context(cafile=str(certs / "fullchain.pem"))
        context.check_hostname = False
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert plain.recv(65536).startswith(b"HTTP/1.1 400")
    finally:
        assert process.stop() == 0, process.log_text()


def elf_machines(archive: Path) -> set[str]:
    """The CPU architectures of the native libraries inside a zipapp."""
    with zipfile.ZipFile(archive) as pyz:
        headers = [pyz.read(name)[:20] for name in pyz.namelist() if name.endswith(".so")]
    assert headers, "no native library in the zipapp (cryptography has one)"
    assert all(header[:4] == b"\x7fELF" for header in headers)
    return {ELF_MACHINES.get(int.from_bytes(header[18:20], "little"), "other") for header in headers}


def test_make_zipapp_for_another_cpu(zipapp: Path, tmp_path: Path) -> None:
    """`make zipapp PLATFORM=manylinux2014_aarch64 PYVER=3.11`, as the README says for an edge device
    (x86_64 when this machine is the aarch64 one): every native library inside is for that CPU, and
    the file weighs about what the native one does."""
    native = platform.machine()
    other = "x86_64" if native == "aarch64" else "aarch64"
    output = tmp_path / f"soakp-{other}.pyz"
    make_zipapp(output, f"PLATFORM=manylinux2014_{other}", "PYVER=3.11")
    assert elf_machines(output) == {other}
    assert elf_machines(zipapp) == {native}
    assert 0.8 < output.stat().st_size / zipapp.stat().st_size < 1.25
