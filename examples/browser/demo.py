"""`make demo`: the whole browser story on this machine, against a fake OpenAI, no account needed.

It starts three things, as a real deployment has them, each on 127.0.0.1:
  the fake OpenAI     fake_openai.py: streamed chat completions and a Realtime echo over verified TLS
  SOAKP               soakp.py serve, trusting the fake's CA, with --cors-origins set to the page's origin
  the app's backend   backend.py: serves the page and mints its short-lived, origin-bound token
then prints the page's URL. The `openai` npm package is installed into examples/browser/.cache/ on
first use. tests/test_browser_demo.py runs this same code in headless Chromium.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from backend import BackendServer, Settings  # noqa: E402
from fake_openai import CertAuthority, FakeOpenAI, start_fake_openai  # noqa: E402

CACHE_DIR = HERE / ".cache"
SDK_PACKAGE = "openai@6"  # the major version this page is written against
NPM_TIMEOUT_S = 300.0
SOAKP_START_TIMEOUT_S = 15.0
SOAKP_STOP_TIMEOUT_S = 10.0


def sdk_dir(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / "node_modules" / "openai"


def ensure_sdk(cache_dir: Path = CACHE_DIR, quiet: bool = False) -> Path:
    """The `openai` npm package, installed into `cache_dir` with npm when it is not there yet.

    Returns its directory. Raises RuntimeError when npm is missing or fails.
    """
    target = sdk_dir(cache_dir)
    if (target / "index.mjs").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed once, to install the openai SDK for the page (Debian: apt-get install npm)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"installing {SDK_PACKAGE} into {cache_dir} (once) ...", flush=True)
    result = subprocess.run(
        [npm, "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund", "--no-save", "--loglevel=error",
         SDK_PACKAGE],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
    )
    if result.returncode != 0 or not (target / "index.mjs").is_file():
        raise RuntimeError(f"npm install {SDK_PACKAGE} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return target


class SoakpProcess:
    """`soakp.py serve` as a child process; its log lines go to a file (and the console, if asked)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, echo: IO[str] | None) -> None:
        self.log_path = log_path
        self.echo = echo
        self.url: str | None = None
        self._listening = threading.Event()
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "soakp.py"), "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        self._reader = threading.Thread(target=self._read_log, name="soakp-log", daemon=True)
        self._reader.start()
        try:
            started = self._listening.wait(SOAKP_START_TIMEOUT_S) and self.url is not None
        except BaseException:  # Ctrl-C or SIGTERM while it starts: never leave the child behind
            self.stop()
            raise
        if not started:
            self.stop()
            raise RuntimeError(f"SOAKP did not start; its log:\n{log_path.read_text()[-3000:]}")

    def _read_log(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.popen.stdout:
                log.write(line)
                log.flush()
                if self.echo is not None:
                    self.echo.write("soakp: " + line)
                    self.echo.flush()
                if self.url is None and "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split(",", 1)[0].strip()
                    self._listening.set()
        self._listening.set()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(SOAKP_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(SOAKP_STOP_TIMEOUT_S)
        self._reader.join(SOAKP_STOP_TIMEOUT_S)


@dataclass
class Demo:
    fake: FakeOpenAI
    soakp: SoakpProcess
    backend: BackendServer
    page_url: str
    key: str = field(repr=False)
    admin: tuple[str, str] = field(repr=False)
    _thread: threading.Thread | None = None

    @property
    def soakp_url(self) -> str:
        assert self.soakp.url is not None
        return self.soakp.url

    def stop(self) -> None:
        self.backend.shutdown()
        self.backend.server_close()
        self.soakp.stop()
        self.fake.stop()


def start_demo(workdir: Path, port: int = 0, ttl_s: int = 60, sdk: Path | None = None,
               echo: IO[str] | None = None, tls: bool = False) -> Demo:
    """Start the fake OpenAI, SOAKP and the backend (on `port`; 0 picks one). Returns the running Demo.

    With `tls`, SOAKP serves https and wss with a certificate from a throwaway CA (browsers will not
    trust it: the tests run Chromium with --ignore-certificate-errors).
    """
    key = "sk-demo-" + secrets.token_urlsafe(24)  # the "OpenAI key": only the backend and SOAKP see it
    admin = ("demo-admin", secrets.token_urlsafe(24))
    fake = start_fake_openai(workdir, key)
    backend: BackendServer | None = None
    try:
        # The backend's socket first: its port makes the page's origin, which SOAKP must know at start.
        backend = BackendServer(("127.0.0.1", port), Settings(soakp_url="", page_origin="", parent_token=""))
        page_origin = f"http://127.0.0.1:{backend.server_address[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOAKP_", "OPENAI_"))}
        env.update(SOAKP_SECRET=secrets.token_urlsafe(48), SOAKP_ADMIN_USER=admin[0], SOAKP_ADMIN_PASS=admin[1])
        args = ["--listen", "127.0.0.1:0", "--upstream", fake.url, "--upstream-ca", str(fake.ca_path),
                "--cors-origins", page_origin, "--db", ":memory:", "--shutdown-grace", "1s"]
        soakp_ca = None
        if tls:
            ca = CertAuthority(workdir / "soakp-ca")
            cert_path, key_path = ca.issue("soakp")
            args += ["--cert", str(cert_path), "--tls-key", str(key_path)]
            soakp_ca = str(ca.ca_path)
        soakp = SoakpProcess(args, env, workdir / "soakp.log", echo)
        assert soakp.url is not None
        # The operator's part, done once: a token that may delegate, limited to what the page uses, with a
        # budget. The backend gets only this token: never the key, never the admin password.
        parent = mint_parent_token(soakp.url, admin, key, page_origin, soakp_ca)
        backend.settings = Settings(
            soakp_url=soakp.url, page_origin=page_origin, parent_token=parent, ttl_s=ttl_s, soakp_ca=soakp_ca,
            sdk_dir=sdk or sdk_dir(), quiet=echo is None)
    except BaseException:
        if backend is not None:
            backend.server_close()
        fake.stop()
        raise
    demo = Demo(fake, soakp, backend, page_origin + "/", key, admin)
    demo._thread = threading.Thread(target=backend.serve_forever, name="demo-backend", daemon=True)
    demo._thread.start()
    return demo


