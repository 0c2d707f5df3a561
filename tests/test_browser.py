"""A real browser calls SOAKP: headless Chromium opens a page served from another loopback origin, and
the page calls SOAKP with `fetch` and a token, as a browser app does.

The page (PAGE below) posts a streamed chat completion with `Authorization: Bearer <token>`, which
makes Chromium send a CORS preflight first; it reads the answer with `response.body.getReader()`,
writes what it gets into the DOM, and finally posts the DOM's text back to its own server, which is
what the tests assert on. To prove the answer arrives chunk by chunk, the fake upstream holds back
the second SSE event until the page tells its server that it has read the first one.

Chromium is Debian's `chromium` package (.ci/run installs it). Nothing here reads SOAKP's logs.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest

from fake_upstream import FakeUpstream, Gate, sse_reply

if TYPE_CHECKING:
    from conftest import Minted, SoakpLauncher, SoakpProcess

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)
REPORT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAX_REPORT_BYTES = 1024 * 1024
REPLY_PIECES = ["Hello", " from", " SOAKP"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>SOAKP from a browser</title></head>
<body>
<pre id="reply"></pre>
<pre id="result">running</pre>
<script>
// Everything the test hands the page is in the fragment, which the browser never sends to a server.
const params = new URLSearchParams(location.hash.slice(1));

async function main() {
  const result = {origin: location.origin, chunks: [], text: ""};
  try {
    const response = await fetch(params.get("soakp") + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer " + params.get("token"), "Content-Type": "application/json"},
      body: JSON.stringify({model: "gpt-4o-mini", stream: true, messages: [{role: "user", content: "hi"}]}),
    });
    result.status = response.status;
    result.contentType = response.headers.get("content-type");
    result.requestId = response.headers.get("x-request-id");  // readable only if exposed by CORS
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (let reads = 0; reads < 1000; reads++) {
      const {done, value} = await reader.read();
      if (done) break;
      const piece = decoder.decode(value, {stream: true});
      result.chunks.push(piece);
      if (result.chunks.length === 1) {
        await fetch("/first-chunk", {method: "POST", body: piece});  // lets the upstream send the rest
      }
      pending += piece;
      for (let end = pending.indexOf("\\n\\n"); end >= 0; end = pending.indexOf("\\n\\n")) {
        const event = pending.slice(0, end);
        pending = pending.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        result.text += JSON.parse(event.slice(6)).choices[0].delta.content || "";
        document.getElementById("reply").textContent = result.text;
      }
    }
  } catch (error) {
    result.error = String(error);
  }
  const shown = document.getElementById("result");
  shown.textContent = JSON.stringify(result);
  await fetch("/report", {method: "POST", body: shown.textContent});
}
main();
</script>
</body></html>
"""


# The page's own server ######################################################################################


class PageServer:
    """Serves PAGE on 127.0.0.1 (port 0) and collects what pages post back, in a thread of its own."""

    def __init__(self) -> None:
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.first_chunks: list[str] = []
        self.on_first_chunk: Callable[[], None] = lambda: None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server dispatches to
                if self.path != "/":
                    self.answer(404)
                    return
                self.answer(200, PAGE.encode(), "text/html; charset=utf-8")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, MAX_REPORT_BYTES)).decode("utf-8", "replace")
                if self.path == "/first-chunk":
                    owner.first_chunks.append(body)
                    owner.on_first_chunk()
                elif self.path == "/report":
                    owner.reports.put(json.loads(body))
                self.answer(204)

            def answer(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)
        self.thread.start()

    def reset(self) -> None:
        self.first_chunks.clear()
        self.on_first_chunk = lambda: None
        while not self.reports.empty():
            self.reports.get_nowait()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def open_page(url: str, pages: PageServer, workdir: Path) -> dict[str, Any]:
    """Open `url` in a fresh headless Chromium and return what the page reported (bounded wait)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    profile = workdir / f"chromium-profile-{time.monotonic_ns()}"
    stderr_path = profile.with_suffix(".log")
    with open(stderr_path, "wb") as stderr:
        browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return pages.reports.get(timeout=0.1)
            except queue.Empty:
                if browser.poll() is not None:
                    pytest.fail(f"chromium exited ({browser.returncode}):\n{stderr_path.read_text()[-3000:]}")
        pytest.fail(f"the page reported nothing in {REPORT_TIMEOUT_S}s:\n{stderr_path.read_text()[-3000:]}")
    finally:
        stop_browser(browser)


def stop_browser(browser: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the browser's own process group (it was started in a new session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(browser.pid, sig)
        except ProcessLookupError:
            return
        try:
            browser.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


# Fixtures ###################################################################################################


@pytest.fixture(scope="module")
def allowed_pages() -> Iterator[PageServer]:
    pages = PageServer()
    yield pages
    pages.stop()


@pytest.fixture(scope="module")
def other_pages() -> Iterator[PageServer]:
    pages = PageServer()
    yield pages
    pages.stop()


@pytest.fixture(scope="module")
def browser_soakp(soakp_launcher: SoakpLauncher, allowed_pages: PageServer) -> Iterator[SoakpProcess]:
    """SOAKP letting only the allowed page's origin call it from a browser."""
    process = soakp_launcher.start(cors_origins=f"http://127.0.0.1:{allowed_pages.port}")
    yield process
    process.stop()


