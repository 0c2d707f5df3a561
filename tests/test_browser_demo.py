"""The browser demo (examples/browser/, `make demo`) end to end, in headless Chromium.

The stack is the one `make demo` runs (examples/browser/demo.py: the fake OpenAI, SOAKP as a
subprocess, the app's backend), on ports picked by the system. Chromium opens the page; the test
drives and reads it over the DevTools protocol (a `websockets` client) and asserts on the page and
on what the fake OpenAI received: a chat completion streamed with the official `openai` SDK, a
Realtime echo over a WebSocket that carried the token as a subprotocol, and a token refreshed at
SOAKP before it expired.

Needs Debian's `chromium` (.ci/run installs it) and npm, which installs the `openai` package into
examples/browser/.cache/ on first use, exactly as `make demo` does.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import itertools
import json
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from fake_realtime import KEY_PROTOCOL

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "examples" / "browser"
if str(DEMO_DIR) not in sys.path:
    sys.path.insert(0, str(DEMO_DIR))

import demo as browser_demo  # noqa: E402
from fake_openai import reply_text  # noqa: E402

if TYPE_CHECKING:
    from conftest import SecretsRegistry

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0",
)
TOKEN_TTL_S = 6  # short, so that the page refreshes its token during the test
START_TIMEOUT_S = 15.0
PAGE_TIMEOUT_S = 20.0
CDP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
FIRST_CHAT = "Hello, SOAKP!"  # the page's defaults (index.html)
FIRST_REALTIME = "Hello over WebSocket"


# The demo stack and the browser #############################################################################


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, secrets_registry: SecretsRegistry) -> Iterator[browser_demo.Demo]:
    try:
        sdk = browser_demo.ensure_sdk(quiet=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot vendor the openai SDK for the page: {exc}")
    running = browser_demo.start_demo(tmp_path_factory.mktemp("demo"), port=0, ttl_s=TOKEN_TTL_S, sdk=sdk)
    secrets_registry.add(running.key)
    secrets_registry.add(running.admin[1])
    secrets_registry.logs.append(running.soakp.log_path)
    yield running
    running.stop()


class DevTools:
    """A bounded DevTools-protocol client for one page target."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + CDP_TIMEOUT_S
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def state(self) -> dict[str, Any] | None:
        return self.evaluate("window.demo ? JSON.parse(JSON.stringify(window.demo.state)) : null")


@contextlib.contextmanager
def browser_page(url: str, *extra_flags: str) -> Iterator[DevTools]:
    """Headless Chromium with `url` open, driven over the DevTools protocol; stopped on exit."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    profile = Path(tempfile.mkdtemp(prefix="soakp-chromium-"))
    stderr_path = profile.parent / f"{profile.name}.log"
    with open(stderr_path, "wb") as stderr:
        browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}",
                                    "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not open its DevTools port: {stderr_path.read_text()[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text().split("\n")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=CDP_TIMEOUT_S) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], proxy=None, max_size=None, ping_interval=None,
                     open_timeout=CDP_TIMEOUT_S, close_timeout=2) as ws:
            devtools = DevTools(ws)
            devtools.call("Page.enable")
            devtools.call("Page.navigate", url=url)
            yield devtools
    finally:
        browser.send_signal(signal.SIGTERM)
        try:
            browser.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(STOP_TIMEOUT_S)
        shutil.rmtree(profile, ignore_errors=True)
        stderr_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def page(demo: browser_demo.Demo) -> Iterator[DevTools]:
    """The demo page in headless Chromium."""
    with browser_page(demo.page_url) as devtools:
        yield devtools


def wait_for_state(page: DevTools, done: Any, timeout_s: float = PAGE_TIMEOUT_S) -> tuple[dict[str, Any], list[str]]:
    """Poll the page's state until done(state); return it and every partial chat text seen on the way."""
    deadline = time.monotonic() + timeout_s
    partial: list[str] = []
    state = None
    while time.monotonic() < deadline:
        state = page.state()
        if state is not None:
            text = state["chat"]["text"]
            if text and not state["chat"]["done"] and (not partial or partial[-1] != text):
                partial.append(text)
            if done(state):
                return state, partial
        time.sleep(0.03)
    raise AssertionError(f"the page did not get there in {timeout_s}s; its state: {state}")