def mint_parent_token(soakp_url: str, admin: tuple[str, str], key: str, page_origin: str,
                      soakp_ca: str | None) -> str:
    """POST /jwt/generate (admin) for the backend's delegating token: the page's endpoints and models,
    its origin, a rate, one level of delegation, a day to live.

    No budget here: this page opens Realtime WebSockets, whose usage SOAKP cannot meter, so SOAKP refuses
    them to budgeted tokens. A page that only chats would add "max_tokens_total" (every child then
    counts against it).
    """
    grant = {"key": key, "sub": "demo-backend", "ttl": "1d", "delegate": 1,
             "paths": ["/v1/chat/completions", "/v1/realtime"], "models": ["gpt-4o-mini", "gpt-realtime"],
             "origins": [page_origin], "rpm": 600}
    basic = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request = urllib.request.Request(soakp_url + "/jwt/generate", data=json.dumps(grant).encode(), method="POST",
                                     headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=soakp_ca) if soakp_url.startswith("https:") else None
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return str(json.load(response)["data"]["jwt"])


class Stop(Exception):
    """SIGTERM or SIGHUP: stop like Ctrl-C does, so every `finally` below runs."""


def stop_on_signal(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C raises KeyboardInterrupt; SIGTERM (kill, a supervisor) and SIGHUP (the terminal closed)
    # would end the process without cleaning up, leaving SOAKP running and the temporary folder.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8787, help="the page's port (default 8787; 0 picks one)")
    parser.add_argument("--ttl", type=int, default=60, help="token lifetime in seconds, short to see refreshes")
    args = parser.parse_args(argv)
    try:
        sdk = ensure_sdk()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stop):
        return 0
    with tempfile.TemporaryDirectory(prefix="soakp-demo-") as workdir:
        try:
            demo = start_demo(Path(workdir), args.port, args.ttl, sdk, echo=sys.stdout)
        except (OSError, RuntimeError) as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Stop):
            return 0
        try:
            # The admin login is the demo's own, made up at start: the console is for looking around.
            print(f"\n  fake OpenAI  {demo.fake.url}"
                  f"\n  SOAKP        {demo.soakp_url}  (--cors-origins {demo.page_url[:-1]}, "
                  f"pid {demo.soakp.popen.pid})"
                  f"\n  console      {demo.soakp_url}/admin/  (user {demo.admin[0]}, "
                  f"password {demo.admin[1]})"
                  f"\n  files        {workdir} (removed on exit)"
                  f"\n\n  Open {demo.page_url} in your browser. Ctrl-C stops everything.\n",
                  flush=True)
            while demo.soakp.popen.poll() is None:
                time.sleep(0.5)
            print("demo: SOAKP exited", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Stop):
            return 0
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut it short
            demo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
