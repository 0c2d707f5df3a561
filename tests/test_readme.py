"""The README's walk-through, run as written (issue #15): its shell and Python blocks, against the
fake upstream.

The blocks run in a scratch directory laid out like a clone (the Makefile, pyproject.toml and .venv,
this test's own virtualenv), so `make run`, `make mint`, `var/...` and `.venv/bin/soakp` mean what
they mean in a clone. One change is made to the text: `127.0.0.1:3033` becomes the port `make run`
got (LISTEN=127.0.0.1:0), since another server may hold 3033 on a shared machine. `make run` gets
`--upstream` and `--upstream-ca` for the fake through ARGS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeRun, SecretsRegistry
from fake_upstream import CertAuthority, FakeUpstream

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START_TIMEOUT_S = 60.0
BLOCK_TIMEOUT_S = 60.0


def readme_block(language: str, containing: str) -> str:
    """The one fenced block of `language` in the README that contains `containing`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} {language} blocks in README.md contain {containing!r}"
    return found[0]


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOAKP_", "OPENAI_", "MAKE", "SSL_CERT"))
        and k not in ("MFLAGS", "TOKEN", "KEY")
    }


class Clone:
    """A scratch directory that looks like a clone, with `make run` serving in it."""

    def __init__(
        self, directory: Path, upstream: FakeUpstream, ca: CertAuthority, registry: SecretsRegistry
    ) -> None:
        self.directory = directory
        self.registry = registry
        (directory / "Makefile").symlink_to(ROOT / "Makefile")
        (directory / "soakp.py").symlink_to(ROOT / "soakp.py")
        shutil.copy(ROOT / "pyproject.toml", directory / "pyproject.toml")
        os.utime(
            directory / "pyproject.toml", (0, 0)
        )  # older than any install stamp: make installs nothing
        venv = Path(sys.prefix)
        (directory / ".venv").symlink_to(venv)
        (venv / ".installed-run").touch(exist_ok=True)  # this venv has soakp and its dependencies
        self.make = MakeRun(
            [
                "make",
                "run",
                "LISTEN=127.0.0.1:0",
                f"ARGS=--upstream {upstream.url} --upstream-ca {ca.ca_path}",
            ],
            directory / "make-run.log",
            registry,
            clean_env(),
            START_TIMEOUT_S,
            cwd=directory,
        )
        self.port = self.make.port
        registry.add((directory / "var" / "admin-pass").read_text().strip())
        registry.add((directory / "var" / "secret").read_text().strip())

    def log(self) -> str:
        return self.make.log()

    def stop(self) -> None:
        self.make.stop()

    def run(self, script: str, program: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        """Run a README block (its port changed to ours) and return what it printed."""
        text = script.replace("127.0.0.1:3033", f"127.0.0.1:{self.port}")
        result = subprocess.run(
            [*program, "-c", text],
            cwd=self.directory,
            capture_output=True,
            text=True,
            env={**clean_env(), **env},
            timeout=BLOCK_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        for (
            line
        ) in result.stdout.splitlines():  # tokens printed by the blocks, for the secrets check
            if line.startswith("eyJ"):
                self.registry.add(line.strip())
        assert (
            result.returncode == 0
        ), f"{text}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        return result


@pytest.fixture
def clone(
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    test_ca: CertAuthority,
    secrets_registry: SecretsRegistry,
) -> Iterator[Clone]:
    running = Clone(tmp_path, fake_upstream, test_ca, secrets_registry)
    yield running
    running.stop()


BASH = ["bash", "-e", "-o", "pipefail"]


def test_readme_walk_through_runs_as_written(clone: Clone, fake_upstream: FakeUpstream) -> None:
    # Mint a token: through the server with the admin password, then offline.
    minted = clone.run(readme_block("sh", '"ttl":"12h", "sub":"my-laptop"'), BASH)
    assert '"status":201' in minted.stdout and '"jwt":"eyJ' in minted.stdout
    offline = clone.run(readme_block("sh", "make mint KEY=sk-...\n"), BASH)
    tokens = [line for line in offline.stdout.splitlines() if line.startswith("eyJ")]
    assert len(tokens) == 2, offline.stdout

    # export TOKEN=..., the curl block and the Python SDK block, in one shell as a user types them.
    export = readme_block("sh", "export TOKEN=")
    curl = readme_block("sh", "--cacert var/tls/fullchain.pem https://127.0.0.1:3033/v1/models")
    python = readme_block("python", "DefaultHttpx2Client")
    script = f"{export}\n{curl}\n.venv/bin/python - <<'PYTHON'\n{python}PYTHON\n"
    walked = clone.run(script, BASH)
    assert (
        '"object":"list"' in walked.stdout.replace(" ", "") or '"data"' in walked.stdout
    ), walked.stdout
    assert "data: [DONE]" in walked.stdout
    assert walked.stdout.rstrip().splitlines()[-1].strip(), "the Python block printed no reply"
    paths = [request.path for request in fake_upstream.requests]
    assert paths.count("/v1/chat/completions") == 2 and "/v1/models" in paths
    for request in fake_upstream.requests:
        assert request.header("authorization") == "Bearer sk-..."  # the README's key, swapped in

    # A limited token, both ways; the metrics; a budgeted token, both ways.
    clone.run(readme_block("sh", '"sub": "web-app"'), BASH)
    metrics = clone.run(readme_block("sh", "/metrics"), BASH)
    assert "soakp_requests_total" in metrics.stdout
    clone.run(readme_block("sh", "--max-tokens-total 100000"), BASH)
    assert "Traceback" not in clone.log()
