"""Issue #17, idle memory: what a plain `python soakp.py serve` holds once it has answered.

bench/run.py measures the idle RSS (its `idle` row); no figure of it is asserted here. These tests
pin the two things it rests on, which a change could undo without any other test noticing:

- serving loads nothing it does not use: a plain serve (HTTP listener, an upstream over verified TLS
  with --upstream-ca, no --redis) starts and proxies with certificate making (cryptography.x509,
  serialization, ec), certifi and redis made unimportable. A sitecustomize puts None in sys.modules
  for them, which is what Python does for a module that is not installed. pyjwt then goes without
  its RS/ES algorithms (it looks for them in a try block), which SOAKP, pinned to HS256, never uses.
- a server started as a script does not keep the script's parse tree (~14 MiB for soakp.py; CPython
  frees it only when a script returns): it holds about what the same server started as
  `python -m soakp` holds, whose tree was freed once compiled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import ROOT, Minted
from fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from conftest import SoakpLauncher, SoakpProcess

# Imported only where they are used: `soakp selfsigned`, TLS serving, no --upstream-ca, --redis.
NOT_FOR_PLAIN_SERVING = (
    "cryptography.x509",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.asymmetric.ec",
    "certifi",
    "redis",
)
# The parse tree a script keeps is ~14 MiB; what else may differ between the two starts (a .pyc
# read, or a compile given back with malloc_trim; the -c that relaunches) is under 1 MiB.
MAX_SCRIPT_OVER_MODULE_KIB = 6 * 1024


def proxied_chat(server: SoakpProcess, fake_upstream: FakeUpstream) -> Minted:
    """Mint through the admin API, then one chat completion through SOAKP, the key swapped in."""
    minted = server.mint_data()
    messages = [{"role": "user", "content": "hi"}]
    body = json.dumps({"model": "gpt-fake-1", "messages": messages}).encode()
    response = server.request(
        "POST",
        "/v1/chat/completions",
        token=minted.token,
        headers=[("Content-Type", "application/json")],
        body=body,
    )
    assert response.status == 200, response.body[:500]
    record = fake_upstream.wait_for_request(
        "/v1/chat/completions",
        lambda r: r.header_all("authorization") == [f"Bearer {minted.key}"],
    )
    assert minted.token not in record.raw_head.decode("latin-1")
    return minted


def test_a_plain_serve_proxies_without_certificate_making_certifi_or_redis(
    soakp, fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        f"import sys\n\nfor name in {NOT_FOR_PLAIN_SERVING!r}:\n    sys.modules[name] = None\n"
    )
    path = [str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    server = soakp()
    proxied_chat(server, fake_upstream)
    assert server.stop() == 0, server.log_text()[-2000:]
    assert "Traceback" not in server.log_text()


def test_serve_started_as_a_script_holds_about_what_an_imported_one_holds(
    soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # `-m soakp` imports this tree's soakp.py
    script = soakp_launcher.start()
    module = soakp_launcher.start_entry(["-m", "soakp"])
    try:
        rss_kib = {}
        for name, server in (("script", script), ("module", module)):
            proxied_chat(server, fake_upstream)
            rss_kib[name] = server.memory_kib()["VmRSS"]
        assert rss_kib["script"] - rss_kib["module"] <= MAX_SCRIPT_OVER_MODULE_KIB, rss_kib
    finally:
        assert script.stop() == 0 and module.stop() == 0