@pytest.fixture
def browser_token(browser_soakp: SoakpProcess, allowed_pages: PageServer) -> Minted:
    """The README's browser token: chat completions with gpt-4o-mini, 20 a minute, from the page's origin."""
    return browser_soakp.mint_data(paths=["/v1/chat/completions"], models=["gpt-4o-mini"], rpm=20,
                                   origins=[f"http://127.0.0.1:{allowed_pages.port}"])


def page_url(origin: str, soakp_url: str, token: str) -> str:
    return f"{origin}/#" + urlencode({"soakp": soakp_url, "token": token})


def chunk_event(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-browser", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}]}


# Tests ######################################################################################################


def test_page_from_an_allowed_origin_streams_a_chat_completion(
    browser_soakp: SoakpProcess, allowed_pages: PageServer, browser_token: Minted, fake_upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    """The page's fetch passes the preflight, the key reaches the upstream, and the page reads the
    stream chunk by chunk: its first read holds the first event only, since the upstream sends the
    rest only after the page said it had it."""
    allowed_pages.reset()
    gate = Gate()
    allowed_pages.on_first_chunk = gate.open
    events = [chunk_event(piece) for piece in REPLY_PIECES] + [chunk_event("", "stop")]
    fake_upstream.script("/v1/chat/completions", sse_reply(events, gate=gate, hold_before=1))
    origin = f"http://127.0.0.1:{allowed_pages.port}"
    report = open_page(page_url(origin, browser_soakp.url, browser_token.token), allowed_pages, tmp_path)

    assert report.get("error") is None, report
    assert (report["origin"], report["status"]) == (origin, 200)
    assert report["contentType"].startswith("text/event-stream")
    assert report["requestId"].startswith("req_fake_")  # the upstream's x-request-id, exposed by CORS
    assert report["text"] == "".join(REPLY_PIECES)
    assert len(report["chunks"]) >= 2
    assert REPLY_PIECES[0] in report["chunks"][0] and REPLY_PIECES[1] not in report["chunks"][0]
    assert allowed_pages.first_chunks == [report["chunks"][0]]
    assert gate.reached.is_set() and gate.is_open

    (record,) = fake_upstream.requests
    assert record.header("origin") == origin
    assert record.json()["model"] == "gpt-4o-mini" and record.json()["stream"] is True
    assert record.header_all("authorization") == [f"Bearer {browser_token.key}"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_page_from_another_origin_cannot_call_soakp(
    browser_soakp: SoakpProcess, allowed_pages: PageServer, other_pages: PageServer, browser_token: Minted,
    fake_upstream: FakeUpstream, tmp_path: Path, host: str,
) -> None:
    """The same page from another port (another origin), or from `localhost` instead of 127.0.0.1 (also
    another origin), fails: SOAKP refuses the preflight, so fetch rejects and nothing goes upstream."""
    pages = other_pages if host == "127.0.0.1" else allowed_pages
    pages.reset()
    origin = f"http://{host}:{pages.port}"
    report = open_page(page_url(origin, browser_soakp.url, browser_token.token), pages, tmp_path)
    assert report["origin"] == origin
    assert report.get("error") == "TypeError: Failed to fetch", report
    assert "status" not in report and report["chunks"] == []
    assert fake_upstream.requests == []
