"""The operator console at /admin, in headless Chromium and over plain HTTP.

Chromium logs in the way a person does (the browser's Basic login prompt, answered over the DevTools
protocol), mints a token with limits in the page, sees it listed, uses it through SOAKP against the
fake upstream (which reports usage), sees the usage and the live figures appear without a reload,
revokes it after a confirmation and sees the next request refused. Every test fails on a console
error, an uncaught exception or a Content-Security-Policy violation.

Screenshots at desktop and phone width go to build/test-artifacts/, and the desktop one to
docs/console.png, which the README shows: each run regenerates them.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from conftest import basic_auth
from devtools import DESKTOP, PHONE, DevTools, chromium
from fake_upstream import FakeUpstream, json_reply

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpLauncher, SoakpProcess

import soakp

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "console.png"
LIVE_S = 12.0  # the page polls every 5 s: two polls and some slack
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
XSS_SUB = '<img src=x onerror="window.__pwned=1">'
BACKGROUND_REQUESTS = 100  # at most, in the screenshot test: about 3 a second while it waits

# Every CSP violation the page meets, recorded from before its first script runs. DevTools' own
# scripts are not subject to the page's policy, so this listener is there even on the console.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""

ROW_FACTS = """((sub) => {
  const row = [...document.querySelectorAll("#chains-body tr")]
    .find((tr) => tr.querySelector(".who")?.textContent === sub);
  if (!row) return null;
  const facts = Object.fromEntries(
    [...row.cells].map((td) => [td.dataset.col, td.textContent.trim()]));
  facts.id = row.dataset.id;
  facts.meter = row.querySelector("meter")?.value ?? null;
  facts.chips = [...row.querySelectorAll(".chip")].map((chip) => chip.textContent);
  return facts;
})"""


# Helpers ##########################################################################################


def open_console(page: DevTools, soakp_process: SoakpProcess) -> list[str]:
    """Log in through the browser's prompt and wait for the console's first live update. Returns
    the URLs that raised a login prompt, as they happen."""
    page.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)
    prompted = page.answer_logins(*soakp_process.admin)
    page.navigate(soakp_process.url + "/admin")
    page.wait_for("document.getElementById('live-status')?.textContent.startsWith('Live')")
    return prompted


def requests_sent(page: DevTools) -> list[dict[str, Any]]:
    """What the page sent, as Chromium's network stack put it on the wire (Network domain): method,
    URL, headers and body of each request."""
    with page.lock:
        events = list(page.events)
    sent = {e["params"]["requestId"]: dict(e["params"]["request"]) for e in events
            if e["method"] == "Network.requestWillBeSent"}
    for event in events:
        if event["method"] == "Network.requestWillBeSentExtraInfo":
            request = sent.get(event["params"]["requestId"])
            if request is not None:
                request["headers"] = event["params"]["headers"]  # with Origin, Authorization, ...
    return list(sent.values())


def assert_no_problems(page: DevTools) -> None:
    assert page.evaluate("window.__violations") == []
    assert page.problems() == []


def row_facts(page: DevTools, sub: str) -> dict[str, Any] | None:
    return page.evaluate(f"{ROW_FACTS}({json.dumps(sub)})")


def wait_for_row(page: DevTools, sub: str, condition: str = "true",
                 timeout_s: float = LIVE_S) -> dict[str, Any]:
    """Wait until the row of `sub` exists and `condition` (JavaScript over `facts`) holds."""
    page.wait_for(f"(() => {{ const facts = {ROW_FACTS}({json.dumps(sub)}); "
                  f"return facts && ({condition}); }})()", timeout_s)
    facts = row_facts(page, sub)
    assert facts is not None
    return facts


def click(page: DevTools, selector: str) -> None:
    page.evaluate(f"document.querySelector({json.dumps(selector)}).click()")


def fill_mint_form(page: DevTools, fields: dict[str, str]) -> None:
    page.evaluate(f"""(() => {{
      const form = document.getElementById("mint-form");
      for (const [name, value] of Object.entries({json.dumps(fields)})) {{
        form.elements[name].value = value;
      }}
    }})()""")


def press(page: DevTools, key: str, code: int, text: str = "") -> None:
    """One key press, as the keyboard sends it."""
    for kind in ("keyDown", "keyUp"):
        typed = {"text": text} if text and kind == "keyDown" else {}
        page.call("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                  windowsVirtualKeyCode=code, nativeVirtualKeyCode=code, **typed)


def login(soakp_process: SoakpProcess) -> list[tuple[str, str]]:
    return [("Authorization", basic_auth(*soakp_process.admin))]


def admin_rows(soakp_process: SoakpProcess) -> list[dict[str, Any]]:
    response = soakp_process.request("GET", "/jwt", headers=login(soakp_process))
    assert response.status == 200
    return response.json()["data"]


def chat(soakp_process: SoakpProcess, token: str) -> Any:
    return soakp_process.openai(token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


# Fixtures #########################################################################################


@pytest.fixture(scope="module")
def console_soakp(soakp_launcher: SoakpLauncher) -> Iterator[SoakpProcess]:
    process = soakp_launcher.start()
    yield process
    process.stop()


@pytest.fixture
def page() -> Iterator[DevTools]:
    with chromium() as devtools:
        yield devtools


# The page over HTTP ###############################################################################


def test_console_is_behind_the_admin_login_and_sent_with_a_strict_policy(
    console_soakp: SoakpProcess,
) -> None:
    wrong = console_soakp.request("GET", "/admin",
                                  headers=[("Authorization", basic_auth("admin", "wrong"))])
    assert wrong.status == 401 and wrong.header("www-authenticate").startswith("Basic realm=")
    for path, (content_type, body) in soakp.CONSOLE_ASSETS.items():
        refused = console_soakp.request("GET", path)  # a failed login: the next success forgets it
        assert refused.status == 401 and refused.header("www-authenticate").startswith("Basic ")
        assert refused.body.startswith(b'{"error":')
        response = console_soakp.request("GET", path, headers=login(console_soakp))
        assert response.status == 200 and response.body == body
        assert response.header("content-type") == content_type
        assert response.header("content-security-policy") == CSP
        assert response.header("x-content-type-options") == "nosniff"
        assert response.header("cache-control") == "no-store"
        assert response.header("referrer-policy") == "no-referrer"
        assert console_soakp.request("POST", path, headers=login(console_soakp)).status == 405
    # A minted token must not sit in a cache either: every admin answer carries the same headers.
    listed = console_soakp.request("GET", "/jwt", headers=login(console_soakp))
    assert listed.header("cache-control") == "no-store"
    assert listed.header("content-security-policy") == CSP


def test_console_page_loads_nothing_from_elsewhere_and_writes_no_markup() -> None:
    """The page's references are its own assets; the script reaches the admin endpoints and
    nothing else, and has no way to turn data into markup or to keep anything in the browser."""
    references = re.findall(r'(?:src|href)="([^"]*)"', soakp.CONSOLE_HTML)
    assert sorted(references) == ["#chains-title", "/admin/console.css", "/admin/console.js",
                                  "/admin/icon.svg"]
    script = soakp.CONSOLE_JS
    assert script.count("fetch(") == 1  # in api(), the one way out
    assert set(re.findall(r'api\("([^"]+)"', script)) == {"/jwt", "/metrics", "/jwt/generate",
                                                          "/jwt/revoke"}
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "Function(", "localStorage", "sessionStorage", "indexedDB", "document.cookie"):
        assert sink not in script, sink


# The page in a browser ############################################################################


def test_console_mints_lists_meters_and_revokes_a_token(
    console_soakp: SoakpProcess, page: DevTools, fake_upstream: FakeUpstream,
    secrets_registry: SecretsRegistry,
) -> None:
    page.call("Network.enable")
    prompted = open_console(page, console_soakp)
    key = secrets_registry.new_key()

    # 1. Mint a token with limits in the page's form.
    click(page, "#mint-open")
    assert page.evaluate("document.getElementById('mint-dialog').open")
    assert page.evaluate("document.activeElement.name") == "key"
    fill_mint_form(page, {"key": key, "sub": XSS_SUB, "ttl": "1h", "paths": "/v1/chat/completions",
                          "models": "gpt-4o-mini", "rpm": "30", "max_tokens_total": "1000"})
    click(page, "#mint-submit")
    page.wait_for("document.getElementById('token-dialog').open")
    token = secrets_registry.add(page.evaluate("document.getElementById('token-value').value"))
    assert token.count(".") == 2
    # The key left the page with the form.
    assert page.evaluate("document.getElementById('mint-form').elements.key.value") == ""
    click(page, "#token-copy")
    page.wait_for("document.getElementById('token-copy').textContent === 'Copied ✓'")
    click(page, "#token-done")
    assert page.evaluate("[document.getElementById('token-dialog').open, "
                         "document.getElementById('token-value').value.length]") == [False, 0]
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0

    # 2. It is listed: the label is text, never markup, and what the page shows is what /jwt says.
    facts = wait_for_row(page, XSS_SUB)
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('#chains-body img').length") == 0
    (row,) = [r for r in admin_rows(console_soakp) if r["sub"] == XSS_SUB]
    assert facts["id"] == row.get("cid", row["jti"])
    assert facts["status"] == "active" and facts["requests"] == "0"
    if "paths" in row:  # the chain's limits, from a server that lists them
        assert facts["chips"] == ["paths /v1/chat/completions", "models gpt-4o-mini", "rpm 30"]
    else:
        assert (facts["chips"], facts["limits"]) == ([], "–")

    # 3. Use it through SOAKP: the usage the upstream reported and the live figures appear unasked.
    reply = chat(console_soakp, token)
    assert reply.usage.prompt_tokens == 9 and reply.usage.completion_tokens == 3
    (forwarded,) = fake_upstream.requests
    assert forwarded.header("authorization") == f"Bearer {key}"
    facts = wait_for_row(page, XSS_SUB, "facts.requests === '1'")
    assert (facts["prompt"], facts["completion"]) == ("9", "3")
    if "max_tokens_total" in row:
        assert (facts["meter"], facts["budget"]) == (12, "12 / 1,000")
    else:
        assert (facts["meter"], facts["budget"]) == (None, "–")
    page.wait_for("document.getElementById('fig-ttfb').textContent.endsWith(' ms')", LIVE_S)
    figures = page.evaluate("""Object.fromEntries(["rps", "errors", "streams", "upstream", "ttfb"]
      .map((name) => [name, document.getElementById("fig-" + name).textContent]))""")
    assert figures["errors"] == "0 %" and figures["streams"] == "0" and figures["upstream"] == "0"
    assert re.fullmatch(r"\d+ ms", figures["ttfb"]) and re.fullmatch(r"\d+\.\d|\d+", figures["rps"])

    # 4. Revoke it: a first thought better of, then confirmed; the next request is refused.
    revoke_button = f"#chains-body tr[data-id={json.dumps(facts['id'])}] button[data-action=revoke]"
    click(page, revoke_button)
    assert page.evaluate("document.getElementById('revoke-dialog').open")
    assert XSS_SUB in page.evaluate("document.getElementById('revoke-text').textContent")
    assert page.evaluate("document.activeElement.id") == "revoke-cancel"  # the safe choice
    click(page, "#revoke-cancel")
    assert row_facts(page, XSS_SUB)["status"] == "active"
    assert chat(console_soakp, token).usage.total_tokens == 12
    click(page, revoke_button)
    click(page, "#revoke-confirm")
    facts = wait_for_row(page, XSS_SUB, "facts.status === 'revoked'", timeout_s=5)
    assert facts["actions"] == ""  # nothing left to revoke
    with pytest.raises(openai.AuthenticationError):
        chat(console_soakp, token)
    assert len(fake_upstream.requests) == 2
    (row,) = [r for r in admin_rows(console_soakp) if r["sub"] == XSS_SUB]
    assert row["revoked_at"] is not None

    # One login prompt, for the page: /jwt and /metrics got the same login without asking again.
    assert prompted == [console_soakp.url + "/admin"]
    # The page talked to the admin endpoints only, and sent the key to /jwt/generate only. Its POSTs
    # are JSON and carry its own origin; no request names the page it came from.
    sent = requests_sent(page)
    admin_paths = {*soakp.CONSOLE_ASSETS, "/jwt", "/metrics", "/jwt/generate", "/jwt/revoke"} - {soakp.CONSOLE_PATH}
    assert {r["url"].removeprefix(console_soakp.url) for r in sent} == admin_paths
    assert [r["url"] for r in sent if key in r.get("postData", "")] == [
        console_soakp.url + "/jwt/generate"]
    posts = [r for r in sent if r["method"] == "POST"]
    assert len(posts) == 2
    for post in posts:
        headers = {name.lower(): value for name, value in post["headers"].items()}
        assert headers["content-type"] == "application/json"
        assert headers["origin"] == console_soakp.url
        assert headers["authorization"].startswith("Basic ")
    assert not any("referer" in {n.lower() for n in r["headers"]} for r in sent)
    assert_no_problems(page)


def test_console_filters_and_sorts(console_soakp: SoakpProcess, page: DevTools) -> None:
    suffix = str(time.monotonic_ns())
    subs = [f"sort-{name}-{suffix}" for name in ("b", "a", "c")]
    for sub in subs:
        console_soakp.mint_data(sub=sub)
    open_console(page, console_soakp)
    page.evaluate(f"""(() => {{
      const input = document.getElementById("filter-text");
      input.value = {json.dumps(suffix)};
      input.dispatchEvent(new Event("input"));
    }})()""")
    shown = "[...document.querySelectorAll('#chains-body .who')].map((n) => n.textContent)"
    assert sorted(page.evaluate(shown)) == sorted(subs)
    assert page.evaluate("document.getElementById('count').textContent").startswith("3 of ")
    click(page, "button[data-sort=sub]")
    assert page.evaluate(shown) == sorted(subs)
    assert page.evaluate("document.querySelector('th[aria-sort]').textContent") == "Token▲"
    click(page, "button[data-sort=sub]")
    assert page.evaluate(shown) == sorted(subs, reverse=True)
    page.evaluate("""(() => {
      const select = document.getElementById("filter-status");
      select.value = "revoked";
      select.dispatchEvent(new Event("change"));
    })()""")
    assert page.evaluate(shown) == []
    assert not page.evaluate("document.getElementById('empty').hidden")
    assert_no_problems(page)


def test_console_works_from_the_keyboard(console_soakp: SoakpProcess, page: DevTools) -> None:
    open_console(page, console_soakp)
    press(page, "Tab", 9)
    assert page.evaluate("document.activeElement.className") == "skip"
    press(page, "Tab", 9)
    assert page.evaluate("document.activeElement.id") == "mint-open"
    press(page, "Enter", 13, "\r")
    page.wait_for("document.getElementById('mint-dialog').open")
    assert page.evaluate("document.activeElement.name") == "key"
    page.call("Input.insertText", text="sk-typed-then-abandoned")
    assert page.evaluate("document.activeElement.value") == "sk-typed-then-abandoned"
    press(page, "Escape", 27)
    # Escape closes the dialog, and the key typed so far goes with it.
    page.wait_for("!document.getElementById('mint-dialog').open && "
                  "document.getElementById('mint-form').elements.key.value === ''", 5)
    # A column heading is a button: Enter on it sorts.
    page.evaluate("document.querySelector('button[data-sort=requests]').focus()")
    press(page, "Enter", 13, "\r")
    sorted_by = page.evaluate("document.querySelector('th[aria-sort]').textContent")
    assert sorted_by.startswith("Requests")
    assert page.evaluate("document.activeElement.dataset.sort") == "requests"
    assert_no_problems(page)


def test_console_shows_why_a_mint_was_refused(console_soakp: SoakpProcess, page: DevTools) -> None:
    """The page's own check (a limit that is not a number) and SOAKP's (a key with a space) both
    end up in the dialog, which stays open; SOAKP's message does not repeat the key."""
    open_console(page, console_soakp)
    click(page, "#mint-open")
    fill_mint_form(page, {"key": "sk-fine", "rpm": "ten"})
    click(page, "#mint-submit")
    page.wait_for("document.getElementById('mint-error').textContent !== ''", 5)
    assert page.evaluate("document.getElementById('mint-error').textContent") == \
        "rpm must be a whole number."
    fill_mint_form(page, {"key": "sk-has a-space", "rpm": "10"})
    click(page, "#mint-submit")
    page.wait_for("document.getElementById('mint-error').textContent.includes('key')", 5)
    message = page.evaluate("document.getElementById('mint-error').textContent")
    assert "visible ASCII" in message and "has a-space" not in message
    assert page.evaluate("document.getElementById('mint-dialog').open")
    assert not page.evaluate("document.getElementById('token-dialog').open")
    # Chromium logs the refusal itself; nothing else went wrong.
    assert page.evaluate("window.__violations") == []
    assert page.problems() == ["log network/error: Failed to load resource: the server responded "
                               f"with a status of 400 (Bad Request) {console_soakp.url}/jwt/generate"]


