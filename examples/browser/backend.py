"""A web app's backend for the SOAKP browser story. Python standard library only.

It holds one SOAKP token that may delegate (minted once by the operator, limited to this page's
endpoints, models and origin, with a budget), never the OpenAI key or SOAKP's admin credentials. For
each visitor it mints a short-lived child of that token at SOAKP (POST /jwt/delegate): every limit of
the child is within the parent's. It serves the page too, so the token travels from the page's own
origin.

    GET  /                   index.html, app.js, style.css, soakp-client.mjs (from ../../client/)
                             and the vendored `openai` SDK under /vendor/openai/
    POST /api/soakp-token    {"token", "expires_at", "soakp_url", "chat_model", "realtime_model"}

Run it next to a SOAKP (the settings come from flags and the environment), with the delegating token
in SOAKP_PARENT_TOKEN (or a file named by SOAKP_PARENT_TOKEN_FILE):

    SOAKP_PARENT_TOKEN=eyJ... \\
        python backend.py --listen 127.0.0.1:8000 --soakp-url https://127.0.0.1:3033 --soakp-ca var/tls/fullchain.pem

SOAKP must list the page's origin in --cors-origins (here http://127.0.0.1:8000).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_MODULE = HERE.parents[1] / "client" / "soakp-client.mjs"  # the companion module
STATIC_FILES = {
    "/": (HERE / "index.html", "text/html; charset=utf-8"),
    "/app.js": (HERE / "app.js", "text/javascript"),
    "/style.css": (HERE / "style.css", "text/css"),
    "/soakp-client.mjs": (CLIENT_MODULE, "text/javascript"),
}
VENDOR_PREFIX = "/vendor/openai/"
DEFAULT_SDK_DIR = HERE / ".cache" / "node_modules" / "openai"
MIME_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
              ".map": "application/json"}
SOAKP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Settings:
    soakp_url: str  # where the browser (and this backend) reach SOAKP
    page_origin: str  # this site's origin: the only one the token works from
    parent_token: str = field(repr=False)  # a SOAKP token minted with "delegate": 1, the backend's only secret
    ttl_s: int = 600  # short-lived: a leaked token is worth little, and the page refreshes it
    renew_ttl_s: int = 8 * 3600  # how long the page may keep refreshing it (its chain's renew-until)
    paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/realtime")  # only what the page calls
    chat_model: str = "gpt-4o-mini"
    realtime_model: str = "gpt-realtime"
    rpm: int = 30
    soakp_ca: str | None = None  # CA file for a SOAKP with a self-signed certificate
    sdk_dir: Path = DEFAULT_SDK_DIR
    quiet: bool = False


def mint_browser_token(settings: Settings, user: str) -> dict[str, object]:
    """Ask SOAKP for a child of the backend's token for this visitor: POST /jwt/delegate.

    The child inherits the key and every limit it does not narrow; what it names here must be within
    the parent's, or SOAKP answers 400. Returns what the page gets. Raises urllib.error.URLError when
    SOAKP cannot be reached or refuses.
    """
    grant = {
        "ttl": settings.ttl_s,
        "renew_ttl": max(settings.renew_ttl_s, settings.ttl_s),
        "sub": f"browser:{user}",  # the child's sub is the parent's + "/" + this
        "paths": list(settings.paths),
        "models": [settings.chat_model, settings.realtime_model],
        "origins": [settings.page_origin],
        "rpm": settings.rpm,
    }
    request = urllib.request.Request(
        settings.soakp_url + "/jwt/delegate", data=json.dumps(grant).encode(), method="POST",
        headers={"Authorization": f"Bearer {settings.parent_token}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=settings.soakp_ca) if settings.soakp_url.startswith("https:") else None
    with urllib.request.urlopen(request, timeout=SOAKP_TIMEOUT_S, context=context) as response:
        data = json.load(response)["data"]
    return {"token": data["jwt"], "expires_at": data["expires_at"], "soakp_url": settings.soakp_url,
            "chat_model": settings.chat_model, "realtime_model": settings.realtime_model}


def content_security_policy(soakp_url: str) -> str:
    """The page may load only its own scripts and talk only to itself and SOAKP (https and wss)."""
    soakp_ws = "ws" + soakp_url[len("http"):]
    return f"default-src 'self'; connect-src 'self' {soakp_url} {soakp_ws}; base-uri 'none'; frame-ancestors 'none'"


class Handler(BaseHTTPRequestHandler):
    server: BackendServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in STATIC_FILES:
            file, content_type = STATIC_FILES[path]
            self.send_file(file, content_type)
        elif path.startswith(VENDOR_PREFIX):
            self.send_vendored(path[len(VENDOR_PREFIX):])
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        settings = self.server.settings
        if self.path != "/api/soakp-token":
            self.send_json(404, {"error": "not found"})
            return
        # A real app checks its user's session here (cookie, CSRF token) and mints for that user only.
        # Refuse other sites: browsers send Origin on a cross-site POST.
        origin = self.headers.get("Origin")
        if origin is not None and origin != settings.page_origin:
            self.send_json(403, {"error": "wrong origin"})
            return
        try:
            self.send_json(200, mint_browser_token(settings, user="demo"))
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            self.log_error("minting a token at SOAKP failed: %s", exc)
            self.send_json(502, {"error": "could not get a token from SOAKP"})

    def send_vendored(self, relative: str) -> None:
        """A file of the vendored SDK, never anything outside its directory."""
        root = self.server.settings.sdk_dir.resolve()
        target = (root / relative).resolve()
        if root not in target.parents or target.suffix not in MIME_TYPES or not target.is_file():
            self.send_json(404, {"error": "not found"})
            return
        self.send_file(target, MIME_TYPES[target.suffix])

    def send_file(self, file: Path, content_type: str) -> None:
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", content_security_policy(self.server.settings.soakp_url))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a token must not sit in any cache
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if not self.server.settings.quiet:
            super().log_message(format, *args)


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], settings: Settings) -> None:
        super().__init__(address, Handler)
        self.settings = settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The backend of the SOAKP browser example.")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="host:port to serve the page on")
    parser.add_argument("--origin", help="the page's origin as browsers see it (default http://LISTEN)")
    parser.add_argument("--soakp-url", required=True, help="SOAKP's URL as the browser reaches it")
    parser.add_argument("--soakp-ca", help="CA file to trust for SOAKP's certificate (a dev certificate)")
    parser.add_argument("--ttl", type=int, default=600, help="token lifetime in seconds (default 600)")
    parser.add_argument("--sdk-dir", type=Path, default=DEFAULT_SDK_DIR, help="the `openai` npm package to serve")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    parent_token = os.environ.get("SOAKP_PARENT_TOKEN", "")
    token_file = os.environ.get("SOAKP_PARENT_TOKEN_FILE")
    if not parent_token and token_file:
        parent_token = Path(token_file).read_text(encoding="ascii").strip()
    if not parent_token:
        print("backend.py: set SOAKP_PARENT_TOKEN (or SOAKP_PARENT_TOKEN_FILE) to a SOAKP token minted with "
              '"delegate": 1', file=sys.stderr)
        return 2
    settings = Settings(
        soakp_url=args.soakp_url.rstrip("/"), page_origin=args.origin or f"http://{args.listen}",
        parent_token=parent_token, ttl_s=args.ttl, soakp_ca=args.soakp_ca, sdk_dir=args.sdk_dir,
    )
    server = BackendServer((host, int(port)), settings)
    print(f"serving the page on {settings.page_origin}/ (SOAKP at {settings.soakp_url})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