def admin_get(demo: browser_demo.Demo, path: str) -> Any:
    basic = base64.b64encode(f"{demo.admin[0]}:{demo.admin[1]}".encode()).decode()
    request = urllib.request.Request(demo.soakp_url + path, headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(request, timeout=CDP_TIMEOUT_S) as response:
        return json.load(response)


# The page in a browser ######################################################################################


def test_page_streams_a_chat_and_echoes_over_realtime(page: DevTools, demo: browser_demo.Demo) -> None:
    state, partial = wait_for_state(page, lambda s: s["realtime"]["closeCode"] is not None or s["chat"]["error"])

    # 1. The streamed chat: shown chunk by chunk, with the official SDK, the key swapped in by SOAKP.
    assert state["chat"]["error"] is None and state["chat"]["done"], state
    expected = reply_text(FIRST_CHAT)
    assert state["chat"]["text"] == expected
    assert page.evaluate("document.getElementById('chat-output').textContent") == expected
    assert state["chat"]["chunks"] == len(expected.split(" "))
    assert len(partial) >= 2, f"the page never showed a partial answer: {partial}"
    assert all(expected.startswith(text) for text in partial)
    chat = demo.fake.upstream.wait_for_request("/v1/chat/completions")
    assert chat.header("authorization") == f"Bearer {demo.key}"
    assert chat.header("x-stainless-lang") == "js"  # sent by the official SDK
    assert chat.header("origin") == demo.page_url.rstrip("/")
    assert chat.json()["stream"] is True

    # 2. The Realtime echo: the browser passed its token as a subprotocol; SOAKP swapped in the key.
    assert state["realtime"] == {"protocol": "realtime", "echo": FIRST_REALTIME, "closeCode": 1000, "error": None}
    assert FIRST_REALTIME in page.evaluate("document.getElementById('realtime-log').textContent")
    session = demo.fake.realtime.wait_for_session()
    assert session.offered == ["realtime", KEY_PROTOCOL + demo.key]
    assert session.subprotocol == "realtime"
    assert session.header("authorization") == f"Bearer {demo.key}"  # added by SOAKP, not by the browser
    assert session.header("origin") == demo.page_url.rstrip("/")
    assert "Chrome" in (session.header("user-agent") or "")
    assert session.request.target == "/v1/realtime?model=gpt-realtime"
    assert demo.fake.realtime.wait_ended(session) == "closed" and session.client_close == (1000, "done")
    for request in (chat.raw_head, session.request.raw_head):
        assert b"eyJ" not in request, "a SOAKP token reached the upstream"


def test_page_refreshes_its_token_before_it_expires(page: DevTools, demo: browser_demo.Demo) -> None:
    state, _ = wait_for_state(page, lambda s: s["refreshes"] >= 1 and s["realtime"]["closeCode"] is not None,
                              timeout_s=PAGE_TIMEOUT_S + TOKEN_TTL_S)
    assert state["tokenError"] is None, state
    after = page.evaluate("window.demo.chat('after the refresh')", await_promise=True)
    assert after["error"] is None and after["text"] == reply_text("after the refresh")
    tokens = admin_get(demo, "/jwt")["data"]
    # GET /jwt lists one row per chain (the page's first token and every refresh of it), naming the
    # chain's newest token: the page refreshed when that is no longer the first.
    page_chains = sorted((t for t in tokens if t["sub"] == "demo-backend/browser:demo"),
                         key=lambda t: t["created_at"])
    first = page_chains[0]
    assert first["jti"] != first["cid"], "the page never refreshed its token"
    assert first["revoked_at"] is None and first["renew_until"] > first["expires_at"]
    # the first chat, the Realtime handshake and the chat after the refresh, all on one chain
    assert first["requests"] >= 3


ONLY_THE_KEY_PROTOCOL = """(async () => {
  const given = await (await fetch("/api/soakp-token", { method: "POST" })).json();
  const url = given.soakp_url.replace(/^http/, "ws") + "/v1/realtime?model=gpt-realtime";
  return await new Promise((resolve) => {
    const ws = new WebSocket(url, ["openai-insecure-api-key." + given.token]);
    let opened = false;
    ws.onopen = () => { opened = true; ws.close(1000); };
    ws.onclose = (event) => resolve({ opened, code: event.code });
    setTimeout(() => resolve({ opened, code: null }), 5000);
  });
})()"""


def test_offering_only_the_token_protocol_fails_in_chromium(page: DevTools, demo: browser_demo.Demo) -> None:
    """Why the page must offer "realtime" too: SOAKP's 101 never names the protocol carrying the token,
    and Chromium drops a handshake whose answer names none of the protocols it offered."""
    wait_for_state(page, lambda s: s["realtime"]["closeCode"] is not None)
    before = len(demo.fake.realtime.sessions)
    assert page.evaluate(ONLY_THE_KEY_PROTOCOL, await_promise=True) == {"opened": False, "code": 1006}
    session = demo.fake.realtime.wait_for_session(before)  # SOAKP did connect: the browser refused the 101
    assert session.offered == [KEY_PROTOCOL + demo.key]


SDK_REALTIME_HELPER = """(async () => {
  const { OpenAIRealtimeWebSocket } = await import("/vendor/openai/realtime/websocket.mjs");
  const { default: OpenAI } = await import("/vendor/openai/index.mjs");
  const given = await (await fetch("/api/soakp-token", { method: "POST" })).json();
  const client = new OpenAI({ baseURL: given.soakp_url + "/v1", apiKey: given.token, dangerouslyAllowBrowser: true });
  const rt = new OpenAIRealtimeWebSocket({ model: "gpt-realtime" }, client);
  const next = (type) => new Promise((resolve, reject) => {
    rt.on(type, resolve);
    rt.on("error", (error) => reject(String(error.message ?? error)));
    setTimeout(() => reject("no " + type + " in time"), 5000);
  });
  await next("session.created");
  rt.send({ type: "conversation.item.create",
            item: { type: "message", role: "user", content: [{ type: "input_text", text: "via the SDK" }] } });
  const echo = await next("conversation.item.create");
  rt.close();
  return { url: String(rt.url), text: echo.item.content[0].text };
})()"""


def test_page_over_https_and_wss_and_the_sdk_realtime_helper(
    tmp_path: Path, secrets_registry: SecretsRegistry
) -> None:
    """With SOAKP on https, as in production: the page's fetch and WebSocket go over https and wss, and
    the SDK's own OpenAIRealtimeWebSocket (which always uses wss and the same subprotocol) works too."""
    running = browser_demo.start_demo(tmp_path, port=0, ttl_s=60, sdk=browser_demo.ensure_sdk(quiet=True), tls=True)
    secrets_registry.add(running.key)
    secrets_registry.add(running.admin[1])
    secrets_registry.logs.append(running.soakp.log_path)
    try:
        assert running.soakp_url.startswith("https://")
        with browser_page(running.page_url, "--ignore-certificate-errors") as tls_page:
            state, _ = wait_for_state(tls_page, lambda s: s["realtime"]["closeCode"] is not None or s["chat"]["error"])
            assert state["chat"]["done"] and state["chat"]["text"] == reply_text(FIRST_CHAT), state
            assert state["realtime"]["echo"] == FIRST_REALTIME and state["realtime"]["protocol"] == "realtime", state
            helper = tls_page.evaluate(SDK_REALTIME_HELPER, await_promise=True)
        assert helper == {"url": running.soakp_url.replace("https://", "wss://") + "/v1/realtime?model=gpt-realtime",
                          "text": "via the SDK"}
        sessions = running.fake.realtime.sessions
        assert len(sessions) == 2
        assert all(s.offered == ["realtime", KEY_PROTOCOL + running.key] for s in sessions)
    finally:
        running.stop()


# The backend, over plain HTTP ###############################################################################


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=CDP_TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_backend_mints_a_short_lived_origin_bound_token(
    demo: browser_demo.Demo, secrets_registry: SecretsRegistry
) -> None:
    origin = demo.page_url.rstrip("/")
    status, given = post(demo.page_url + "api/soakp-token", {"Origin": origin})
    assert status == 200, given
    token = secrets_registry.add(given["token"])
    assert given["soakp_url"] == demo.soakp_url
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == TOKEN_TTL_S
    assert claims["origins"] == [origin]
    assert claims["paths"] == ["/v1/chat/completions", "/v1/realtime"]
    assert claims["models"] == ["gpt-4o-mini", "gpt-realtime"]
    assert demo.key not in json.dumps(given)
    # A child of the backend's delegating token (issue 18): the backend holds neither the key nor the
    # admin password, only that token.
    assert claims["sub"] == "demo-backend/browser:demo" and len(claims["anc"]) == 1
    held = json.dumps(dataclasses.asdict(demo.backend.settings), default=str)
    assert demo.key not in held and demo.admin[1] not in held

    # Bound to the page's origin: another site's page cannot use it, even with the token in hand.
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for page_origin, expected in (("https://evil.example", 403), (origin, 200)):
        request = urllib.request.Request(demo.soakp_url + "/v1/chat/completions", data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Origin": page_origin})
        try:
            with urllib.request.urlopen(request, timeout=CDP_TIMEOUT_S) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status == expected, page_origin

    # Another site cannot have the backend mint one for it.
    status, _ = post(demo.page_url + "api/soakp-token", {"Origin": "https://evil.example"})
    assert status == 403


@pytest.mark.parametrize("path", ["/vendor/openai/../backend.py", "/vendor/openai/../../../../etc/passwd",
                                  "/vendor/openai/%2e%2e/backend.py", "/backend.py", "/vendor/openai/package.json"])
def test_backend_serves_only_the_page_and_the_sdk(demo: browser_demo.Demo, path: str) -> None:
    host, port = demo.backend.server_address[:2]
    connection = http.client.HTTPConnection(str(host), port, timeout=CDP_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if path.endswith("package.json"):
        assert response.status == 200 and json.loads(body)["name"] == "openai"
    else:
        assert response.status == 404, (path, body[:200])


# `make demo` itself #########################################################################################


def test_demo_command_prints_the_url_and_serves_the_page(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, str(DEMO_DIR / "demo.py"), "--port", "0"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url, seen = None, []
        deadline = time.monotonic() + START_TIMEOUT_S + 60  # npm may run first, where the SDK is not cached
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if process.poll() is not None:
                    break
                continue
            seen.append(line)
            if line.strip().startswith("Open http://"):
                url = line.split()[1]
        assert url is not None, "".join(seen)
        with urllib.request.urlopen(url, timeout=CDP_TIMEOUT_S) as response:
            assert b'<script type="module" src="/app.js">' in response.read()
        with urllib.request.urlopen(url + "vendor/openai/index.mjs", timeout=CDP_TIMEOUT_S) as response:
            assert response.headers["Content-Type"] == "text/javascript"
        process.send_signal(signal.SIGINT)
        assert process.wait(STOP_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        reader.join(STOP_TIMEOUT_S)


# Controls only when ready; every process and file gone on SIGTERM (issue #15) ####################


READY_PROBE = """document.getElementById('realtime-send') && JSON.stringify({
  chatDisabled: document.getElementById('chat-send').disabled,
  realtimeDisabled: document.getElementById('realtime-send').disabled,
  ready: Boolean(window.demo && window.demo.ready),
  firstRunsOver: Boolean(window.demo && window.demo.state.realtime.closeCode !== null),
})"""


def test_the_controls_work_only_once_the_pages_own_first_runs_are_over(
        demo: browser_demo.Demo) -> None:
    """Before: Send worked while the page's own first chat streamed, and the answers interleaved
    ("HelloHello from from the the fake fake ...")."""
    with browser_page(demo.page_url) as fresh:
        samples = []
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while time.monotonic() < deadline:
            probe = fresh.evaluate(READY_PROBE)
            if probe:  # null until the page is there
                samples.append(json.loads(probe))
                if samples[-1]["ready"]:
                    break
            # A click while the page runs its own first chat must do nothing.
            fresh.evaluate("document.getElementById('chat-send')?.click()")
            time.sleep(0.02)
        before = [s for s in samples if not s["firstRunsOver"]]
        assert before, "the page was done before the first look; the test saw nothing"
        assert all(s["chatDisabled"] and s["realtimeDisabled"] for s in before), before
        assert samples[-1] == {"chatDisabled": False, "realtimeDisabled": False, "ready": True,
                               "firstRunsOver": True}
        state = fresh.state()
        assert state is not None and state["chat"]["text"] == reply_text(FIRST_CHAT)

        # Two clicks in a row once ready: one answer, whole, never two woven together.
        fresh.evaluate("document.getElementById('chat-input').value = 'one at a time';"
                       "document.getElementById('chat-send').click();"
                       "document.getElementById('chat-send').click();")
        first = reply_text(FIRST_CHAT)
        finished, _ = wait_for_state(fresh,
                                     lambda s: s["chat"]["done"] and s["chat"]["text"] != first)
        assert finished["chat"]["text"] == reply_text("one at a time")
        shown = fresh.evaluate("document.getElementById('chat-output').textContent")
        assert shown == reply_text("one at a time")
        # The page's own API queues a second call behind the first instead of interleaving.
        both = fresh.evaluate("Promise.all([window.demo.chat('first call'),"
                              " window.demo.chat('second call')])"
                              ".then(() => document.getElementById('chat-output').textContent)",
                              await_promise=True)
        assert both == reply_text("second call")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_stops_everything_it_started_on_sigterm_and_ctrl_c(tmp_path: Path,
                                                                signum: int) -> None:
    """Before: SIGTERM to demo.py left its SOAKP child running and its temporary folder behind."""
    process = subprocess.Popen([sys.executable, str(DEMO_DIR / "demo.py"), "--port", "0"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()],
                              daemon=True)
    reader.start()
    try:
        seen: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S + 60
        def opened() -> bool:
            return any(line.strip().startswith("Open http://") for line in seen)

        while not opened() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
            assert process.poll() is None, "".join(seen)
        text = "".join(seen)
        workdir = Path(next(line.split()[1] for line in seen if line.strip().startswith("files ")))
        soakp_pid = int(text.split(", pid ")[1].split(")")[0])
        soakp_line = next(line for line in seen if line.strip().startswith("SOAKP "))
        soakp_port = int(soakp_line.split()[1].rsplit(":", 1)[1])
        page_url = next(line.split()[1] for line in seen if line.strip().startswith("Open http://"))
        assert workdir.is_dir() and soakp_pid in child_pids(process.pid)
        children = child_pids(process.pid)

        process.send_signal(signum)
        assert process.wait(STOP_TIMEOUT_S) == 0
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not all(gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(pid) for pid in children), children
        assert not workdir.exists()
        for url in (f"http://127.0.0.1:{soakp_port}/healthz", page_url):
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(url, timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        reader.join(STOP_TIMEOUT_S)
