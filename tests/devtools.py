"""Headless Chromium driven over the DevTools protocol, for the browser tests of the console
(tests/test_console.py).

The approach of tests/test_browser_demo.py (Debian's /usr/bin/chromium with the flags that work in a
container, DevToolsActivePort, a `websockets` client), plus what those tests need beyond evaluating
JavaScript: a reader thread that collects events (console messages, exceptions, log entries such as
CSP violations), answers the browser's HTTP authentication prompts the way a person typing into the
login dialog would, and screenshots at a given viewport.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0", "--hide-scrollbars",
)
START_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
CONSOLE_PROBLEMS = ("error", "warning", "assert")
# Resolves after the next frame has been drawn: a screenshot then shows the new viewport's layout.
NEXT_FRAME = "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    scale: float = 1.0
    mobile: bool = False


DESKTOP = Viewport(1440, 900)
PHONE = Viewport(390, 844, scale=2.0, mobile=True)  # an iPhone 12 to 15's CSS pixels


class DevTools:
    """A DevTools-protocol client for one page target. Replies and events are read on a thread of
    its own, so that the browser never waits on the test to answer a login prompt."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.replies: dict[int, dict[str, Any]] = {}
        self.arrived = threading.Condition(self.lock)
        self.events: list[dict[str, Any]] = []
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.reader = threading.Thread(target=self._read, name="devtools-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                with self.arrived:
                    if "id" in message:
                        self.replies[message["id"]] = message
                    else:
                        self.events.append(message)
                    self.arrived.notify_all()
                handler = self.handlers.get(message.get("method", ""))
                if handler is not None:
                    handler(message["params"])
        except ConnectionClosed:
            pass

    def send(self, method: str, **params: Any) -> int:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        return ident

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = self.send(method, **params)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        with self.arrived:
            while ident not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{method}: no answer from chromium in {CALL_TIMEOUT_S}s")
                self.arrived.wait(left)
            message = self.replies.pop(ident)
        if "error" in message:
            raise AssertionError(f"{method}: {message['error']}")
        return message["result"]

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 15.0) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(POLL_S)
        raise AssertionError(f"not true within {timeout_s}s: {expression} (last value {value!r})")

    def navigate(self, url: str, timeout_s: float = 15.0) -> None:
        """Open `url` and wait until its document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                      timeout_s)

    def answer_logins(self, user: str, password: str) -> list[str]:
        """Type `user` and `password` into every HTTP login prompt, as a person would.

        Returns the list (filled as it happens) of URLs whose 401 raised a prompt.
        """
        prompted: list[str] = []

        def paused(params: dict[str, Any]) -> None:
            self.send("Fetch.continueRequest", requestId=params["requestId"])

        def auth(params: dict[str, Any]) -> None:
            prompted.append(params["request"]["url"])
            answer = {"response": "ProvideCredentials", "username": user, "password": password}
            self.send("Fetch.continueWithAuth", requestId=params["requestId"],
                      authChallengeResponse=answer)

        self.handlers["Fetch.requestPaused"] = paused
        self.handlers["Fetch.authRequired"] = auth
        self.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        return prompted

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and browser log entries (CSP violations
        among them) seen so far."""
        found = []
        with self.lock:
            events = list(self.events)
        for event in events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in CONSOLE_PROBLEMS:
                found.append(f"console.{params['type']}: " + " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + str(details.get("exception", {}).get("description")
                                                 or details.get("text")))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found.append(f"log {entry['source']}/{entry['level']}: {entry['text']} "
                             f"{entry.get('url', '')}")
        return found

    def screenshot(self, path: Path, viewport: Viewport, full_page: bool = True) -> Path:
        """A PNG of the page at `viewport` (the whole page when `full_page`), written to `path`."""
        self.call("Emulation.setDeviceMetricsOverride", width=viewport.width,
                  height=viewport.height, deviceScaleFactor=viewport.scale, mobile=viewport.mobile)
        self.evaluate(NEXT_FRAME, await_promise=True)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.contextmanager
def chromium(*extra_flags: str) -> Iterator[DevTools]:
    """Headless Chromium on about:blank, driven over the DevTools protocol; stopped on exit.

    Console, exception and log events are collected from the start (DevTools.problems()).
    """
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed (Debian: apt-get install chromium; "
                    ".ci/run installs it)")
    profile = Path(tempfile.mkdtemp(prefix="soakp-chromium-"))
    stderr_path = profile.parent / f"{profile.name}.log"
    with open(stderr_path, "wb") as stderr:
        command = [binary, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}",
                   "about:blank"]
        browser = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port: "
                            f"{stderr_path.read_text()[-2000:]}")
            time.sleep(POLL_S)
        port = int(port_file.read_text().split("\n")[0])
        targets_url = f"http://127.0.0.1:{port}/json/list"
        with urllib.request.urlopen(targets_url, timeout=CALL_TIMEOUT_S) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], proxy=None, max_size=None, ping_interval=None,
                     open_timeout=CALL_TIMEOUT_S, close_timeout=2) as ws:
            devtools = DevTools(ws)
            for domain in ("Page", "Runtime", "Log"):
                devtools.call(f"{domain}.enable")
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