def test_a_csp_violation_would_be_seen(console_soakp: SoakpProcess, page: DevTools) -> None:
    """The check every test ends with can fail: the page may not load an image from elsewhere."""
    open_console(page, console_soakp)
    page.evaluate("document.body.append(Object.assign(document.createElement('img'), "
                  "{src: 'http://127.0.0.2:9/probe.png'}))")
    page.wait_for("window.__violations.length > 0", 5)
    assert page.evaluate("window.__violations") == ["img-src http://127.0.0.2:9/probe.png"]
    deadline = time.monotonic() + 5
    while not page.problems() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("Content Security Policy" in problem for problem in page.problems())


# Screenshots ######################################################################################


def usage_reply(prompt: int, completion: int) -> Any:
    return json_reply({
        "id": "chatcmpl-shot", "object": "chat.completion", "created": int(time.time()),
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })


def test_console_screenshots_at_desktop_and_phone_width(
    soakp: Any, page: DevTools, fake_upstream: FakeUpstream,
) -> None:
    """A console with a few chains in different states, at 1440 px and at a phone's 390 px:
    written to build/test-artifacts/ and docs/console.png. At phone width nothing scrolls
    sideways."""
    process = soakp()
    chats = ["/v1/chat/completions"]
    ios = process.mint_data(sub="mobile-app/ios", paths=[*chats, "/v1/responses*"],
                            models=["gpt-4o-mini"], rpm=60, max_tokens_total=200_000, ttl="30d")
    web = process.mint_data(sub="web-checkout", paths=chats, origins=["https://shop.example"],
                            rpm=20, max_tokens_total=50_000, ttl="12h")
    evals = process.mint_data(sub="nightly-evals", paths=["/v1/*"], max_tokens_total=1_000_000,
                              ttl="7d")
    process.mint_data(sub="ci-smoke", ttl=1)
    leaked = process.mint_data(sub="laptop (lost)", ttl="90d")
    revoked = process.request("POST", "/jwt/revoke", body=json.dumps({"jti": leaked.jti}).encode(),
                              headers=[*login(process), ("Content-Type", "application/json")])
    assert revoked.status == 200
    open_console(page, process)
    # Traffic while the page watches, over two of its polls, so the live figures have something.
    for minted, (prompt, completion), times in ((ios, (1800, 950), 6), (web, (14_000, 22_500), 1),
                                                (evals, (120_000, 64_000), 2)):
        for _ in range(times):
            fake_upstream.script("/v1/chat/completions", usage_reply(prompt, completion), times=1)
            chat(process, minted.token)
            time.sleep(0.6)
    with pytest.raises(openai.PermissionDeniedError):  # web-checkout may not call embeddings
        process.openai(web.token).embeddings.create(model="text-embedding-3-small", input="x")
    wait_for_row(page, "nightly-evals", "facts.requests === '2'")
    wait_for_row(page, "ci-smoke", "facts.status === 'expired'")
    page.wait_for("document.getElementById('fig-ttfb').textContent.endsWith(' ms')", LIVE_S)
    # Steady traffic while the sparkline fills (it shows from the third poll since the page opened).
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(BACKGROUND_REQUESTS):
            if stop.wait(0.3):
                return
            chat(process, ios.token)

    background = threading.Thread(target=traffic, name="console-traffic", daemon=True)
    background.start()
    try:
        page.wait_for("document.querySelectorAll('#fig-spark polyline').length === 1 && "
                      "document.querySelector('#fig-spark polyline').points.length >= 3", 3 * LIVE_S)
    finally:
        stop.set()
        background.join(10)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    desktop = page.screenshot(ARTIFACTS / "console-desktop.png", DESKTOP, full_page=False)
    phone = page.screenshot(ARTIFACTS / "console-phone.png", PHONE)
    page.screenshot(ARTIFACTS / "console-phone-top.png", PHONE, full_page=False)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE.width
    click(page, "#mint-open")
    page.screenshot(ARTIFACTS / "console-mint-phone.png", PHONE, full_page=False)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE.width
    mint_dialog = page.screenshot(ARTIFACTS / "console-mint-desktop.png", DESKTOP, full_page=False)
    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    DOCS_SCREENSHOT.write_bytes(desktop.read_bytes())
    for shot in (desktop, phone, mint_dialog):
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 20_000
    assert_no_problems(page)
