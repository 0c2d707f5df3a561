"""client/soakp-client.mjs, the companion module for browser apps, under Node's test runner.

This starts SOAKP and the fake upstream (with its Realtime route), runs
tests/node/soakp_client.test.mjs with `node --test` against them, and then checks from the
upstream's side what the module did: every request carried the OpenAI key, never a token, and the
WebSocket offered the key in place of the token.
The module in a browser is tested through examples/browser/ (tests/test_browser_demo.py).

Needs node (20 or newer) and the `openai` npm package, which examples/browser/demo.py installs into
examples/browser/.cache/ on first use, as `make demo` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fake_realtime import KEY_PROTOCOL, FakeRealtime
from fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpLauncher

ROOT = Path(__file__).resolve().parents[1]
NODE_TESTS = ROOT / "tests" / "node" / "soakp_client.test.mjs"
NODE_TIMEOUT_S = 90.0
NODE_TESTS_EXPECTED = 7  # the test() calls in NODE_TESTS: none may go missing or be skipped


def openai_sdk() -> Path:
    demo_dir = ROOT / "examples" / "browser"
    if str(demo_dir) not in sys.path:
        sys.path.insert(0, str(demo_dir))
    import demo

    try:
        return demo.ensure_sdk(quiet=True) / "index.mjs"
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot install the openai npm package: {exc}")


def test_companion_module_under_node(
    soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Debian: apt-get install nodejs)")
    realtime = FakeRealtime().install(fake_upstream)
    soakp_process = soakp_launcher.start()
    key = secrets_registry.new_key()
    env = {**os.environ, "TEST_SOAKP_URL": soakp_process.url,
           "TEST_SOAKP_ADMIN": ":".join(soakp_process.admin), "TEST_OPENAI_KEY": key,
           "TEST_OPENAI_SDK": str(openai_sdk())}
    # Node 20 has a global WebSocket only with --experimental-websocket (22 has it without).
    command = [node, "--experimental-websocket", "--test", "--test-reporter=tap", str(NODE_TESTS)]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    finally:
        soakp_process.stop()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    summary = re.findall(r"^# (tests|pass|fail|skipped|todo|cancelled) (\d+)$", result.stdout,
                         re.MULTILINE)
    expected = NODE_TESTS_EXPECTED
    assert {name: int(n) for name, n in summary} == {
        "tests": expected, "pass": expected, "fail": 0, "skipped": 0, "todo": 0, "cancelled": 0,
    }, report[-6000:]

    # What reached the upstream: the key, never a token, on every request and on the WebSocket.
    chats = [r for r in fake_upstream.requests if r.target == "/v1/chat/completions"]
    assert len(chats) == 5  # the successful chats of the node tests; refused ones never left SOAKP
    assert all(r.header("authorization") == f"Bearer {key}" for r in chats)
    assert all(b"eyJ" not in r.raw_head for r in fake_upstream.requests)
    (session,) = realtime.sessions
    assert session.offered == ["realtime", KEY_PROTOCOL + key]
    assert session.subprotocol == "realtime"
    assert session.request.target == "/v1/realtime?model=gpt-realtime"
