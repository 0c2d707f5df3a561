"""SOAKP, the Secure OpenAI Key Proxy: clients hold a token that carries the OpenAI key sealed with
AES-256-GCM; SOAKP checks the token, swaps in the real key and streams the request to the upstream.

Read top to bottom, in the order a request flows; search "# 5." to jump to a section.
 1 Configuration  Config, load_config()
 2 Tokens         derive_keys(), mint_token(), verify_token(), delegate_grant(), Revocations
 3 Registry       TokenRegistry (SQLite chains), SharedStore (Redis, with --redis)
 4 HTTP           RequestHead, parse_request_head()
 5 Bodies and answers (pure)  ChunkedDecoder, json_models(), MultipartModelScanner, plan_budget(),
                              plan_answer(), UsageMeter, SseUsageStripper, Exchange
 6 Forwarding     the limits kept in state, Watchdog, UpstreamPool, forward(), send_upstream(),
                  relay_stream() and StreamRelay, tunnel_websocket()
 7 TLS            server_ssl_context(), CertReloader, write_selfsigned()
 8 Server         ServerState, handle_connection(), error_response(), serve(), the /admin/ console
 9 CLI            main()
"""

from __future__ import annotations

import os
import sys

# Started as a script (`python soakp.py serve`), a server would keep this file's parse tree for its
# whole life: CPython frees a script's tokens and AST only when the script returns (pyrun_file() in
# Python/pythonrun.c), and for ~9,000 lines they hold ~14 MiB. An imported module's tree is freed
# once compiled. So serve starts again at once as an import, the way the `soakp` command and the
# zipapp run it: exec keeps the PID, the arguments, the interpreter's options and every descriptor
# (issue #17). Not for the one-shot commands, not when a debugger or profiler runs this file from a
# frame of its own (f_back), and not without exec or a .py file to import.
if (
    __name__ == "__main__"
    and sys._getframe().f_back is None
    and os.name == "posix"
    and sys.executable
    and __file__.endswith(".py")
    and sys.argv[1:2] not in (["mint"], ["revoke"], ["tokens"], ["selfsigned"])
):
    # The child: argv back to this script's, its folder first on sys.path as for a script (unless
    # -P or -I left no "" there), then `import soakp` from this very file and main().
    relaunch = (
        "import os, sys; path = sys.argv[1]; del sys.argv[:2]\n"
        "if sys.path[0] == '': sys.path[0] = os.path.dirname(os.path.realpath(path))\n"
        "import importlib.util; spec = importlib.util.spec_from_file_location('soakp', path)\n"
        "soakp = sys.modules['soakp'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(soakp); raise SystemExit(soakp.main())"
    )
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # -X importtime, -W, -u...
    try:
        os.execv(sys.executable, [sys.executable, *options, "-c", relaunch, __file__, *sys.argv])
    except OSError:
        pass  # serve from here, with the parse tree

import argparse
import asyncio
import asyncio.selector_events
import asyncio.sslproto
import base64
import binascii
import bisect
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import re
import resource
import secrets
import signal
import socket
import sqlite3
import ssl
import struct
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__version__ = "0.1.0"

log = logging.getLogger("soakp")


class ConfigError(Exception):
    """A bad flag or environment value: main() prints it as one line and exits 2."""


class ApiError(Exception):
    """An answer SOAKP gives itself, raised where the problem is found and rendered by
    error_response()."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        error_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = tuple(headers)


# OpenAI's own error types, so that each SDK maps our answers onto its usual exception classes.
ERROR_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


# 1. Configuration: flags and environment in, a frozen Config out. No sockets, no files but secrets.

DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\Z")
DURATION_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
SIZE_RE = re.compile(r"(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\Z", re.IGNORECASE)
SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}
MIN_SECRET_CHARS = 32
ORIGIN_RE = re.compile(r"https?://[a-z0-9.\-]+(?::[0-9]{1,5})?\Z")
LOG_LEVELS = ("debug", "info", "warning", "error")
REDIS_SCHEMES = ("redis", "rediss", "unix")

# OpenSSL's reasons for a pair that does not load, in words (the rest are lower-cased as they are).
SSL_REASONS = {
    "PEM_LIB": "not a PEM certificate or private key",
    "NO_START_LINE": "no PEM block in it",
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
    "EE_KEY_TOO_SMALL": "the key is too small",
    "CA_MD_TOO_WEAK": "the certificate's signature is too weak",
    "CERTIFICATE_VERIFY_FAILED": "the certificate did not verify",
    "WRONG_VERSION_NUMBER": "the other side does not speak TLS",
}


def describe_error(exc: BaseException) -> str:
    """An OS, SSL or I/O error in a few words for a message: no class names, no C source lines."""
    if isinstance(exc, ssl.SSLError):
        # exc.reason is OpenSSL's code when it has one; else only the text has it ("[SSL] PEM lib").
        text = str(exc).split(" (_ssl.c:")[0].rpartition("] ")[2].strip()
        reason = getattr(exc, "reason", None) or text.upper().replace(" ", "_")
        return SSL_REASONS.get(reason, reason.replace("_", " ").lower())
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed early"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    text = str(exc).split(" (_ssl.c:")[0].strip()
    return text[:200] if text else "an unexpected error"


def plural(count: int, noun: str) -> str:
    """`1 token`, `2 tokens`: for messages that count things."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def safe_label(text: str) -> str:
    return text[:80].encode("ascii", "backslashreplace").decode("ascii")


def parse_duration_s(text: str) -> float:
    """Parse `90s`, `15m`, `12h`, `7d`, `250ms` or plain seconds. Raises ValueError."""
    match = DURATION_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 7d or seconds)")
    return float(match[1]) * DURATION_UNITS_S[match[2]]


def parse_ttl_s(value: object) -> int:
    """A token lifetime: whole seconds as an integer or a duration string, at least 1 s. Raises
    ValueError."""
    if isinstance(value, bool):
        raise ValueError("ttl must be seconds or a duration such as 15m")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        seconds_f = parse_duration_s(value)
        if seconds_f != int(seconds_f):
            raise ValueError("ttl must be a whole number of seconds")
        seconds = int(seconds_f)
    else:
        raise ValueError("ttl must be seconds or a duration such as 15m")
    if seconds < 1:
        raise ValueError("ttl must be at least 1 second")
    return seconds


def parse_size_bytes(text: str) -> int:
    """Parse `512MiB`, `10MB`, `64k` or plain bytes. Raises ValueError."""
    match = SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 10MB or bytes)")
    unit = match[2].lower() if match[2] else None
    return int(match[1]) * SIZE_UNITS[unit]


def parse_count(text: str) -> int:
    """A whole number such as `10000`. Raises ValueError."""
    if not text.strip().isdigit():
        raise ValueError(f"not a whole number: {text!r}")
    return int(text.strip())


def parse_listen(text: str) -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port`. Raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"listen address must be host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not re.fullmatch(r"[A-Za-z0-9.\-:]+", host):
        raise ValueError(f"listen host is not an address or name: {host!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where every forwarded request goes. Nothing a client sends can change it."""

    scheme: str
    host: str
    port: int
    base_path: str  # prefix put before /v1/..., without a trailing slash
    host_header: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_upstream(text: str) -> UpstreamTarget:
    """Parse the upstream base URL (`https://api.openai.com`, `https://host:8443/prefix`). Raises
    ValueError."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"upstream must be an https:// URL, got {text!r}")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"upstream must be scheme://host[:port][/path] only, got {text!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"upstream port is invalid in {text!r}") from None
    host = parts.hostname
    default_port = port == (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return UpstreamTarget(
        scheme=parts.scheme,
        host=host,
        port=port,
        base_path=parts.path.rstrip("/"),
        host_header=shown if default_port else f"{shown}:{port}",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `soakp serve` needs, validated. Built only by load_config()."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 3033
    admin_listen: tuple[str, int] | None = None  # the admin endpoints' own listener
    secret: str = field(default="", repr=False)
    old_secrets: tuple[str, ...] = field(default=(), repr=False)
    admin_user: str | None = None
    admin_pass: str | None = field(default=None, repr=False)
    upstream: UpstreamTarget = field(
        default_factory=lambda: parse_upstream("https://api.openai.com")
    )
    upstream_ca: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    db: str = "./soakp.db"
    token_ttl_s: int = 7 * 86400
    max_token_ttl_s: int = 365 * 86400
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 512 * 1024**2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    header_timeout_s: float = 30.0
    max_connections: int = 10000
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    # Start-up notes for settings SOAKP corrected or ignored; serve() logs them.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    redis_stale_after_s: float = 60.0
    budget_fail_open: bool = False

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


# One row per option: flag, variable, default, help. Commands pick the rows they take.
OPTIONS: dict[str, tuple[str, str | None, str]] = {
    "listen": ("SOAKP_LISTEN", "127.0.0.1:3033", "address:port to serve on"),
    "admin-listen": (
        "SOAKP_ADMIN_LISTEN",
        None,
        "address:port serving the admin endpoints alone (the main listener then answers 404 for "
        "them)",
    ),
    "secret": ("SOAKP_SECRET", None, "master secret, at least 32 characters"),
    "secret-file": ("SOAKP_SECRET_FILE", None, "file holding the master secret"),
    "old-secrets": (
        "SOAKP_OLD_SECRETS",
        None,
        "comma list of retired secrets still accepted for verifying",
    ),
    "admin-user": (
        "SOAKP_ADMIN_USER",
        None,
        "HTTP Basic user for the admin endpoints (without it they answer 404)",
    ),
    "admin-pass": ("SOAKP_ADMIN_PASS", None, "HTTP Basic password for the admin endpoints"),
    "upstream": ("SOAKP_UPSTREAM", "https://api.openai.com", "base URL requests are forwarded to"),
    "upstream-ca": (
        "SOAKP_UPSTREAM_CA",
        None,
        "CA file trusted for the upstream (default: certifi's bundle)",
    ),
    "cert-dir": (
        "SOAKP_CERT_DIR",
        None,
        "Certbot live directory with fullchain.pem and privkey.pem",
    ),
    "domain": ("SOAKP_DOMAIN", None, "shorthand for --cert-dir LETSENCRYPT_DIR/live/DOMAIN"),
    "letsencrypt-dir": (
        "SOAKP_LETSENCRYPT_DIR",
        "/etc/letsencrypt",
        "Certbot's configuration directory",
    ),
    "cert": ("SOAKP_CERT", None, "PEM certificate chain (with --tls-key)"),
    "tls-key": ("SOAKP_TLS_KEY", None, "PEM private key of --cert (alias --key)"),
    "db": (
        "SOAKP_DB",
        "./soakp.db",
        "SQLite file of issued-token metadata and revocations (:memory: allowed)",
    ),
    "token-ttl": ("SOAKP_TOKEN_TTL", "7d", "default lifetime of minted tokens"),
    "max-token-ttl": ("SOAKP_MAX_TOKEN_TTL", "365d", "cap on any requested lifetime"),
    "cors-origins": ("SOAKP_CORS_ORIGINS", None, "comma list of allowed browser origins, or *"),
    "max-body": ("SOAKP_MAX_BODY", "512MiB", "largest request body accepted"),
    "connect-timeout": (
        "SOAKP_CONNECT_TIMEOUT",
        "10s",
        "connect + TLS handshake to the upstream; past it 502",
    ),
    "read-timeout": (
        "SOAKP_READ_TIMEOUT",
        "600s",
        "longest silence from the upstream; before headers 504",
    ),
    "header-timeout": (
        "SOAKP_HEADER_TIMEOUT",
        "30s",
        "time a client has to send a complete request head",
    ),
    "max-connections": (
        "SOAKP_MAX_CONNECTIONS",
        "10000",
        "concurrent client connections; beyond it 503",
    ),
    "shutdown-grace": (
        "SOAKP_SHUTDOWN_GRACE",
        "30s",
        "on SIGTERM, time in-flight requests get to finish",
    ),
    "log-level": ("SOAKP_LOG_LEVEL", "info", "debug, info, warning or error"),
    "redis": (
        "SOAKP_REDIS_URL",
        None,
        "redis://, rediss:// or unix:// URL of the Redis (or "
        "Valkey) through which several instances share revocations, rpm, budgets, usage",
    ),
    "redis-stale-after": (
        "SOAKP_REDIS_STALE_AFTER",
        "60s",
        "how old the known revocations may grow while Redis is unreachable; past it 503",
    ),
    "budget-fail-open": (
        "SOAKP_BUDGET_FAIL_OPEN",
        None,
        "serve budgeted tokens, counted per instance, while Redis is unreachable (variable: 1)",
    ),
}
# Every command accepts these (SPEC.md, Commands), so a script may pass them to any command; each
# command's help lists only the ones it reads (USED_OPTIONS) and accepts the others quietly.
COMMON_OPTIONS = (
    "secret",
    "secret-file",
    "old-secrets",
    "db",
    "token-ttl",
    "max-token-ttl",
    "log-level",
)
SERVE_OPTIONS = tuple(OPTIONS)
FLAG_OPTIONS = frozenset({"budget-fail-open"})  # on/off: the flag takes no value, its variable 1/0
COMMANDS = ("serve", "mint", "revoke", "tokens", "selfsigned")
USED_OPTIONS = {
    "mint": ("secret", "secret-file", "db", "token-ttl", "max-token-ttl"),
    "revoke": ("db",),
    "tokens": ("db",),
    "selfsigned": (),
}
HELP_FLAGS = ("-h", "--help", "-V", "--version")
MAIN_HELP = """\
Without a command, soakp serves: `soakp --listen ...` is `soakp serve --listen ...`.
`soakp COMMAND --help` lists a command's options. Every option also reads its SOAKP_* variable
(--secret-file: SOAKP_SECRET_FILE); a flag wins over the variable.

examples:
  soakp serve --secret-file /etc/soakp/secret --domain proxy.example.com --listen 0.0.0.0:443
  OPENAI_API_KEY=sk-... soakp mint --secret-file /etc/soakp/secret --ttl 12h
"""
COMMAND_HELP = {
    "serve": (
        "run the proxy (the default command)",
        "Run the proxy: check each client's SOAKP token, swap in the OpenAI key it carries\n"
        "and forward the request upstream. Every option also reads its SOAKP_* variable;\n"
        "a flag wins.",
        "examples:\n"
        "  soakp serve --secret-file /etc/soakp/secret --domain proxy.example.com \\\n"
        "      --listen 0.0.0.0:443\n"
        "  soakp serve --secret-file var/secret --cert-dir var/tls --db var/soakp.db\n"
        "  SOAKP_SECRET_FILE=var/secret soakp --listen 127.0.0.1:3033   # plain HTTP",
    ),
    "mint": (
        "print a new token for an OpenAI key",
        "Print a new token carrying an OpenAI key (the token alone on the last line of\n"
        "stdout) and register it in the database. The key comes from --key, else\n"
        "--key-file, else OPENAI_API_KEY; `--key -` reads it from standard input, which\n"
        "keeps it out of `ps` and the shell history.",
        "examples:\n"
        "  OPENAI_API_KEY=sk-... soakp mint --secret-file var/secret --db var/soakp.db\n"
        "  soakp mint --secret-file var/secret --key-file ~/.openai-key --sub laptop\n"
        '  printf %s "$KEY" | soakp mint --secret-file var/secret --key - --ttl 12h',
    ),
    "revoke": (
        "revoke a token by its jti",
        "Revoke a token by its jti in the database a server uses (the one its --db\n"
        "names); the running server refuses the token within 2 seconds.",
        "example:\n  soakp revoke --db var/soakp.db fifmjanSvJA-mZ0eYcvi3A",
    ),
    "tokens": (
        "list issued tokens as JSON lines",
        "List the tokens in the database a server uses, one JSON object per line: jti,\n"
        "sub, times, requests and usage (never the key or the token).",
        "example:\n  soakp tokens --db var/soakp.db",
    ),
    "selfsigned": (
        "write a development certificate in Certbot's layout",
        "Write a self-signed certificate and its key (fullchain.pem, privkey.pem, mode\n"
        "600) into a directory, for development; it names --host, localhost, 127.0.0.1\n"
        "and ::1.",
        "example:\n  soakp selfsigned --dir var/tls --host localhost",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2 (never a usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: `soakp [COMMAND] [OPTIONS]`, serve being the default command."""
    parser = _Parser(
        prog="soakp",
        description="SOAKP, the Secure OpenAI Key Proxy.",
        epilog=MAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"soakp {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    def add_command(name: str) -> argparse.ArgumentParser:
        summary, description, example = COMMAND_HELP[name]
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=example,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def add_options(
        sub: argparse.ArgumentParser, names: Sequence[str], shown: Sequence[str]
    ) -> None:
        for name in names:
            env, default, text = OPTIONS[name]
            flags = [f"--{name}", "--key"] if name == "tls-key" else [f"--{name}"]
            where = f" (env {env}" + (f", default {default})" if default else ")")
            flag: dict[str, Any] = (
                {"action": "store_const", "const": "1"} if name in FLAG_OPTIONS else {}
            )
            sub.add_argument(
                *flags,
                dest=name.replace("-", "_"),
                default=None,
                help=text + where if name in shown else argparse.SUPPRESS,
                **flag,
            )

    serve_parser = add_command("serve")
    add_options(serve_parser, SERVE_OPTIONS, SERVE_OPTIONS)

    mint = add_command("mint")
    add_options(mint, COMMON_OPTIONS, USED_OPTIONS["mint"])
    add_mint_arguments(mint)

    for name in ("revoke", "tokens"):
        sub = add_command(name)
        add_options(sub, (*COMMON_OPTIONS, "redis"), (*USED_OPTIONS[name], "redis"))
        if name == "revoke":
            sub.add_argument("jti", help="the token's id, as `soakp tokens` shows it")

    selfsigned = add_command("selfsigned")
    add_options(selfsigned, COMMON_OPTIONS, USED_OPTIONS["selfsigned"])
    selfsigned.add_argument(
        "--dir", required=True, help="directory for fullchain.pem and privkey.pem"
    )
    selfsigned.add_argument(
        "--host", default="localhost", help="name the certificate is for (default localhost)"
    )
    return parser


def add_mint_arguments(mint: argparse.ArgumentParser) -> None:
    """`soakp mint`'s own arguments: where the key comes from, and the token's claims."""
    mint.add_argument(
        "--key",
        dest="api_key",
        metavar="KEY",
        help="the OpenAI key to seal into the token; - reads it from standard input",
    )
    mint.add_argument("--key-file", metavar="FILE", help="a file holding the OpenAI key")
    mint.add_argument("--org", help="OpenAI-Organization the token sends")
    mint.add_argument("--project", help="OpenAI-Project the token sends")
    mint.add_argument("--ttl", help="lifetime (90s, 15m, 12h, 7d or seconds; default --token-ttl)")
    mint.add_argument("--sub", help="a label for the token's holder (default 'default')")
    mint.add_argument(
        "--paths", help="comma list of allowed /v1/... paths (a trailing * matches a prefix)"
    )
    mint.add_argument("--models", help="comma list of allowed models")
    mint.add_argument("--rpm", help="requests per minute allowed")
    mint.add_argument("--origins", help="comma list of allowed browser origins")
    mint.add_argument(
        "--max-tokens-total",
        dest="max_tokens_total",
        help="budget of prompt + completion tokens, from the upstream's usage",
    )
    mint.add_argument(
        "--renew-ttl",
        dest="renew_ttl",
        help="how long the token may be refreshed, from now (at least --ttl; default: "
        "not past its first expiry)",
    )
    mint.add_argument(
        "--delegate", help="generations of child tokens it may mint (POST /jwt/delegate)"
    )


def option_value(args: argparse.Namespace, environ: Mapping[str, str], name: str) -> str | None:
    """Flag over environment variable over default."""
    value = getattr(args, name.replace("-", "_"), None)
    if value is not None:
        return value
    env, default, _ = OPTIONS[name]
    return environ.get(env) or default


def option_source(args: argparse.Namespace, environ: Mapping[str, str], name: str) -> str:
    """Where an option's value came from, for messages: `--db`, `SOAKP_DB` or `the default`."""
    if getattr(args, name.replace("-", "_"), None) is not None:
        return f"--{name}"
    env = OPTIONS[name][0]
    return env if environ.get(env) else "the default"


def read_secret(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The master secret from --secret, --secret-file or their variables (a flag wins)."""
    if args.secret is not None and args.secret_file is not None:
        raise ConfigError("give --secret or --secret-file, not both")
    secret, path = args.secret, args.secret_file
    if secret is None and path is None:
        secret, path = environ.get("SOAKP_SECRET") or None, environ.get("SOAKP_SECRET_FILE") or None
        if secret is not None and path is not None:
            raise ConfigError("set SOAKP_SECRET or SOAKP_SECRET_FILE, not both")
    source = "--secret-file" if args.secret_file is not None else "SOAKP_SECRET_FILE"
    if path is not None:
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{source}: cannot read the secret file {path}: {describe_error(exc)}"
            ) from None
    else:
        source = "--secret" if args.secret is not None else "SOAKP_SECRET"
    if secret is None:
        raise ConfigError(
            "a master secret is required: give --secret-file FILE "
            "(or SOAKP_SECRET_FILE), or --secret (SOAKP_SECRET)"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"{source}: the master secret must be at least {MIN_SECRET_CHARS} "
            "characters; make one with: "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if weak_secret(secret):
        raise ConfigError(
            f"{source}: the master secret is too easy to guess (it repeats a few "
            "characters); make a new one with: "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    return secret


MIN_SECRET_DISTINCT_CHARS = 8


def weak_secret(secret: str) -> bool:
    """A secret of few distinct characters, or one short pattern repeated, is no secret whatever its
    length: `aaaa...` or `abcdabcd...`. Random secrets (hex, base64) pass easily."""
    if len(set(secret)) < MIN_SECRET_DISTINCT_CHARS:
        return True
    # The shortest period p with secret[i] == secret[i + p] everywhere, from the prefix function
    # (KMP).
    border = [0] * len(secret)
    for i in range(1, len(secret)):
        k = border[i - 1]
        while k and secret[i] != secret[k]:
            k = border[k - 1]
        border[i] = k + (secret[i] == secret[k])
    return len(secret) - border[-1] <= len(secret) // 2


def tls_key_option(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """The TLS private key from --tls-key (alias --key), SOAKP_TLS_KEY or, as before, SOAKP_KEY.

    SOAKP_KEY once named the TLS key and looks like a place for the OpenAI key: it is taken only
    when it names a readable file, and otherwise ignored. Returns (path, a warning or None).
    """
    path = option_value(args, environ, "tls-key")
    old = environ.get("SOAKP_KEY")
    if path is not None or not old:
        return path, None
    if os.path.isfile(old) and os.access(old, os.R_OK):
        return old, (
            "SOAKP_KEY names the TLS private key: rename it SOAKP_TLS_KEY (SOAKP_KEY will go away)"
        )
    return None, (
        "SOAKP_KEY is set but is not a readable file, so it is ignored: the TLS "
        "private key is SOAKP_TLS_KEY, and `soakp mint` reads the OpenAI key from "
        "OPENAI_API_KEY"
    )


def check_mint_key_source(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """`soakp mint` needs the OpenAI key from exactly one place (read by the CLI, section 9)."""
    if args.api_key is not None and args.key_file is not None:
        raise ConfigError("give --key or --key-file, not both")
    if args.api_key is None and args.key_file is None and not environ.get("OPENAI_API_KEY"):
        raise ConfigError(
            "soakp mint needs the OpenAI key: set OPENAI_API_KEY, or give "
            "--key-file FILE, --key - (read from standard input) or --key KEY"
        )


def normalise_upstream(upstream: UpstreamTarget) -> tuple[UpstreamTarget, str | None]:
    """Drop a trailing /v1 from the upstream's path: SOAKP forwards /v1/... itself, so a base URL
    copied from an SDK's settings (`https://host/v1`) would send every request to /v1/v1/...

    Returns the target to use and a warning, or None when nothing changed.
    """
    if not upstream.base_path.endswith("/v1"):
        return upstream, None
    fixed = dataclasses.replace(upstream, base_path=upstream.base_path[: -len("/v1")])
    shown = f"{fixed.scheme}://{fixed.host_header}{fixed.base_path}"
    return fixed, (
        f"--upstream ends in /v1, which SOAKP adds to every request itself: "
        f"forwarding to {shown}/v1/...; drop the /v1 from --upstream "
        "(or SOAKP_UPSTREAM) to silence this"
    )


@dataclass(frozen=True, slots=True)
class OptionReader:
    """Reads one command's options: the flag, else its SOAKP_* variable, else the default."""

    args: argparse.Namespace
    environ: Mapping[str, str]

    def get(self, name: str) -> str | None:
        if hasattr(self.args, name.replace("-", "_")):
            return option_value(self.args, self.environ, name)
        return OPTIONS[name][1]

    def convert(self, name: str, parse: Callable[[Any], Any]) -> Any:
        """The option parsed; a ValueError becomes a ConfigError naming where the value
        came from."""
        try:
            return parse(self.get(name))
        except ValueError as exc:
            source = option_source(self.args, self.environ, name)
            named = source if source.startswith("SOAKP_") else f"--{name}"
            raise ConfigError(f"{named}: {exc}") from None


def ids_after_options(argv: list[str]) -> list[str]:
    """`soakp revoke ID`: a jti or cid is base64url, so one in 32 starts with "-" and would read as
    an option; such an argument that is no option of the command goes after "--"."""
    options = {"-h", "--help", *(f"--{name}" for name in (*COMMON_OPTIONS, "redis"))}
    ids = [
        a
        for a in argv[1:]
        if a.startswith("-")
        and a not in options
        and len(a) >= MIN_TOKEN_ID_CHARS
        and re.fullmatch(r"[A-Za-z0-9_\-]+", a)
    ]
    if not ids:
        return argv
    return [a for a in argv if a not in ids] + ["--", *ids]


MIN_TOKEN_ID_CHARS = 16  # SOAKP's jtis are 22 characters (128 random bits); no option is this long


def load_config(
    argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and environment into a validated Config plus the command's own
    arguments.

    Raises ConfigError with one line for any bad value.
    """
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        raise ConfigError(
            f"unknown command {safe_label(argv[0])!r}; the commands are "
            f"{', '.join(COMMANDS)} (see soakp --help)"
        )
    if not argv or argv[0] not in COMMANDS and argv[0] not in HELP_FLAGS:
        argv.insert(0, "serve")
    if argv[0] == "revoke":
        argv = ids_after_options(argv)
    args = build_parser().parse_args(argv)
    if args.command == "selfsigned":
        return Config(), args
    read = OptionReader(args, environ)
    warnings: list[str] = []
    config = Config(
        **secret_settings(read),
        **listener_settings(read, warnings),
        **limit_settings(read),
        **shared_state_settings(read),
        warnings=tuple(warnings),
    )
    return config, args


def secret_settings(read: OptionReader) -> dict[str, Any]:
    """The master secret, retired secrets and admin credentials."""
    args, environ = read.args, read.environ
    if args.command == "mint":
        check_mint_key_source(args, environ)
    secret = read_secret(args, environ) if args.command in ("serve", "mint") else ""
    old_secrets = tuple(s.strip() for s in (read.get("old-secrets") or "").split(",") if s.strip())
    if any(len(s) < MIN_SECRET_CHARS for s in old_secrets):
        raise ConfigError(
            f"--old-secrets: each secret must be at least {MIN_SECRET_CHARS} characters"
        )
    admin_user, admin_pass = read.get("admin-user"), read.get("admin-pass")
    if (admin_user is None) != (admin_pass is None):
        raise ConfigError("give both --admin-user and --admin-pass, or neither")
    if admin_pass is not None and len(admin_pass) < 8:
        raise ConfigError("--admin-pass must be at least 8 characters")
    return {
        "secret": secret,
        "old_secrets": old_secrets,
        "admin_user": admin_user,
        "admin_pass": admin_pass,
    }


def listener_settings(read: OptionReader, warnings: list[str]) -> dict[str, Any]:
    """Where SOAKP listens and with what certificate, where it forwards, and its CORS origins."""
    listen_host, listen_port = read.convert("listen", parse_listen)
    admin_listen = read.convert("admin-listen", parse_listen) if read.get("admin-listen") else None
    if admin_listen == (listen_host, listen_port):
        raise ConfigError("--admin-listen must differ from --listen")
    upstream, upstream_warning = normalise_upstream(read.convert("upstream", parse_upstream))
    tls_key, tls_key_warning = (
        tls_key_option(read.args, read.environ) if read.args.command == "serve" else (None, None)
    )
    warnings.extend(w for w in (upstream_warning, tls_key_warning) if w)
    cert_file, key_file = tls_files(
        read.get("cert-dir"),
        read.get("domain"),
        read.get("letsencrypt-dir"),
        read.get("cert"),
        tls_key,
    )
    upstream_ca = read.get("upstream-ca")
    if upstream_ca is not None and not os.access(upstream_ca, os.R_OK):
        raise ConfigError(f"--upstream-ca: cannot read {upstream_ca}")
    cors = tuple(o.strip() for o in (read.get("cors-origins") or "").split(",") if o.strip())
    for origin in cors:
        if origin != "*" and not ORIGIN_RE.match(origin.lower()):
            raise ConfigError(
                f"--cors-origins: {origin!r} is not an origin such as "
                "https://app.example.com (no path)"
            )
    return {
        "listen_host": listen_host,
        "listen_port": listen_port,
        "admin_listen": admin_listen,
        "upstream": upstream,
        "upstream_ca": upstream_ca,
        "cert_file": cert_file,
        "key_file": key_file,
        "cors_origins": cors,
    }


def limit_settings(read: OptionReader) -> dict[str, Any]:
    """Token lifetimes, time limits, sizes, the connection cap, the database and the log level."""
    token_ttl_s = read.convert("token-ttl", parse_ttl_s)
    max_token_ttl_s = read.convert("max-token-ttl", parse_ttl_s)
    if token_ttl_s > max_token_ttl_s:
        raise ConfigError(
            "--token-ttl is longer than --max-token-ttl: shorten one or lengthen the other"
        )
    durations = {}
    for name in ("connect-timeout", "read-timeout", "header-timeout", "shutdown-grace"):
        durations[name] = read.convert(name, parse_duration_s)
        if durations[name] <= 0 and name != "shutdown-grace":
            raise ConfigError(f"--{name} must be more than 0")
    max_connections = read.convert("max-connections", parse_count)
    if max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    log_level = (read.get("log-level") or "").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    db = read.get("db") or ""
    if not db.strip():
        raise ConfigError("--db must name a file (or :memory:), e.g. --db var/soakp.db")
    return {
        "token_ttl_s": token_ttl_s,
        "max_token_ttl_s": max_token_ttl_s,
        "max_body_bytes": read.convert("max-body", parse_size_bytes),
        "connect_timeout_s": durations["connect-timeout"],
        "read_timeout_s": durations["read-timeout"],
        "header_timeout_s": durations["header-timeout"],
        "shutdown_grace_s": durations["shutdown-grace"],
        "max_connections": max_connections,
        "log_level": log_level,
        "db": db,
    }


def shared_state_settings(read: OptionReader) -> dict[str, Any]:
    """--redis and how SOAKP behaves while it cannot reach it."""
    redis_url = read.get("redis") or None
    if redis_url is not None and urllib.parse.urlsplit(redis_url).scheme not in REDIS_SCHEMES:
        raise ConfigError("--redis must be a redis://, rediss:// or unix:// URL")
    redis_stale_after_s = read.convert("redis-stale-after", parse_duration_s)
    if redis_stale_after_s <= 0:
        raise ConfigError("--redis-stale-after must be more than 0")
    fail_open = (read.get("budget-fail-open") or "").strip().lower()
    if fail_open not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError("--budget-fail-open must be 1 or 0")
    return {
        "redis_url": redis_url,
        "redis_stale_after_s": redis_stale_after_s,
        "budget_fail_open": fail_open in ("1", "true", "yes"),
    }


def tls_files(
    cert_dir: str | None,
    domain: str | None,
    letsencrypt_dir: str | None,
    cert: str | None,
    key: str | None,
) -> tuple[str | None, str | None]:
    """Resolve the three ways of naming a certificate to (fullchain, privkey) paths, or (None,
    None)."""
    ways = [
        name
        for name, given in (
            ("--cert-dir", cert_dir),
            ("--domain", domain),
            ("--cert/--tls-key", cert or key),
        )
        if given
    ]
    if len(ways) > 1:
        raise ConfigError(f"choose one way to name the certificate, not {' and '.join(ways)}")
    way = ways[0] if ways else ""
    if domain is not None:
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", domain) or ".." in domain:
            raise ConfigError(f"--domain is not a domain name: {domain!r}")
        cert_dir = os.path.join(letsencrypt_dir or "/etc/letsencrypt", "live", domain)
        way = "--domain (with --letsencrypt-dir)"
    if cert_dir is not None:
        cert, key = os.path.join(cert_dir, "fullchain.pem"), os.path.join(cert_dir, "privkey.pem")
    if (cert is None) != (key is None):
        raise ConfigError(
            "--cert and --tls-key go together: give both, or --cert-dir for a Certbot directory"
        )
    for path in (cert, key):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(
                f"{way}: cannot read the TLS file {path} (check the path and its permissions)"
            )
    return cert, key


# 2. Tokens: a secret and a key in, a signed JWT out, and back. Pure: clock and randomness come in.

JWT_ALGORITHM = "HS256"
TOKEN_ISSUER = "soakp"
TOKEN_AUDIENCE = "openai"
SIGNING_INFO = b"soakp/jwt-hs256"
SEALING_INFO = b"soakp/key-aes256gcm"
GCM_NONCE_BYTES = 12
KID_HEX_DIGITS = 16
# Visible ASCII without whitespace, as SPEC.md says: no vendor prefix so compatible upstreams work.
KEY_RE = re.compile(r"[\x21-\x7e]{1,512}\Z")
# Header-safe label values for org, project and sub.
LABEL_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?\Z")
MAX_TOKEN_CHARS = 8192
JWT_SHAPE_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")
# Claims that restrict what a token may do (SPEC.md, Tokens).
PERMISSION_CLAIMS = ("paths", "models", "rpm", "origins", "max_tokens_total")
GRANT_FIELDS = ("key", "org", "project", "ttl", "renew_ttl", "sub", "delegate", *PERMISSION_CLAIMS)
DELEGATE_FIELDS = tuple(name for name in GRANT_FIELDS if name not in ("key", "org", "project"))
MAX_DELEGATION_DEPTH = 8  # how many generations of child tokens a token may start
TOKEN_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}\Z")  # a jti or a chain id (cid)
MAX_FUTURE_IAT_S = 60  # SPEC.md: a token issued further in the future than this is refused


@dataclass(frozen=True, slots=True)
class SecretKeys:
    """The two keys HKDF derives from one master secret, and the kid that names them."""

    kid: str
    signing_key: bytes = field(repr=False)
    sealing_key: bytes = field(repr=False)


def derive_keys(secret: str) -> SecretKeys:
    """Derive the JWT signing key and the AES-GCM sealing key from the master secret (HKDF-SHA256,
    no salt)."""
    material = secret.encode("utf-8")

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)

    signing_key = hkdf(SIGNING_INFO)
    kid = hashlib.sha256(signing_key).hexdigest()[:KID_HEX_DIGITS]
    return SecretKeys(kid=kid, signing_key=signing_key, sealing_key=hkdf(SEALING_INFO))


def build_keyring(secret: str, old_secrets: Sequence[str] = ()) -> dict[str, SecretKeys]:
    """Keys by kid: the current secret first (it mints), then retired ones (they only verify)."""
    keyring: dict[str, SecretKeys] = {}
    for one in (secret, *old_secrets):
        keys = derive_keys(one)
        keyring.setdefault(keys.kid, keys)
    return keyring


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url. Raises ValueError."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_key(key: str, jti: str, sealing_key: bytes, nonce: bytes) -> str:
    """Encrypt the OpenAI key with AES-256-GCM bound to the jti: base64url(nonce ‖ ciphertext ‖
    tag)."""
    sealed = AESGCM(sealing_key).encrypt(nonce, key.encode("ascii"), jti.encode("ascii"))
    return b64url_encode(nonce + sealed)


def open_key(ek: str, jti: str, sealing_key: bytes) -> str:
    """Decrypt a sealed key. Raises ValueError if it was tampered with or sealed for another jti or
    secret."""
    try:
        raw = b64url_decode(ek)
        if len(raw) <= GCM_NONCE_BYTES + 16:
            raise ValueError("sealed key too short")
        plain = AESGCM(sealing_key).decrypt(
            raw[:GCM_NONCE_BYTES], raw[GCM_NONCE_BYTES:], jti.encode("ascii")
        )
        key = plain.decode("ascii")
    except (InvalidTag, UnicodeError, binascii.Error) as exc:
        raise ValueError("sealed key does not open") from exc
    if not KEY_RE.match(key):
        raise ValueError("sealed key is not a key")
    return key


MAX_LIST_ITEMS = 100
MAX_RPM = 1_000_000
MAX_TOKENS_BUDGET = 10**12
MODEL_RE = LABEL_RE  # a model name is a header-safe label too

PATH_PATTERN_RE = re.compile(r"/v1/[A-Za-z0-9._~:@!$&'()+,;=\-/]*\*?\Z")


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a token may do beyond carrying the key; None means not limited."""

    paths: tuple[str, ...] | None = None  # /v1/... paths; a trailing * matches a prefix
    models: tuple[str, ...] | None = None  # allowed values of the request's `model`
    rpm: int | None = None  # requests per minute
    origins: tuple[str, ...] | None = None  # allowed browser Origin values
    max_tokens_total: int | None = None  # budget of prompt + completion tokens

    def as_claims(self) -> dict[str, Any]:
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name in PERMISSION_CLAIMS
            if (value := getattr(self, name)) is not None
        }


# What each list's entries look like, for the message that refuses one.
LIST_ENTRY_FORMS = {
    "paths": "each entry is a path in its /v1/... form, e.g. /v1/chat/completions "
    "(a trailing * matches a prefix: /v1/files*)",
    "models": "each entry is a model name, e.g. gpt-4o-mini",
    "origins": "each entry is an origin, e.g. https://app.example.com (no path)",
}


def parse_string_list(
    name: str, value: object, valid: re.Pattern[str], normalise: Any = None
) -> tuple[str, ...]:
    """A non-empty JSON list of strings that each match `valid` (after `normalise`). Raises
    ValueError."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_ITEMS:
        raise ValueError(f"'{name}' must be a list of 1 to {MAX_LIST_ITEMS} strings")
    items = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"'{name}' must be a list of strings")
        item = normalise(item) if normalise else item
        if not valid.match(item):
            raise ValueError(
                f"'{name}' has an invalid entry {safe_label(item)!r}: "
                f"{LIST_ENTRY_FORMS.get(name, 'see the README')}"
            )
        items.append(item)
    return tuple(dict.fromkeys(items))


def normalise_path_pattern(pattern: str) -> str:
    """`/openai/x` is the alias of `/v1/x`; a pattern must be canonical but for a trailing `*`."""
    if pattern.startswith("/openai/"):
        pattern = "/v1/" + pattern[len("/openai/") :]
    stem = pattern[:-1] if pattern.endswith("*") else pattern
    segments = stem[1:].split("/")
    if (
        any(seg in (".", "..") for seg in segments)
        or any(seg == "" for seg in segments[:-1])
        or "%" in stem
    ):
        return ""  # fails PATH_PATTERN_RE
    return pattern


def parse_int_claim(name: str, value: object, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ValueError(f"'{name}' must be a whole number from 1 to {top}")
    return value


def parse_permissions(fields: Mapping[str, Any]) -> Permissions:
    """Permission claims from a mint request or a token's payload. Raises ValueError naming the
    claim."""
    get = fields.get
    return Permissions(
        paths=None
        if get("paths") is None
        else parse_string_list("paths", get("paths"), PATH_PATTERN_RE, normalise_path_pattern),
        models=None
        if get("models") is None
        else parse_string_list("models", get("models"), MODEL_RE),
        rpm=None if get("rpm") is None else parse_int_claim("rpm", get("rpm"), MAX_RPM),
        origins=None
        if get("origins") is None
        else parse_string_list("origins", get("origins"), ORIGIN_RE, str.lower),
        max_tokens_total=None
        if get("max_tokens_total") is None
        else parse_int_claim("max_tokens_total", get("max_tokens_total"), MAX_TOKENS_BUDGET),
    )


@dataclass(frozen=True, slots=True)
class Ancestor:
    """A chain a child token descends from, with the limits of it that the child shares: its
    requests count against the ancestor's `rpm`, its usage against the ancestor's budget."""

    cid: str
    rpm: int | None = None
    max_tokens_total: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a new token is for: the key it carries and the claims around it. Built
    by parse_grant()."""

    key: str = field(repr=False)
    ttl_s: int
    sub: str = "default"
    org: str | None = None
    project: str | None = None
    permissions: Permissions = Permissions()
    renew_ttl_s: int | None = (
        None  # how long the chain may be refreshed, from now; None: not past exp
    )
    chain: tuple[str, int] | None = None  # (cid, rexp) of the chain a refreshed token continues
    delegate: int = 0  # how many generations of child tokens this one may mint (claim `dlg`)
    ancestors: tuple[Ancestor, ...] = ()  # a child token's ancestor chains, nearest last


def parse_grant(fields: Mapping[str, Any], default_ttl_s: int, max_ttl_s: int) -> Grant:
    """Validate a mint request (the JSON body of /jwt/generate or the mint flags).

    Raises ApiError(400) naming the field; the message never repeats the key.
    """
    unknown = sorted(set(fields) - set(GRANT_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {safe_label(unknown[0])!r}", "invalid_field")
    key = fields.get("key")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ApiError(
            400, "'key' must be 1 to 512 visible ASCII characters without spaces", "invalid_key"
        )
    labels: dict[str, str | None] = {}
    for name in ("sub", "org", "project"):
        value = fields.get(name)
        if value is not None and (not isinstance(value, str) or not LABEL_RE.match(value)):
            raise ApiError(
                400, f"'{name}' must be 1 to 256 printable ASCII characters", "invalid_field"
            )
        labels[name] = value
    ttl_s = default_ttl_s
    if fields.get("ttl") is not None:
        try:
            ttl_s = parse_ttl_s(fields["ttl"])
        except ValueError as exc:
            raise ApiError(400, f"'ttl': {exc}", "invalid_ttl") from None
    if ttl_s > max_ttl_s:
        raise ApiError(400, f"'ttl' is over the maximum of {max_ttl_s} seconds", "ttl_too_long")
    renew_ttl_s = None
    if fields.get("renew_ttl") is not None:
        try:
            renew_ttl_s = parse_ttl_s(fields["renew_ttl"])
        except ValueError as exc:
            raise ApiError(400, f"'renew_ttl': {exc}", "invalid_ttl", param="renew_ttl") from None
        if renew_ttl_s < ttl_s:
            raise ApiError(
                400,
                f"'renew_ttl' ({renew_ttl_s} s) must be at least the token's ttl ({ttl_s} s)",
                "invalid_ttl",
                param="renew_ttl",
            )
        if renew_ttl_s > max_ttl_s:
            raise ApiError(
                400,
                f"'renew_ttl' is over the maximum of {max_ttl_s} seconds (--max-token-ttl)",
                "ttl_too_long",
                param="renew_ttl",
            )
    delegate = fields.get("delegate", 0)
    if (
        isinstance(delegate, bool)
        or not isinstance(delegate, int)
        or not 0 <= delegate <= MAX_DELEGATION_DEPTH
    ):
        raise ApiError(
            400,
            f"'delegate' must be a whole number from 0 to {MAX_DELEGATION_DEPTH}",
            "invalid_field",
            param="delegate",
        )
    try:
        permissions = parse_permissions(fields)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_field") from None
    return Grant(
        key=key,
        ttl_s=ttl_s,
        sub=labels["sub"] or "default",
        org=labels["org"],
        project=labels["project"],
        permissions=permissions,
        renew_ttl_s=renew_ttl_s,
        delegate=delegate,
    )


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str = field(repr=False)
    jti: str
    expires_at: int
    cid: str = ""
    renew_until: int = 0


def mint_token(keys: SecretKeys, grant: Grant, now: int, jti: str, nonce: bytes) -> MintedToken:
    """Sign a token carrying the sealed key. `jti` and `nonce` come from the caller (secrets
    module).

    A new chain starts with `cid == jti`; its renew-until time is `now + renew_ttl`, or the first
    token's expiry. A refreshed token keeps its chain's cid and rexp, and never outlives the rexp.
    """
    if grant.chain is None:
        cid, rexp = jti, now + (grant.renew_ttl_s if grant.renew_ttl_s is not None else grant.ttl_s)
    else:
        cid, rexp = grant.chain
    claims: dict[str, Any] = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": grant.sub,
        "iat": now,
        "exp": min(now + grant.ttl_s, rexp),
        "jti": jti,
        "cid": cid,
        "rexp": rexp,
        "ek": seal_key(grant.key, jti, keys.sealing_key, nonce),
    }
    if grant.org is not None:
        claims["org"] = grant.org
    if grant.project is not None:
        claims["project"] = grant.project
    claims.update(grant.permissions.as_claims())
    if grant.delegate:
        claims["dlg"] = grant.delegate
    if grant.ancestors:
        claims["anc"] = [a.cid for a in grant.ancestors]
        # The ancestors' shared limits travel with the child, so any instance can apply them
        # statelessly.
        claims["alim"] = [[a.rpm, a.max_tokens_total] for a in grant.ancestors]
    token = jwt.encode(claims, keys.signing_key, algorithm=JWT_ALGORITHM, headers={"kid": keys.kid})
    return MintedToken(token=token, jti=jti, expires_at=claims["exp"], cid=cid, renew_until=rexp)


def new_token(keys: SecretKeys, grant: Grant, now: int) -> MintedToken:
    """mint_token() with a fresh 128-bit jti and GCM nonce."""
    return mint_token(
        keys,
        grant,
        now,
        b64url_encode(secrets.token_bytes(16)),
        secrets.token_bytes(GCM_NONCE_BYTES),
    )


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """A verified token: who it is, until when, what it may do, and the opened key."""

    jti: str
    kid: str
    sub: str
    iat: int
    exp: int
    key: str = field(repr=False)
    org: str | None = None
    project: str | None = None
    permissions: Permissions = Permissions()
    cid: str = ""  # the chain id: usage, budget, rpm and revocation belong to the chain
    rexp: int = 0  # the chain's renew-until time
    dlg: int = 0  # generations of child tokens it may mint
    ancestors: tuple[Ancestor, ...] = ()  # nearest last

    def regrant(self, max_ttl_s: int) -> Grant:
        """The grant for a refreshed token: the same claims and chain, the same lifetime (capped by
        max_ttl_s); mint_token() keeps it within the chain's renew-until time."""
        return Grant(
            key=self.key,
            ttl_s=max(1, min(self.exp - self.iat, max_ttl_s)),
            sub=self.sub,
            org=self.org,
            project=self.project,
            permissions=self.permissions,
            chain=(self.cid, self.rexp),
            delegate=self.dlg,
            ancestors=self.ancestors,
        )

    @property
    def budgets(self) -> list[tuple[str, int]]:
        """(chain id, max_tokens_total) of its own chain and each ancestor that has a budget."""
        own = (
            [(self.cid, self.permissions.max_tokens_total)]
            if self.permissions.max_tokens_total
            else []
        )
        return own + [
            (a.cid, a.max_tokens_total) for a in self.ancestors if a.max_tokens_total is not None
        ]

    @property
    def rates(self) -> list[tuple[str, int]]:
        """(chain id, rpm) of its own chain and each ancestor that has a rate limit."""
        own = [(self.cid, self.permissions.rpm)] if self.permissions.rpm else []
        return own + [(a.cid, a.rpm) for a in self.ancestors if a.rpm is not None]

    @property
    def chains(self) -> tuple[str, ...]:
        """Its own chain and every ancestor's: what its usage, rate and revocation count against."""
        return (self.cid, *(a.cid for a in self.ancestors))

    def as_ancestor(self) -> Ancestor:
        return Ancestor(self.cid, self.permissions.rpm, self.permissions.max_tokens_total)


def budget_spent() -> ApiError:
    """429 for a spent budget. Waiting does not help, so no Retry-After, and `x-should-retry: false`
    tells the official SDKs not to retry it as they would a rate limit."""
    return ApiError(
        429,
        "This token has used its whole token budget (max_tokens_total).",
        "insufficient_quota",
        "insufficient_quota",
        headers=[("x-should-retry", "false")],
    )


def pattern_covered(child: str, parents: Sequence[str]) -> bool:
    """Whether every path a child's `paths` entry matches is matched by one of the
    parent's entries."""
    if not child.endswith("*"):
        return path_allowed(parents, child)
    stem = child[:-1]
    for parent in parents:
        if not parent.endswith("*"):
            continue
        base = parent[:-1]
        if (
            base.endswith("/")
            and stem.startswith(base)
            or stem == base
            or stem.startswith(base + "/")
        ):
            return True
    return False


def widened(field_name: str, why: str) -> ApiError:
    return ApiError(
        400,
        f"'{field_name}' would widen the parent token's limit: {why}.",
        "limit_widened",
        param=field_name,
    )


def delegate_grant(
    parent: TokenClaims,
    fields: Mapping[str, Any],
    default_ttl_s: int,
    max_ttl_s: int,
    now: int,
    parent_left: int | None,
) -> Grant:
    """The grant of a child token that `parent` asks for (POST /jwt/delegate), every limit within
    the parent's: an omitted limit is inherited, a wider one is a 400 naming the field.

    `parent_left` is what the parent's chain has left of its budget (None without one). Pure; raises
    ApiError 400 or 403.
    """
    if parent.dlg < 1:
        raise ApiError(
            403,
            "This token may not mint child tokens (it was minted with delegate 0).",
            "delegation_not_allowed",
        )
    for name in ("key", "org", "project"):
        if name in fields:
            raise ApiError(
                400,
                f"'{name}' is inherited from the parent token and cannot be given.",
                "invalid_field",
                param=name,
            )
    unknown = sorted(set(fields) - set(DELEGATE_FIELDS))
    if unknown:
        raise ApiError(
            400, f"unknown field {safe_label(unknown[0])!r}", "invalid_field", param=unknown[0]
        )
    ttl = fields.get("ttl")
    default = max(1, min(default_ttl_s, parent.exp - now))
    asked = parse_grant(
        {**fields, "key": parent.key, "ttl": default if ttl is None else ttl, "renew_ttl": None},
        default_ttl_s,
        max_ttl_s,
    )
    renew_ttl_s = child_renew_ttl_s(parent, fields, asked, default_ttl_s, max_ttl_s, now)
    if asked.delegate > parent.dlg - 1:
        raise widened("delegate", f"a child may delegate at most {parent.dlg - 1} more generations")
    sub = f"{parent.sub}/{asked.sub}"
    if not LABEL_RE.match(sub):
        raise ApiError(
            400,
            "'sub': the parent's sub + '/' + this one must be at most 256 printable characters",
            "invalid_field",
            param="sub",
        )
    return Grant(
        key=parent.key,
        ttl_s=asked.ttl_s,
        sub=sub,
        org=parent.org,
        project=parent.project,
        permissions=child_permissions(parent.permissions, asked.permissions, fields, parent_left),
        renew_ttl_s=renew_ttl_s,
        delegate=asked.delegate,
        ancestors=(*parent.ancestors, parent.as_ancestor()),
    )


def child_renew_ttl_s(
    parent: TokenClaims,
    fields: Mapping[str, Any],
    asked: Grant,
    default_ttl_s: int,
    max_ttl_s: int,
    now: int,
) -> int:
    """A child's lifetime and renew-until, within its parent's (an omitted renew_ttl inherits the
    parent's renew-until time). Returns its renew_ttl in seconds. Raises ApiError(400)."""
    if now + asked.ttl_s > parent.exp:
        raise widened(
            "ttl",
            f"the child would outlive its parent token, which expires in "
            f"{max(0, parent.exp - now)} s",
        )
    renew_ttl_s = parent.rexp - now
    if fields.get("renew_ttl") is not None:
        renewal = {"key": parent.key, "ttl": asked.ttl_s, "renew_ttl": fields["renew_ttl"]}
        renew_ttl_s = parse_grant(renewal, default_ttl_s, max_ttl_s).renew_ttl_s or 0
        if now + renew_ttl_s > parent.rexp:
            raise widened(
                "renew_ttl", "the child's chain would outlive its parent's renew-until time"
            )
    return max(renew_ttl_s, asked.ttl_s)


def child_permissions(
    mine: Permissions, wanted: Permissions, fields: Mapping[str, Any], parent_left: int | None
) -> Permissions:
    """A child's limits: each one it names must be within its parent's, each one it omits is the
    parent's (a budget: what the parent has left). Raises ApiError 400, or 429 for a spent budget.
    """
    paths, models, origins, rpm, budget = (
        mine.paths,
        mine.models,
        mine.origins,
        mine.rpm,
        parent_left,
    )
    if "paths" in fields and wanted.paths is not None:
        if mine.paths is not None and not all(pattern_covered(p, mine.paths) for p in wanted.paths):
            raise widened("paths", "each entry must be covered by one of the parent's")
        paths = wanted.paths
    if "models" in fields and wanted.models is not None:
        if mine.models is not None and not set(wanted.models) <= set(mine.models):
            raise widened("models", "they must be a subset of the parent's")
        models = wanted.models
    if "origins" in fields and wanted.origins is not None:
        if mine.origins is not None and not set(wanted.origins) <= set(mine.origins):
            raise widened("origins", "they must be a subset of the parent's")
        origins = wanted.origins
    if "rpm" in fields and wanted.rpm is not None:
        if mine.rpm is not None and wanted.rpm > mine.rpm:
            raise widened("rpm", f"the parent allows {mine.rpm} requests per minute")
        rpm = wanted.rpm
    if "max_tokens_total" in fields and wanted.max_tokens_total is not None:
        if parent_left is not None and wanted.max_tokens_total > parent_left:
            raise widened("max_tokens_total", f"the parent has {max(0, parent_left)} tokens left")
        budget = wanted.max_tokens_total
    if budget is not None and budget < 1:
        raise ApiError(
            429,
            "The parent token has used its whole token budget (max_tokens_total).",
            "insufficient_quota",
            "insufficient_quota",
            headers=[("x-should-retry", "false")],
        )
    return Permissions(
        paths=paths, models=models, rpm=rpm, origins=origins, max_tokens_total=budget
    )


def invalid_token(message: str) -> ApiError:
    return ApiError(401, message, "invalid_api_key")


def verify_token(
    token: str, keyring: Mapping[str, SecretKeys], now: float, allow_expired: bool = False
) -> TokenClaims:
    """Check a token's signature (HS256 only), issuer, audience and expiry, and open its key.

    `allow_expired` skips the expiry check only (an expired token may still be revoked by its text).
    Raises ApiError(401) for anything wrong; messages never repeat the token.
    """
    keys, claims = signed_claims(token, keyring)
    exp, iat, jti, sub, ek = (claims.get(k) for k in ("exp", "iat", "jti", "sub", "ek"))
    # A token minted before chains existed is its own chain, renewable until its own expiry.
    cid, rexp = claims.get("cid", jti), claims.get("rexp", exp)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in (exp, iat, rexp)):
        raise invalid_token("The token's times are invalid.")
    exp, iat, rexp = cast(int, exp), cast(int, iat), cast(int, rexp)
    if exp <= now and not allow_expired:
        raise invalid_token("The token has expired.")
    if iat > now + MAX_FUTURE_IAT_S:
        raise invalid_token(
            "The token was issued in the future: check the clocks of this server and the "
            "one that minted it."
        )
    texts = (jti, sub, ek, cid, claims.get("org"), claims.get("project"))
    if (
        not all(isinstance(t, str) for t in texts[:4])
        or not TOKEN_ID_RE.match(cast(str, cid))
        or not cast(str, jti).isascii()
    ):
        raise invalid_token("The token's claims are invalid.")
    jti, sub, ek, cid = cast(str, jti), cast(str, sub), cast(str, ek), cast(str, cid)
    org, project = texts[4], texts[5]
    for label in (org, project):
        if label is not None and (not isinstance(label, str) or not LABEL_RE.match(label)):
            raise invalid_token("The token's claims are invalid.")
    try:
        permissions = parse_permissions(claims)
    except ValueError:
        # Fail closed: a limit we cannot read must not become no limit.
        raise invalid_token("The token's permission claims are invalid.") from None
    try:
        key = open_key(ek, jti, keys.sealing_key)
    except ValueError:
        raise invalid_token("The token's sealed key does not open.") from None
    try:
        dlg, ancestors = parse_lineage(claims)
    except ValueError:
        raise invalid_token("The token's delegation claims are invalid.") from None
    return TokenClaims(
        jti=jti,
        kid=keys.kid,
        sub=sub,
        iat=iat,
        exp=exp,
        key=key,
        org=org,
        project=project,
        permissions=permissions,
        cid=cid,
        rexp=rexp,
        dlg=dlg,
        ancestors=ancestors,
    )


def signed_claims(
    token: str, keyring: Mapping[str, SecretKeys]
) -> tuple[SecretKeys, dict[str, Any]]:
    """The keys that signed a token (by its `kid`) and its payload, its HS256 signature, issuer and
    audience checked. Raises ApiError(401)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid_token("The token is too long.")
    # Exactly one spelling per token: no padding, spaces or other bytes.
    if not JWT_SHAPE_RE.match(token):
        raise invalid_token("The token is not a SOAKP token.")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise invalid_token("The token is not a SOAKP token.") from None
    kid = header.get("kid")
    keys = keyring.get(kid) if isinstance(kid, str) else None
    if keys is None:
        raise invalid_token("The token was not signed by a secret this server knows.")
    try:
        # Expiry is checked by the caller against its clock, without leeway.
        options: Any = {
            "require": ["iss", "aud", "sub", "iat", "exp", "jti"],
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
        }
        claims = jwt.decode(
            token,
            keys.signing_key,
            algorithms=[JWT_ALGORITHM],
            audience=TOKEN_AUDIENCE,
            issuer=TOKEN_ISSUER,
            options=options,
        )
    except jwt.InvalidTokenError:
        raise invalid_token("The token's signature or claims are invalid.") from None
    return keys, claims


def parse_lineage(claims: Mapping[str, Any]) -> tuple[int, tuple[Ancestor, ...]]:
    """`dlg`, and `anc` with the ancestors' limits (`alim`), from a token's payload. Raises
    ValueError."""
    dlg = claims.get("dlg", 0)
    if isinstance(dlg, bool) or not isinstance(dlg, int) or not 0 <= dlg <= MAX_DELEGATION_DEPTH:
        raise ValueError("dlg")
    anc, alim = claims.get("anc", []), claims.get("alim", [])
    if (
        not isinstance(anc, list)
        or not isinstance(alim, list)
        or len(anc) != len(alim)
        or len(anc) > MAX_DELEGATION_DEPTH
    ):
        raise ValueError("anc")
    ancestors = []
    for cid, limits in zip(anc, alim, strict=True):
        if (
            not isinstance(cid, str)
            or not TOKEN_ID_RE.match(cid)
            or not isinstance(limits, list)
            or len(limits) != 2
        ):
            raise ValueError("anc")
        rpm, budget = limits
        ancestors.append(
            Ancestor(
                cid,
                None if rpm is None else parse_int_claim("rpm", rpm, MAX_RPM),
                None if budget is None else parse_int_claim("budget", budget, MAX_TOKENS_BUDGET),
            )
        )
    return dlg, tuple(ancestors)


@dataclass(slots=True)
class Revocations:
    """What is revoked, by id, each with the time after which remembering it no longer matters.

    A chain (revoked by an operator) takes every token of it, past and future; a single token is
    revoked when it is refreshed, and its chain goes on.
    """

    chains: dict[str, int] = field(default_factory=dict)  # cid -> the chain's renew-until time
    tokens: dict[str, int] = field(default_factory=dict)  # jti -> the token's expiry
    fresh_until: float = math.inf  # shared (--redis): past this time the set is too old to trust

    def revoked(self, claims: TokenClaims) -> bool:
        return claims.jti in self.tokens or self.chain_revoked(claims)

    def chain_revoked(self, claims: TokenClaims) -> bool:
        """Its chain or any ancestor's is revoked: revoking a parent revokes every child."""
        chains = self.chains
        return claims.cid in chains or any(a.cid in chains for a in claims.ancestors)

    def forget_before(self, now: int) -> None:
        for table in (self.chains, self.tokens):
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]


class TokenCache:
    """Verified tokens by their text, so each distinct token pays for HMAC and AES-GCM once.

    Bounded; revocation-aware through the shared Revocations; an entry is dropped when its token
    expires.
    """

    def __init__(
        self, keyring: Mapping[str, SecretKeys], revoked: Revocations, max_entries: int = 10000
    ) -> None:
        self.keyring = keyring
        self.revoked = revoked
        self.max_entries = max_entries
        self.entries: dict[str, TokenClaims] = {}

    def verify(self, token: str, now: float) -> TokenClaims:
        """verify_token() once per distinct token, then a dict lookup. Raises ApiError(401)."""
        claims = self.entries.get(token)
        if claims is None:
            claims = verify_token(token, self.keyring, now)
            if len(self.entries) >= self.max_entries:
                del self.entries[next(iter(self.entries))]
            self.entries[token] = claims
        elif claims.exp <= now:
            del self.entries[token]
            raise invalid_token("The token has expired.")
        if now > self.revoked.fresh_until:
            raise ApiError(
                503,
                "SOAKP cannot reach the store of revoked tokens; try again shortly.",
                "store_unavailable",
                headers=[("Retry-After", "1")],
            )
        if self.revoked.revoked(claims):
            raise invalid_token("The token has been revoked.")
        return claims


def pattern_matches(pattern: str, path: str) -> bool:
    """A `paths` entry against a /v1/... path. A trailing * matches at a segment boundary:
    `/v1/files*` is `/v1/files` and `/v1/files/...`, never `/v1/filesX`."""
    if not pattern.endswith("*"):
        return path == pattern
    stem = pattern[:-1]
    if stem.endswith("/"):
        return path.startswith(stem)
    return path == stem or path.startswith(stem + "/")


def path_allowed(patterns: Sequence[str], path: str) -> bool:
    """Whether a /v1/... path matches one of a token's `paths`."""
    return any(pattern_matches(p, path) for p in patterns)


# Endpoints that hand out a credential, or act with organisation admin rights, outside every SOAKP
# limit: closed unless a `paths` entry names the endpoint itself (SPEC.md, Limits).
CREDENTIAL_ENDPOINTS = (
    "/v1/realtime/client_secrets",
    "/v1/realtime/sessions",
    "/v1/realtime/transcription_sessions",
    "/v1/organization",
)


def credential_endpoint(path: str) -> str | None:
    """The credential endpoint a /v1/... path belongs to, or None."""
    for endpoint in CREDENTIAL_ENDPOINTS:
        if path == endpoint or path.startswith(endpoint + "/"):
            return endpoint
    return None


def credential_endpoint_opened(patterns: Sequence[str] | None, endpoint: str) -> bool:
    """Whether a token's `paths` open a credential endpoint: an entry must begin with the endpoint's
    own path (`/v1/organization/*` does, `/v1/*` and `/v1/organization-x` do not)."""
    return patterns is not None and any(
        p == endpoint or p.startswith(endpoint + "/") or p == endpoint + "*" for p in patterns
    )


class RateLimiter:
    """Requests per minute per token, by GCRA: smooth, with a burst of up to one minute's allowance,
    O(1) time and one float per token."""

    def __init__(self) -> None:
        self.next_free: dict[
            str, float
        ] = {}  # the theoretical arrival time of each key's next request

    def acquire(self, key: str, per_minute: int, now: float) -> float:
        """Take one request. Returns 0 when allowed, else the seconds until one would be."""
        interval = 60.0 / per_minute
        tat = max(self.next_free.get(key, now), now)
        wait = tat - now - (60.0 - interval)
        if wait > 1e-9:
            return wait
        self.next_free[key] = tat + interval
        return 0.0

    def acquire_all(self, limits: Sequence[tuple[str, int]], now: float) -> float:
        """Take one request from every (key, per_minute) at once, or from none: returns 0 when all
        allow it, else the longest wait."""
        waits = []
        for key, per_minute in limits:
            interval = 60.0 / per_minute
            tat = max(self.next_free.get(key, now), now)
            waits.append(tat - now - (60.0 - interval))
        worst = max(waits, default=0.0)
        if worst > 1e-9:
            return worst
        for key, per_minute in limits:
            self.next_free[key] = max(self.next_free.get(key, now), now) + 60.0 / per_minute
        return 0.0

    def prune(self, now: float) -> None:
        self.next_free = {k: t for k, t in self.next_free.items() if t > now}


# 3. Registry: token metadata, usage and revocations in SQLite. Never the key, never a token.
#
# The registry is never needed to accept a token (SPEC.md: instances scale out stateless). The
# server keeps revocations in memory and batches usage, so no request waits on the disk.

REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    sub TEXT,
    kid TEXT,
    created_at INTEGER,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    last_used_at INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires_at);
CREATE TABLE IF NOT EXISTS chains (
    cid TEXT PRIMARY KEY,
    jti TEXT,
    sub TEXT,
    kid TEXT,
    created_at INTEGER,
    expires_at INTEGER NOT NULL,
    renew_until INTEGER NOT NULL,
    revoked_at INTEGER,
    last_used_at INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    limits TEXT NOT NULL DEFAULT '{}',
    parent TEXT
);
CREATE INDEX IF NOT EXISTS chains_by_renewal ON chains (renew_until);
"""
# Version 1 had only `tokens`, one row per token with its usage; version 2 keeps usage per chain and
# uses `tokens` for the chain of each jti and the revocation of refreshed tokens.
REGISTRY_VERSION = 2
MIGRATE_TO_CHAINS_SQL = (
    "ALTER TABLE tokens ADD COLUMN cid TEXT",
    "UPDATE tokens SET cid = jti WHERE cid IS NULL",
    "INSERT OR IGNORE INTO chains (cid, jti, sub, kid, created_at, expires_at, renew_until, "
    "revoked_at, last_used_at, requests, prompt_tokens, completion_tokens, errors) "
    "SELECT jti, jti, sub, kid, created_at, expires_at, expires_at, revoked_at, last_used_at, "
    "requests, prompt_tokens, completion_tokens, errors FROM tokens",
    "CREATE INDEX IF NOT EXISTS tokens_by_chain ON tokens (cid)",
)
CHAIN_COLUMNS = (
    "cid",
    "jti",
    "sub",
    "created_at",
    "expires_at",
    "renew_until",
    "revoked_at",
    "last_used_at",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "limits",
    "parent",
)
LIST_CHAINS_SQL = f"SELECT {', '.join(CHAIN_COLUMNS)} FROM chains ORDER BY created_at, cid"
LIMIT_FIELDS = (*PERMISSION_CLAIMS, "org", "project", "delegate")
# Usage from a batch is added to the chain's row, which is created when the chain was minted
# elsewhere.
ADD_USAGE_SQL = """
INSERT INTO chains (cid, jti, sub, kid, created_at, expires_at, renew_until, last_used_at, requests,
                    prompt_tokens, completion_tokens, errors)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (cid) DO UPDATE SET
    last_used_at = MAX(COALESCE(last_used_at, 0), excluded.last_used_at),
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    errors = errors + excluded.errors
"""
REGISTER_CHAIN_SQL = """
INSERT INTO chains (cid, jti, sub, kid, created_at, expires_at, renew_until, limits, parent)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (cid) DO UPDATE SET
    jti = excluded.jti,
    expires_at = MAX(expires_at, excluded.expires_at),
    limits = CASE WHEN limits = '{}' THEN excluded.limits ELSE limits END
"""


@dataclass(slots=True)
class UsageDelta:
    """A chain's usage since the last flush; a few counters kept in memory on the hot path."""

    jti: str | None  # None for an ancestor charged with a child's usage: its own row says who it is
    sub: str | None
    kid: str | None
    created_at: int | None
    expires_at: int
    renew_until: int
    last_used_at: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def row(self, cid: str) -> tuple[Any, ...]:
        return (
            cid,
            self.jti,
            self.sub,
            self.kid,
            self.created_at,
            self.expires_at,
            self.renew_until,
            self.last_used_at,
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.errors,
        )


def chain_limits(grant: Grant) -> str:
    """A chain's limits as the registry stores them: JSON of the limit claims it has."""
    claims = {
        **grant.permissions.as_claims(),
        "org": grant.org,
        "project": grant.project,
        "delegate": grant.delegate or None,
    }
    return json.dumps(
        {name: claims[name] for name in LIMIT_FIELDS if claims.get(name) is not None},
        separators=(",", ":"),
        sort_keys=True,
    )


def create_private_file(path: str) -> None:
    """Create the database file (if new) readable by its owner only, and make an existing one so.

    SQLite gives its -wal and -shm files the database file's mode, so they are private too.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the token database {path}: {exc.strerror or exc}; "
            "check --db / SOAKP_DB and the folder's permissions"
        ) from None


class TokenRegistry:
    """The SQLite file of token chains: who, until when, what limits, what they used, what is
    revoked. Synchronous: the CLI calls it directly, the server from one worker thread (see
    RegistryWorker). Parameterised SQL only."""

    def __init__(self, path: str) -> None:
        create_private_file(path)
        try:
            self.db = sqlite3.connect(
                path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            if path != ":memory:":
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(REGISTRY_SCHEMA)
            self.migrate()
        except sqlite3.Error as exc:
            raise ConfigError(
                f"--db: cannot open the token database {path}: {describe_error(exc)}"
            ) from None

    def migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= REGISTRY_VERSION:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(tokens)")}
            for statement in MIGRATE_TO_CHAINS_SQL:
                if statement.startswith("ALTER") and "cid" in columns:
                    continue
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {REGISTRY_VERSION}")

    def register(
        self,
        minted: MintedToken,
        sub: str,
        kid: str,
        created_at: int,
        limits: str,
        parent: str | None = None,
    ) -> None:
        """Record a new token: its chain's row (created, or moved on to this token) and its jti."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                REGISTER_CHAIN_SQL,
                (
                    minted.cid,
                    minted.jti,
                    sub,
                    kid,
                    created_at,
                    minted.expires_at,
                    minted.renew_until,
                    limits,
                    parent,
                ),
            )
            self.db.execute(
                "INSERT OR IGNORE INTO tokens (jti, cid, sub, kid, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (minted.jti, minted.cid, sub, kid, created_at, minted.expires_at),
            )

    def chain_of(self, token_id: str) -> tuple[str, int] | None:
        """(cid, renew_until) of the chain a jti or cid names, or None when this registry never saw
        it."""
        row = self.db.execute(
            "SELECT cid, renew_until FROM chains WHERE cid = ?", (token_id,)
        ).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT chains.cid, chains.renew_until FROM tokens JOIN chains "
                "ON chains.cid = tokens.cid WHERE tokens.jti = ?",
                (token_id,),
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def revoke_chain(self, cid: str, renew_until: int, now: int) -> int:
        """Revoke a chain (creating its row for one minted elsewhere). Returns its revoked_at."""
        self.db.execute(
            "INSERT INTO chains (cid, expires_at, renew_until, revoked_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (cid) DO UPDATE SET "
            "revoked_at = COALESCE(revoked_at, excluded.revoked_at)",
            (cid, renew_until, renew_until, now),
        )
        return self.db.execute("SELECT revoked_at FROM chains WHERE cid = ?", (cid,)).fetchone()[0]

    def revoke_token(self, jti: str, cid: str, expires_at: int, now: int) -> None:
        """Revoke one token of a chain (a refreshed one); the chain goes on."""
        self.db.execute(
            "INSERT INTO tokens (jti, cid, expires_at, revoked_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (jti) DO UPDATE SET "
            "revoked_at = COALESCE(revoked_at, excluded.revoked_at)",
            (jti, cid, expires_at, now),
        )

    def revocations(self, now: int) -> Revocations:
        """What is revoked and still matters: chains before their renew-until, tokens
        before expiry."""
        chains = self.db.execute(
            "SELECT cid, renew_until FROM chains WHERE revoked_at IS NOT NULL AND renew_until > ?",
            (now,),
        )
        tokens = self.db.execute(
            "SELECT jti, expires_at FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?",
            (now,),
        )
        return Revocations(dict(chains.fetchall()), dict(tokens.fetchall()))

    def spent(self, now: int) -> dict[str, int]:
        """Tokens used so far by each chain that can still be used: what budgets start from."""
        rows = self.db.execute(
            "SELECT cid, prompt_tokens + completion_tokens FROM chains WHERE renew_until > ? "
            "AND prompt_tokens + completion_tokens > 0",
            (now,),
        )
        return dict(rows.fetchall())

    def data_version(self) -> int:
        """Changes when another connection (a `soakp revoke`) commits: cheap to poll."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def add_usage(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(ADD_USAGE_SQL, rows)

    def prune(self, now: int) -> int:
        """Delete chains past their renew-until time and expired tokens: none of them can be used
        again, so their revocation no longer matters. Returns the number of chains deleted."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM tokens WHERE expires_at <= ?", (now,))
            return self.db.execute("DELETE FROM chains WHERE renew_until <= ?", (now,)).rowcount

    def list(self) -> list[dict[str, Any]]:
        """One row per chain, newest token's jti and expiry, usage and limits; never a key or a
        token."""
        rows = []
        for row in self.db.execute(LIST_CHAINS_SQL):
            chain = dict(zip(CHAIN_COLUMNS, row, strict=True))
            limits = json.loads(chain.pop("limits") or "{}")
            chain.update({name: limits.get(name) for name in LIMIT_FIELDS})
            rows.append(chain)
        return rows

    def close(self) -> None:
        self.db.close()


class RegistryWorker:
    """Runs TokenRegistry calls on one thread of its own, so SQLite never blocks the event loop."""

    def __init__(self, registry: TokenRegistry) -> None:
        self.registry = registry
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="soakp-db"
        )

    async def call(self, method: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, method, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.registry.close()


# Shared state: with --redis, what several instances must agree on lives in Redis (or Valkey).
#
# Each key carries its chain's id as a hash tag, `soakp:{cid}:...`, so a script touches one slot and
# Redis Cluster works. A child token's request touches its own chain and each ancestor's, which are
# other slots: one script per chain, taken one by one, the earlier ones given back when a later one
# refuses. So each chain's rpm and budget hold exactly; a request refused by an ancestor holds a
# place on its own chain for one round trip, which can only refuse another request, never let one
# more in. Rate limits and budgets run on Redis's clock (TIME), so the instances' clocks never
# matter. When Redis fails, each kind of state falls back as SPEC.md says; a background probe brings
# it back.

# asyncio.wait_for() runs what it waits for as a task of its own before Python 3.12; a timeout
# of the waiting task costs a timer only. Forwarding bounds its waits on peers with it too.
if sys.version_info >= (3, 11):

    async def bounded(awaitable: Any, seconds: float) -> Any:
        """Await with a time limit; TimeoutError past it."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10

    async def bounded(awaitable: Any, seconds: float) -> Any:
        """Await with a time limit; TimeoutError past it."""
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except asyncio.TimeoutError:
            raise TimeoutError from None


STORE_TIMEOUT_S = 0.3  # no request waits longer than this on Redis
SHARED_POLL_S = 0.25  # revocation version check, probe, pending writes: a change is seen within 1 s
RESERVATION_LEASE_S = 30  # a reservation whose instance died is freed after this (else renewed)
RESERVATION_RENEW_S = 10.0
# Settlements are sent together this long after the first: at c=1 one script per chain per batch
# instead of one per request. A settled request counts as in flight for this long longer.
SETTLE_BATCH_S = 0.02
SHARED_LIST_BATCH = 500
IDLE_CONNECTIONS = 32  # the store's own connections kept open between scripts; more close after use
REVOCATIONS_KEY, REVOCATIONS_VERSION_KEY = "soakp:{rev}", "soakp:{rev}:v"
REVOCATION_KEYS = [REVOCATIONS_KEY, REVOCATIONS_VERSION_KEY]
REVOCATIONS_CHANNEL = "soakp:revocations"
CHAINS_KEY = "soakp:{chains}"  # chain ids by renew-until: what GET /jwt lists
KEEP_AFTER_S = 86400  # chain keys outlive the chain's renew-until by a day, then Redis drops them

# The scripts a request waits for answer one status line ({ok = ...}): redis-py's parser reads it in
# one step, where an array costs it a step per element.
#
# GCRA, as RateLimiter, on Redis's clock. KEYS: the chain's theoretical arrival time. ARGV: rpm, and
# 1 to take a request or -1 to give one back. Returns the seconds to wait, "0" when allowed.
RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = 60 / tonumber(ARGV[1])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
if ARGV[2] == '-1' then tat = tat - interval
elseif tat - now - (60 - interval) > 1e-9 then
  return {ok = string.format('%.3f', tat - now - (60 - interval))}
else tat = tat + interval end
if tat <= now then redis.call('DEL', KEYS[1]) else
  redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000)) end
return {ok = '0'}
"""
# A chain's budget. KEYS: spent (tokens), reservations (hash id -> tokens), leases (zset id ->
# expiry), and the chain's rate key. ARGV: op, budget, amount, reservation id, lease seconds,
# keep-until, rpm (0: none). Returns "spent reserved granted seconds-to-wait". `reserve` takes
# one request from the rpm (GCRA, as RATE_SCRIPT) and grants min(amount, what is left), both or
# neither, so a request with rpm and a budget costs one round trip; `settle` frees a reservation and
# charges what was used (several reservation ids at once, separated by spaces, and what they used
# together); `shrink` lowers a reservation; `renew` extends its lease. Expired leases go first.
BUDGET_SCRIPT = """
local t = redis.call('TIME')
local now, op, id = tonumber(t[1]), ARGV[1], ARGV[4]
if op == 'settle' then
  for done in string.gmatch(id, '%S+') do
    redis.call('HDEL', KEYS[2], done); redis.call('ZREM', KEYS[3], done)
  end
  local spent = redis.call('INCRBY', KEYS[1], ARGV[3])
  redis.call('EXPIREAT', KEYS[1], ARGV[6])
  return {ok = string.format('%d 0 0 0', spent)}
end
if op == 'renew' or op == 'shrink' then
  if redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), id)
    if op == 'shrink' then redis.call('HSET', KEYS[2], id, ARGV[3]) end
  end
  return {ok = '0 0 0 0'}
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, gone in ipairs(dead) do redis.call('HDEL', KEYS[2], gone) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(n) end
local granted, rpm = 0, tonumber(ARGV[7] or '0')
if op == 'reserve' then
  local exact, interval, tat = now + tonumber(t[2]) / 1000000, 0, 0
  if rpm > 0 then
    interval = 60 / rpm
    tat = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), exact)
    if tat - exact - (60 - interval) > 1e-9 then
      return {ok = string.format('%d %d 0 %.3f', spent, reserved, tat - exact - (60 - interval))}
    end
  end
  granted = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) - spent - reserved)
  if granted > 0 then
    redis.call('HSET', KEYS[2], id, granted)
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), id)
    redis.call('EXPIREAT', KEYS[2], ARGV[6]); redis.call('EXPIREAT', KEYS[3], ARGV[6])
    if rpm > 0 then
      redis.call('SET', KEYS[4], string.format('%.6f', tat + interval), 'PX',
                 math.ceil((tat + interval - exact) * 1000))
    end
  else granted = 0 end
end
return {ok = string.format('%d %d %d 0', spent, reserved, granted)}
"""
# KEYS: the revocation set (member `c:<cid>` or `t:<jti>`, score: until when it matters) and its
# version. ARGV: member, until. Returns 1 when it is new (one refresh of a token wins everywhere).
REVOKE_SCRIPT = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t[1])
local added = redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
if added == 1 then redis.call('INCR', KEYS[2]) end
return added
"""
# KEYS: a chain's metadata hash. ARGV: jti, sub, created_at, expires_at, renew_until, limits,
# parent, keep-until, then usage: requests, prompt, completion, errors, last_used_at. The newest
# token's jti and expiry win; usage adds up.
CHAIN_SCRIPT = """
if ARGV[3] ~= '' and redis.call('HSETNX', KEYS[1], 'created_at', ARGV[3]) == 1 then
  redis.call('HSET', KEYS[1], 'sub', ARGV[2], 'renew_until', ARGV[5], 'limits', ARGV[6],
             'parent', ARGV[7])
end
local newest = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[4]) >= newest then
  redis.call('HSET', KEYS[1], 'jti', ARGV[1], 'expires_at', ARGV[4])
end
for i, name in ipairs({'requests', 'prompt_tokens', 'completion_tokens', 'errors'}) do
  if ARGV[8 + i] ~= '0' then redis.call('HINCRBY', KEYS[1], name, ARGV[8 + i]) end
end
if tonumber(ARGV[13]) > tonumber(redis.call('HGET', KEYS[1], 'last_used_at') or '0') then
  redis.call('HSET', KEYS[1], 'last_used_at', ARGV[13])
end
redis.call('EXPIREAT', KEYS[1], ARGV[8])
return 1
"""
# Admin lock-out by address. KEYS: failures, lock. ARGV: op (check, ok, fail), allowed, window,
# lockout. Returns the lock's milliseconds left (check), or the failures counted (fail).
ADMIN_SCRIPT = """
if ARGV[1] == 'check' then return redis.call('PTTL', KEYS[2]) end
if ARGV[1] == 'ok' then redis.call('DEL', KEYS[1]); return 0 end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[4]); redis.call('DEL', KEYS[1])
end
return n
"""


class StoreDown(Exception):
    """Redis did not answer in time, or is known to be down: use the fallback."""


@dataclass(frozen=True, slots=True)
class Script:
    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Script:
        sha = hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324 - Redis names scripts so
        return cls(text, sha)


RATE, BUDGET, REVOKE, CHAIN, ADMIN = (
    Script.of(t) for t in (RATE_SCRIPT, BUDGET_SCRIPT, REVOKE_SCRIPT, CHAIN_SCRIPT, ADMIN_SCRIPT)
)


def resp_command(*args: str | int | float) -> bytes:
    """A command as RESP puts it on the wire (an array of bulk strings), ready for redis-py's
    Connection.send_packed_command(): what its own packer writes for strings and numbers (UTF-8,
    repr), in half its time."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def store_error(exc: BaseException) -> str:
    """A Redis failure for the log: its class and message (with the address, never a password)."""
    text = str(exc)[:200].translate({c: " " for c in range(0x20)})
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def chain_key(cid: str, what: str) -> str:
    return f"soakp:{{{cid}}}:{what}"


def parse_revocation_set(pairs: Sequence[tuple[str, float]]) -> Revocations:
    """The shared revocation set's members (`c:<cid>`, `t:<jti>`) with their until-times."""
    found = Revocations()
    for member, until in pairs:
        kind, _, token_id = member.partition(":")
        table = found.chains if kind == "c" else found.tokens if kind == "t" else None
        if table is not None and TOKEN_ID_RE.match(token_id):
            table[token_id] = int(until)
    return found


def chain_row(cid: str, meta: Mapping[str, str]) -> dict[str, Any]:
    """A GET /jwt row from a chain's metadata hash in Redis (as TokenRegistry.list() gives it)."""

    def number(name: str) -> int | None:
        value = meta.get(name)
        return int(value) if value not in (None, "") else None

    row: dict[str, Any] = {"cid": cid, "jti": meta.get("jti"), "sub": meta.get("sub")}
    for name in ("created_at", "expires_at", "renew_until", "revoked_at", "last_used_at"):
        row[name] = number(name)
    for name in ("requests", "prompt_tokens", "completion_tokens", "errors"):
        row[name] = number(name) or 0
    limits = json.loads(meta.get("limits") or "{}")
    row.update({name: limits.get(name) for name in LIMIT_FIELDS})
    row["parent"] = meta.get("parent") or None
    return row


class SharedStore:
    """The Redis side of ServerState: revocations, rate limits, budgets, usage, chain metadata and
    the admin lock-out that several instances share. Every call is bounded by STORE_TIMEOUT_S; a
    failure marks Redis down (logged once, metric, /healthz) and raises StoreDown until the probe
    sees it back. Writes that must not be lost (revocations, registrations, usage, settlements) wait
    in memory and are sent when Redis is back."""

    def __init__(
        self,
        client: Any,
        subscriber: Any,
        errors: tuple[type[BaseException], ...],
        no_script: type[BaseException],
        stale_after_s: float,
        new_connection: Callable[[], Any] | None = None,
    ) -> None:
        self.client, self.subscriber = client, subscriber
        # Scripts go over connections of their own (a single server; None on a Cluster): see
        # evaluate().
        self.new_connection = new_connection
        self.idle: list[Any] = []
        self.errors, self.no_script = errors, no_script
        self.stale_after_s = stale_after_s
        self.up = True
        self.down_reason = ""
        self.version: str | None = None  # of the revocation set, as last read
        self.synced_at = time.time()  # when the revocation set was last known to be current
        self.over_limit_until: dict[str, float] = {}  # cid -> when to try again (wall clock)
        # reservation id -> its budgeted chains, for lease renewal
        self.reservations: dict[str, list[tuple[str, int]]] = {}
        self.pending_revocations: dict[str, int] = {}
        self.pending_chains: list[tuple[str, list[Any]]] = []
        # (cid, reservation id, tokens used, keep-until)
        self.pending_settles: list[tuple[str, str, int, int]] = []
        self.sending = asyncio.Lock()
        self.settle_soon = False  # a batch of settlements is due within SETTLE_BATCH_S
        self.usage: dict[str, UsageDelta] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def mark_down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self.down_reason = store_error(exc)
            log.warning(
                "Redis is unreachable (%s): revocations keep the set known now (503 after "
                "%.0fs), rpm counts per instance, budgets answer 503 unless "
                "--budget-fail-open, admin lock-out counts per instance; retrying every "
                "%.2fs",
                self.down_reason,
                self.stale_after_s,
                SHARED_POLL_S,
            )

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One script on the slot of its keys, within STORE_TIMEOUT_S. Raises StoreDown."""
        if not self.up:
            raise StoreDown
        try:
            return await bounded(self.evaluate(script, keys, args), STORE_TIMEOUT_S)
        except (*self.errors, TimeoutError, OSError) as exc:  # type: ignore[misc]
            self.mark_down(exc)
            raise StoreDown from None

    async def command(self, name: str, *args: Any) -> Any:
        return await self.call(self.client.execute_command(name, *args))

    async def call(self, awaitable: Any) -> Any:
        """One redis-py call, within STORE_TIMEOUT_S. Raises StoreDown."""
        if not self.up:
            awaitable.close()
            raise StoreDown
        try:
            return await bounded(awaitable, STORE_TIMEOUT_S)
        except (*self.errors, TimeoutError, OSError) as exc:  # type: ignore[misc]
            self.mark_down(exc)
            raise StoreDown from None

    async def evaluate(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A script through redis-py. On a single server it goes over a connection of the store's
        own, straight to redis-py's Connection: the client's pool checkout, retry wrapper, metrics
        hooks and per-call timers nearly double what a script costs a request."""
        if self.new_connection is None:  # a Cluster: redis-py sends it to its slot's node
            try:
                return await self.client.execute_command(
                    "EVALSHA", script.sha, len(keys), *keys, *args
                )
            except self.no_script:  # a restarted Redis forgot its scripts
                return await self.client.execute_command(
                    "EVAL", script.text, len(keys), *keys, *args
                )
        conn = await self.connection()
        try:
            try:
                await conn.send_packed_command(
                    resp_command("EVALSHA", script.sha, len(keys), *keys, *args),
                    check_health=False,
                )
                reply = await conn.read_response()
            except self.no_script:
                await conn.send_packed_command(
                    resp_command("EVAL", script.text, len(keys), *keys, *args),
                    check_health=False,
                )
                reply = await conn.read_response()
        except BaseException:  # dropped (redis-py has closed it if the connection itself failed)
            self.start(conn.disconnect(nowait=True))
            raise
        if len(self.idle) < IDLE_CONNECTIONS:
            self.idle.append(conn)
        else:
            self.start(conn.disconnect())
        return reply

    async def connection(self) -> Any:
        """An idle connection of the store's, or a new one (it connects on its first command). One
        that Redis closed meanwhile (a restart) is dropped first, as redis-py's pool would."""
        assert self.new_connection is not None
        conn = self.idle.pop() if self.idle else self.new_connection()
        if conn.is_connected:
            try:
                stale = await conn.can_read()  # an answer nobody asked for, or the end of it
            except (*self.errors, OSError):  # type: ignore[misc]
                stale = True
            if stale:
                await conn.disconnect(nowait=True)
        return conn

    # Rate limits and budgets
    async def admit(
        self,
        limits: Sequence[tuple[str, int | None, int | None]],
        want: int,
        keep_until: int,
        now: float,
    ) -> tuple[str, int, dict[str, tuple[int, int]], float]:
        """One request through the rpm and budget of each of its chains, (cid, budget, rpm), one
        script per chain, reserving up to `want` tokens on each budgeted one, all the same amount
        (the least any grants). Returns (reservation id, tokens granted, (spent, reserved) of the
        budgeted chains, seconds to wait when an rpm refused); nothing is held when it refuses. A
        chain known to be over its rpm costs no round trip. Raises StoreDown, having given back
        what it took."""
        known = max(
            (self.over_limit_until.get(cid, 0.0) - now for cid, _, rpm in limits if rpm),
            default=0.0,
        )
        if known > 0:
            return "", 0, {}, known
        rid = b64url_encode(secrets.token_bytes(12)) if want else ""
        granted, figures = want, {}
        rated: list[Any] = []
        held: list[Any] = []
        try:
            for cid, budget, rpm in limits:
                if budget is not None and want:
                    keys = [*self.budget_keys(cid), chain_key(cid, "rate")]
                    reply = await self.run(
                        BUDGET,
                        keys,
                        [
                            "reserve",
                            budget,
                            granted,
                            rid,
                            RESERVATION_LEASE_S,
                            keep_until,
                            rpm or 0,
                        ],
                    )
                    spent, reserved, granted_here, waited = reply.split()
                    figures[cid] = (int(spent), int(reserved))
                    wait_s, got = float(waited), int(granted_here)
                elif rpm:
                    wait_s, got = float(await self.run(RATE, [chain_key(cid, "rate")], [rpm, 1])), 1
                else:
                    continue
                if wait_s > 0 or got <= 0:
                    if wait_s > 0:
                        self.over_limit_until[cid] = now + wait_s
                    await self.give_back(rated, held, rid, keep_until)
                    return "", 0, figures, wait_s
                rated += [(cid, rpm)] if rpm else []
                if budget is not None and want:
                    held.append(cid)
                    if got < granted:
                        granted = got
                        for earlier in held[:-1]:
                            await self.run(
                                BUDGET,
                                self.budget_keys(earlier),
                                ["shrink", 0, granted, rid, RESERVATION_LEASE_S, keep_until],
                            )
        except StoreDown:
            await self.give_back(rated, held, rid, keep_until)
            raise
        if rid:
            self.reservations[rid] = [
                (cid, budget) for cid, budget, _ in limits if budget is not None
            ]
        return rid, granted, figures, 0.0

    async def give_back(
        self, rated: Sequence[tuple[str, int]], held: Sequence[str], rid: str, keep_until: int
    ) -> None:
        """Undo what admit() took before a refusal: rpm places at once, reservations soon."""
        for cid, rpm in rated:
            with contextlib.suppress(StoreDown):
                await self.run(RATE, [chain_key(cid, "rate")], [rpm, -1])
        if held:
            self.queue_settle([(cid, 0) for cid in held], rid, 0, keep_until)
            self.start(self.send_soon())

    # Budgets
    def budget_keys(self, cid: str) -> list[str]:
        return [chain_key(cid, "spent"), chain_key(cid, "reserved"), chain_key(cid, "leases")]

    async def budget_figures(
        self, budgets: Sequence[tuple[str, int]]
    ) -> dict[str, tuple[int, int]]:
        """(spent, reserved) of each budgeted chain. Raises StoreDown."""
        replies = await asyncio.gather(
            *(
                self.run(BUDGET, self.budget_keys(cid), ["check", budget, 0, "", 0, 0])
                for cid, budget in budgets
            )
        )
        figures = {}
        for (cid, _), reply in zip(budgets, replies, strict=True):
            spent, reserved, _, _ = reply.split()
            figures[cid] = (int(spent), int(reserved))
        return figures

    def queue_settle(
        self, budgets: Sequence[tuple[str, int]], rid: str, used: int, keep_until: int
    ) -> None:
        self.pending_settles += [(cid, rid, used, keep_until) for cid, _ in budgets]

    def settle(
        self, budgets: Sequence[tuple[str, int]], rid: str, used: int, keep_until: int
    ) -> None:
        """Free a reservation and charge what was used, within SETTLE_BATCH_S: the settlements of
        that time go together, one script per chain. Until then the reservation stays held."""
        self.reservations.pop(rid, None)
        self.queue_settle(budgets, rid, used, keep_until)
        if not self.settle_soon:
            self.settle_soon = True
            asyncio.get_running_loop().call_later(SETTLE_BATCH_S, self.start_settling)

    def start_settling(self) -> None:
        self.settle_soon = False
        self.start(self.send_soon())

    async def send_soon(self) -> None:
        with contextlib.suppress(StoreDown):
            await self.send_pending()

    def start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # Revocations
    async def revoke(self, member: str, until: int) -> bool | None:
        """Store a revocation and tell every instance. Returns whether it is new, or None when Redis
        is unreachable (it is kept and sent when Redis is back)."""
        try:
            added = await self.run(REVOKE, REVOCATION_KEYS, [member, until])
        except StoreDown:
            self.pending_revocations[member] = until
            return None
        with contextlib.suppress(StoreDown):
            await self.command("PUBLISH", REVOCATIONS_CHANNEL, f"{member} {until}")
            if member.startswith("c:"):
                await self.command(
                    "HSETNX", chain_key(member[2:], "meta"), "revoked_at", int(time.time())
                )
        return bool(added)

    async def sync_revocations(self, known: Revocations) -> Revocations | None:
        """The whole shared set when its version moved (None when not). A Redis that lost the set
        (it restarted empty) gets back every revocation this instance knows. Raises StoreDown."""
        version = await self.command("GET", REVOCATIONS_VERSION_KEY)
        self.synced_at = time.time()
        if version is None:
            self.version = None  # a restarted Redis counts again from the start
        if version is None and (known.chains or known.tokens) and not self.pending_revocations:
            log.warning(
                "Redis has no revocations: it restarted empty; sending the %d known here",
                len(known.chains) + len(known.tokens),
            )
            for kind, table in (("c", known.chains), ("t", known.tokens)):
                self.pending_revocations.update({f"{kind}:{i}": t for i, t in table.items()})
            return None
        if version == self.version:
            return None
        pairs = await self.call(
            self.client.zrange(
                REVOCATIONS_KEY, int(time.time()), "+inf", byscore=True, withscores=True
            )
        )
        self.version = version
        return parse_revocation_set(pairs)

    # Chains and usage
    def chain_args(
        self, minted: MintedToken, sub: str, created_at: int, limits: str, parent: str | None
    ) -> list[Any]:
        return [
            minted.jti,
            sub,
            created_at,
            minted.expires_at,
            minted.renew_until,
            limits,
            parent or "",
            minted.renew_until + KEEP_AFTER_S,
            0,
            0,
            0,
            0,
            0,
        ]

    async def register(self, cid: str, args: list[Any]) -> None:
        """A minted token's chain and jti, so that every instance lists it and revokes it by id."""
        try:
            await self.write_chain(cid, args)
        except StoreDown:
            self.pending_chains.append((cid, args))

    async def write_chain(self, cid: str, args: list[Any]) -> None:
        await self.run(CHAIN, [chain_key(cid, "meta")], args)
        await self.command("ZADD", CHAINS_KEY, args[4] or args[7] - KEEP_AFTER_S, cid)
        if args[0] and args[0] != cid:
            await self.command(
                "SET", chain_key(args[0], "cid"), cid, "EXAT", args[3] + KEEP_AFTER_S
            )

    def add_usage(self, batch: Mapping[str, UsageDelta]) -> None:
        for cid, delta in batch.items():
            kept = self.usage.get(cid)
            if kept is None:
                self.usage[cid] = dataclasses.replace(delta)
                continue
            kept.requests += delta.requests
            kept.prompt_tokens += delta.prompt_tokens
            kept.completion_tokens += delta.completion_tokens
            kept.errors += delta.errors
            kept.last_used_at = max(kept.last_used_at, delta.last_used_at)

    async def send_pending(self) -> None:
        """Send what waits: revocations first, then settlements, registrations and usage, each once.
        Raises StoreDown."""
        async with self.sending:
            await self.send_pending_now()

    async def send_pending_now(self) -> None:
        for member, until in list(self.pending_revocations.items()):
            await self.run(REVOKE, REVOCATION_KEYS, [member, until])
            del self.pending_revocations[member]
            with contextlib.suppress(StoreDown):
                await self.command("PUBLISH", REVOCATIONS_CHANNEL, f"{member} {until}")
        while self.pending_settles:  # what each chain's pending settlements add up to, at once
            cid = self.pending_settles[0][0]
            batch = [item for item in self.pending_settles if item[0] == cid]
            rids = " ".join(rid for _, rid, _, _ in batch if rid)
            used, keep_until = sum(item[2] for item in batch), max(item[3] for item in batch)
            await self.run(BUDGET, self.budget_keys(cid), ["settle", 0, used, rids, 0, keep_until])
            done = {id(item) for item in batch}
            self.pending_settles = [item for item in self.pending_settles if id(item) not in done]
        while self.pending_chains:
            await self.write_chain(*self.pending_chains[0])
            self.pending_chains.pop(0)
        while self.usage:
            cid, delta = next(iter(self.usage.items()))
            keep_until = delta.renew_until + KEEP_AFTER_S
            created_at = "" if delta.created_at is None else delta.created_at
            args = [
                delta.jti or "",
                delta.sub or "",
                created_at,
                delta.expires_at,
                delta.renew_until,
                "{}",
                "",
                keep_until,
                delta.requests,
                delta.prompt_tokens,
                delta.completion_tokens,
                delta.errors,
                delta.last_used_at,
            ]
            await self.write_chain(cid, args)
            del self.usage[cid]

    async def renew_leases(self) -> None:
        for rid, budgets in list(self.reservations.items()):
            for cid, _ in budgets:
                await self.run(
                    BUDGET, self.budget_keys(cid), ["renew", 0, 0, rid, RESERVATION_LEASE_S, 0]
                )

    async def chain_of(self, token_id: str) -> tuple[str, int] | None:
        """(cid, renew_until) of the chain a jti or cid names, as any instance registered it."""
        cid = await self.command("GET", chain_key(token_id, "cid")) or token_id
        renew_until = await self.command("HGET", chain_key(cid, "meta"), "renew_until")
        return None if renew_until is None else (cid, int(renew_until))

    async def list(self) -> list[dict[str, Any]]:
        """GET /jwt's rows from every instance. Raises StoreDown."""
        cids = await self.command("ZRANGE", CHAINS_KEY, int(time.time()), "+inf", "BYSCORE")
        rows = []
        for start in range(0, len(cids), SHARED_LIST_BATCH):
            batch = cids[start : start + SHARED_LIST_BATCH]
            metas = await asyncio.gather(
                *(self.command("HGETALL", chain_key(cid, "meta")) for cid in batch)
            )
            rows += [chain_row(cid, meta) for cid, meta in zip(batch, metas, strict=True) if meta]
        return sorted(rows, key=lambda row: (row["created_at"] or 0, row["cid"]))

    # Admin lock-out
    async def admin(
        self, op: str, peer: str, allowed: int, window_s: float, lockout_s: float
    ) -> int:
        keys = [f"soakp:{{admin}}:failures:{peer}", f"soakp:{{admin}}:lock:{peer}"]
        args = [op, allowed, math.ceil(window_s), math.ceil(lockout_s)]
        return int(await self.run(ADMIN, keys, args))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.subscriber, self.client):
            with contextlib.suppress(Exception):
                await client.aclose()
        for conn in self.idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()


async def open_shared_store(config: Config) -> SharedStore:
    """Connect to the Redis of --redis: a single server or a Cluster (found out from INFO). redis-py
    is imported only here, so an instance without --redis never loads it. Raises ConfigError."""
    assert config.redis_url is not None
    try:
        import redis.asyncio as aioredis  # noqa: PLC0415 - the optional extra soakp[redis]
        from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415
        from redis.exceptions import NoScriptError, RedisError  # noqa: PLC0415
    except ImportError:
        raise ConfigError("--redis needs the redis package: pip install 'soakp[redis]'") from None
    options: dict[str, Any] = {
        "socket_timeout": STORE_TIMEOUT_S,
        "decode_responses": True,
        "socket_connect_timeout": STORE_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.redis_url.startswith("rediss:"):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(config.redis_url).query)
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if "ssl_ca_certs" not in query:
            import certifi  # noqa: PLC0415 - its CA list only when no other is named (issue #17)

            options["ssl_ca_certs"] = certifi.where()
    try:
        single = aioredis.Redis.from_url(config.redis_url, **options)
    except ValueError as exc:
        raise ConfigError(f"--redis: {exc}") from None
    client: Any = single
    cluster = False
    try:
        info = await asyncio.wait_for(single.info("cluster"), STORE_TIMEOUT_S * 10)
        cluster = bool(info.get("cluster_enabled"))
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning(
            "Redis is not reachable at start (%s): starting with the fallbacks", store_error(exc)
        )
    if cluster:
        client = RedisCluster.from_url(config.redis_url, **options, cluster_error_retry_attempts=0)
    pool = single.connection_pool
    # The store's own connections: the client's settings, but the store times each script whole.
    settings = {**pool.connection_kwargs, "socket_timeout": None}
    store = SharedStore(
        client,
        single,
        (RedisError,),
        NoScriptError,
        config.redis_stale_after_s,
        None if cluster else functools.partial(pool.connection_class, **settings),
    )
    where = urllib.parse.urlsplit(config.redis_url)
    log.info(
        "sharing state through Redis%s at %s://%s%s",
        " Cluster" if cluster else "",
        where.scheme,
        where.hostname or "",
        where.path if where.scheme == "unix" else f":{where.port or 6379}",
    )
    return store


# 4. HTTP parsing: bytes in, RequestHead and ResponseHead out. No sockets, no awaits.
#
# RFC 9110/9112 grammar, enforced strictly because a proxy that reads a request differently from the
# server behind it can be used to smuggle requests (CL.TE, TE.CL, obs-fold, bare LF).

MAX_HEAD_BYTES = 64 * 1024  # the whole request head; over it 431 (nginx's large buffers: 4 x 8 KiB)
MAX_REQUEST_LINE_BYTES = 16 * 1024  # over it 414
MAX_HEADER_COUNT = 200
MAX_CHUNK_LINE_BYTES = 4 * 1024
MAX_CONTENT_LENGTH_DIGITS = 18
# token = 1*tchar (RFC 9110 §5.6.2)
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# `field-name ":" field-value`, the value with its OWS (stripped after the match); a value holds
# VCHAR, SP, HTAB and obs-text, never CTLs (RFC 9110 §5.5). One character class repeated up to the
# end: a failing byte makes it give back the run it took, once: linear time. The pattern it
# replaces nested optional runs of overlapping classes and backtracked quadratically on a value of
# spaces followed by a control byte (issue 11: one 60 KB header held the event loop for 19.5 s).
FIELD_LINE_RE = re.compile(rb"(" + TOKEN + rb"):([\t \x20-\x7e\x80-\xff]*)\Z")
REQUEST_LINE_RE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])\Z")
STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([\t \x21-\x7e\x80-\xff]*))?\Z")
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ]
# )
CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*"
    + TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + TOKEN
    + rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*)\Z'
)
HOST_RE = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")
CONSOLE_PATH = (
    "/admin/"  # SPEC.md names the console with its slash: the one path that may end in one
)
BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})|%2[fFeE]|%5[cC]|%00")
# RFC 9110 §7.6.1: these describe one connection and never cross a proxy (nor does any Proxy-*
# header).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

BodyKind = Literal["none", "length", "chunked", "close"]

LOG_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
MAX_LOGGED_PATH_CHARS = 200


def safe_for_log(text: str) -> str:
    """Escape control characters so client input cannot forge log lines."""
    return text[:MAX_LOGGED_PATH_CHARS].translate(LOG_ESCAPES)


# Headers SOAKP looks at, gathered while parsing so that no one scans the list again.
INDEXED_HEADERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"expect",
        b"authorization",
        b"origin",
        b"content-type",
        b"content-encoding",
        b"x-request-id",
        b"upgrade",
        b"access-control-request-method",
        b"access-control-request-headers",
    }
)


def first_value(
    index: Mapping[bytes, list[bytes]], headers: Sequence[tuple[bytes, bytes]], lower_name: bytes
) -> bytes | None:
    """The first value of a header by lower-case name: from the index for INDEXED_HEADERS (the hot
    path), by a scan for any other name; None when absent. Requests and answers look up alike."""
    if lower_name in INDEXED_HEADERS:
        values = index.get(lower_name)
        return values[0] if values else None
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed, checked request head. `path` is canonical; it and `query` are what
    gets forwarded."""

    method: str
    path: str
    query: str  # "" or "?..." exactly as received
    http_minor: int
    headers: tuple[tuple[bytes, bytes], ...]  # (name as received, value without OWS)
    body_kind: BodyKind
    content_length: int
    keep_alive: bool
    expect_continue: bool
    zero_length_declared: bool = (
        False  # `Content-Length: 0` was sent: forwarded as such (RFC 9110 §8.6)
    )
    index: Mapping[bytes, list[bytes]] = field(
        default_factory=dict
    )  # INDEXED_HEADERS' values by name

    def header(self, lower_name: bytes) -> bytes | None:
        """The first value of a header, by lower-case name (see first_value)."""
        return first_value(self.index, self.headers, lower_name)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed upstream response head."""

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body_kind: BodyKind
    content_length: int
    keep_alive: bool
    index: Mapping[bytes, list[bytes]] = field(
        default_factory=dict
    )  # INDEXED_HEADERS' values by name

    def header(self, lower_name: bytes) -> bytes | None:
        """The first value of a header, by lower-case name (see first_value)."""
        return first_value(self.index, self.headers, lower_name)


def bad_request(message: str, status: int = 400, param: str | None = None) -> ApiError:
    return ApiError(status, message, "invalid_request", param=param)


def split_field_line(line: bytes) -> tuple[bytes, bytes] | None:
    """Split `field-name ":" OWS field-value OWS` into (name, value without OWS); None when
    malformed (see FIELD_LINE_RE)."""
    match = FIELD_LINE_RE.match(line)
    return None if match is None else (match[1], match[2].strip(b" \t"))


def split_header_lines(
    lines: Sequence[bytes],
) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    """Parse field lines into (name, value) pairs plus the INDEXED_HEADERS ones by lower-case name.

    Raises ApiError(400) for obs-fold, bare CR/LF, control bytes or a malformed name.
    """
    if len(lines) > MAX_HEADER_COUNT:
        raise bad_request("Too many header fields.", 431)
    headers: list[tuple[bytes, bytes]] = []
    framing: dict[bytes, list[bytes]] = {}
    match_field_line = FIELD_LINE_RE.match  # split_field_line, inlined: it runs for every header
    for line in lines:
        field_line = match_field_line(line)
        if field_line is None:
            # Covers obs-fold (a line starting with SP/HTAB, RFC 9112 §5.2), whitespace before the
            # colon (§5.1), bare CR or LF and NUL or other control bytes.
            raise bad_request("Malformed header field.")
        name, value = field_line[1], field_line[2].strip(b" \t")
        lower = name.lower()
        if lower in INDEXED_HEADERS:
            framing.setdefault(lower, []).append(value)
        headers.append((name, value))
    return headers, framing


def connection_tokens(framing: Mapping[bytes, list[bytes]]) -> set[bytes]:
    return {
        t.strip().lower()
        for v in framing.get(b"connection", ())
        for t in v.split(b",")
        if t.strip()
    }


def parse_framing(framing: Mapping[bytes, list[bytes]], http_minor: int) -> tuple[BodyKind, int]:
    """Decide how a message body is delimited (RFC 9112 §6.3), refusing every ambiguous form.

    Raises ApiError(400).
    """
    lengths = framing.get(b"content-length", [])
    encodings = framing.get(b"transfer-encoding", [])
    if lengths and encodings:
        raise bad_request("Content-Length and Transfer-Encoding together are not allowed.")
    if encodings:
        # Only a lone, exact "chunked": anything else ("chunked, identity", "xchunked", a second
        # header) could be read differently by the next hop.
        if len(encodings) != 1 or encodings[0].lower() != b"chunked" or http_minor == 0:
            raise bad_request("Unsupported Transfer-Encoding.")
        return "chunked", 0
    if lengths:
        if (
            len(lengths) != 1
            or not lengths[0].isdigit()
            or len(lengths[0]) > MAX_CONTENT_LENGTH_DIGITS
        ):
            raise bad_request("Invalid Content-Length.")
        length = int(lengths[0])
        return ("length", length) if length else ("none", 0)
    return "none", 0


def check_canonical_path(path: str) -> None:
    """Refuse any path another server might resolve differently from how SOAKP routes it.

    No `.`, `..` or empty segments, no backslash, no percent-encoded `/`, `\\`, `.` or NUL, no
    malformed percent escape. Raises ApiError(400).
    """
    if not path.startswith("/") or "\\" in path or BAD_PERCENT_RE.search(path):
        raise bad_request("The request path is not canonical.")
    if path not in ("/", CONSOLE_PATH):
        for segment in path[1:].split("/"):
            if segment in ("", ".", ".."):
                raise bad_request("The request path is not canonical.")


def parse_target(target: bytes) -> tuple[str, str]:
    """Split an origin-form or absolute-form target into (canonical path, query).

    For absolute-form the authority is ignored: it never decides where SOAKP connects.
    Raises ApiError(400).
    """
    text = target.decode("ascii")
    if "#" in text:
        raise bad_request("A request target must not carry a fragment.")
    if not text.startswith("/"):
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise bad_request("Unsupported request target.")
        slash = rest.find("/")
        question = rest.find("?")
        if question != -1 and (slash == -1 or question < slash):
            text = "/" + rest[question:]
        else:
            text = rest[slash:] if slash != -1 else "/"
    path, sep, query = text.partition("?")
    check_canonical_path(path)
    return path, sep + query


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head: the request line and header fields, ending with an empty line.

    Returns the checked RequestHead. Raises ApiError with 400, 405, 414 or 431.
    """
    lines = data.split(b"\r\n")
    while lines and lines[0] == b"":  # RFC 9112 §2.2: ignore empty lines before the request line
        lines.pop(0)
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise bad_request("Empty request.")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE_BYTES:
        raise bad_request("The request line is too long.", 414)
    match = REQUEST_LINE_RE.match(request_line)
    if match is None:
        raise bad_request("Malformed request line.")
    method = match[1].decode("ascii")
    http_minor = int(match[3])
    if method == "CONNECT":
        raise ApiError(
            405,
            "CONNECT is not supported: SOAKP only forwards to its upstream.",
            "method_not_allowed",
        )
    headers, framing = split_header_lines(lines[1:])
    for name, _ in headers:
        # A server that folds "_" into "-" (some do, from CGI days) would read a second framing
        # header.
        if b"_" in name and name.lower().replace(b"_", b"-") in (
            b"content-length",
            b"transfer-encoding",
        ):
            raise bad_request(
                "Header names that look like Content-Length or Transfer-Encoding are refused."
            )
    body_kind, content_length = parse_framing(framing, http_minor)
    hosts = framing.get(b"host", [])
    if len(hosts) > 1 or (http_minor == 1 and not hosts) or (hosts and not HOST_RE.match(hosts[0])):
        raise bad_request("A request needs exactly one valid Host header.")  # RFC 9112 §3.2
    path, query = parse_target(match[2])
    tokens = connection_tokens(framing)
    keep_alive = b"close" not in tokens if http_minor == 1 else b"keep-alive" in tokens
    expect = framing.get(b"expect", [])
    return RequestHead(
        method=method,
        path=path,
        query=query,
        http_minor=http_minor,
        headers=tuple(headers),
        body_kind=body_kind,
        content_length=content_length,
        keep_alive=keep_alive,
        expect_continue=any(v.lower() == b"100-continue" for v in expect),
        zero_length_declared=body_kind == "none" and b"content-length" in framing,
        index=framing,
    )


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not HTTP/1.1 as SOAKP can relay it."""


def parse_response_head(data: bytes, request_method: str) -> ResponseHead:
    """Parse an upstream response head. Raises UpstreamProtocolError."""
    lines = data.split(b"\r\n")
    while lines and lines[-1] == b"":
        lines.pop()
    match = STATUS_LINE_RE.match(lines[0]) if lines else None
    if match is None:
        raise UpstreamProtocolError("malformed status line")
    status, http_minor = int(match[2]), int(match[1])
    try:
        headers, framing = split_header_lines(lines[1:])
    except ApiError:
        raise UpstreamProtocolError("malformed response header") from None
    keep_alive = b"close" not in connection_tokens(framing) if http_minor == 1 else False
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return ResponseHead(status, match[3] or b"", tuple(headers), "none", 0, keep_alive, framing)
    encodings = framing.get(b"transfer-encoding", [])
    lengths = framing.get(b"content-length", [])
    if encodings:
        if encodings[-1].split(b",")[-1].strip().lower() != b"chunked":
            return ResponseHead(status, match[3] or b"", tuple(headers), "close", 0, False, framing)
        # RFC 9112 §6.3: with both, Transfer-Encoding wins, and the connection must not be reused.
        return ResponseHead(
            status,
            match[3] or b"",
            tuple(headers),
            "chunked",
            0,
            keep_alive and not lengths,
            framing,
        )
    if lengths:
        values = {v.strip() for line in lengths for v in line.split(b",")}
        if (
            len(values) != 1
            or not next(iter(values)).isdigit()
            or len(next(iter(values))) > MAX_CONTENT_LENGTH_DIGITS
        ):
            raise UpstreamProtocolError("invalid Content-Length")
        length = int(values.pop())
        return ResponseHead(
            status, match[3] or b"", tuple(headers), "length", length, keep_alive, framing
        )
    return ResponseHead(status, match[3] or b"", tuple(headers), "close", 0, False, framing)


def parse_chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (CRLF already stripped); extensions are checked and ignored.

    Raises ValueError.
    """
    match = CHUNK_LINE_RE.match(line)
    if match is None:
        raise ValueError("malformed chunk size line")
    return int(match[1], 16)


def forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], also_drop: frozenset[bytes]
) -> list[bytes]:
    """Header lines to pass on: hop-by-hop ones, those the Connection header names and `also_drop`
    removed."""
    named: set[bytes] = set()
    for name, value in headers:
        # The length first: it spares a lower() of nearly every name (this runs on every request).
        if len(name) == 10 and name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    out = []
    for name, value in headers:
        lower = name.lower()
        if (
            lower in HOP_BY_HOP
            or lower in also_drop
            or lower in named
            or lower.startswith(b"proxy-")
        ):
            continue
        out.append(name + b": " + value + b"\r\n")
    return out


# 5. Bodies and answers: bytes and heads in, decisions out. No sockets, no awaits.
#
# What a request body may hold for a limited token (JSON and multipart read with certainty,
# budgets), the chunked coding both ways, the heads sent upstream and back, and the usage read from
# answers. The forwarding section below only moves the bytes these decide about.

MODEL_IN_BODY_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')  # for the access log only
MODEL_SCAN_LIMIT_BYTES = (
    32 * 1024**2
)  # what a models-limited token may have read ahead before forwarding
MAX_MODEL_VALUE_BYTES = 1024
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_PARAMETERS = 16  # parameters of one Content-Type or Content-Disposition; more is refused
MAX_BOUNDARY_CHARS = 70  # RFC 2046 §5.1.1


# RFC 2046 §5.1.1 bcharsnospace; a quoted boundary may also hold spaces, but may not end with one.
BCHARS_NO_SPACE = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=?"


# An unquoted parameter value is a token (RFC 2045 §5.1): of the bchars only these are token
# characters.
TOKEN_BCHARS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'+_-."


# qdtext (RFC 9110 §5.6.4) without the backslash: parsers unescape a quoted-pair differently (one
# reads `filename="a\"; name="model"` as one parameter, another as two), so it is refused; and
# without ";", since a parser that splits parameters on ";" first would read `x="; boundary=b"` as a
# boundary.
QDTEXT_BYTES = bytes(
    [
        0x09,
        0x20,
        0x21,
        *range(0x23, 0x3B),
        *range(0x3C, 0x5C),
        *range(0x5D, 0x7F),
        *range(0x80, 0x100),
    ]
)


# Paths whose JSON body carries a Realtime session: the models limit applies to `session.model` too.
SESSION_MODEL_PATHS = frozenset(
    {
        "/v1/realtime/client_secrets",
        "/v1/realtime/sessions",
        "/v1/realtime/transcription_sessions",
    }
)
JSON_OFF_LOOP_BYTES = 1024**2  # bigger JSON bodies are checked in a thread (JsonWalk)


def media_type(content_type: bytes | None) -> bytes:
    return (content_type or b"").split(b";", 1)[0].strip().lower()


JSON_CHUNK_CHARS = 16 * 1024  # what one C call of the JSON check reads at most (~2 ms)
JSON_MAX_WALK_DEPTH = 100  # deeper containers are checked by one json scanner call
JSON_WS_RE = re.compile(r"[ \t\n\r]*")  # json.decoder's WHITESPACE


# A run of string characters that need no look (RFC 8259 §7: no quote, no backslash, no control).
JSON_STRING_RUN_RE = re.compile(r'[^"\\\x00-\x1f]*')
JSON_ESCAPE_RE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9A-Fa-f]{4})')


class JsonPairs(list[tuple[str, Any]]):
    """The (key, value) pairs JsonWalk kept of an object (told apart from a JSON array)."""


class JsonWalk:
    """Checks a JSON text with the same rules as `json.loads(text, object_pairs_hook=...)` (Python's
    decoder: NaN allowed, lone surrogates allowed), keeping only the top-level pairs whose key
    case-folds to one of `keys` (and, for "session", its own pairs), so no single step holds the GIL
    for long.

    Containers and strings bigger than JSON_CHUNK_CHARS are walked here, a piece at a time;
    everything smaller goes to json's C scanner in one call. Run in a thread (asyncio.to_thread),
    this keeps the event loop answering while a 30 MiB body is checked. Raises ValueError for
    invalid JSON or a repeated "model" key in any object.
    """

    def __init__(
        self, text: str, hook: Callable[[list[tuple[str, Any]]], Any], chunk: int = JSON_CHUNK_CHARS
    ) -> None:
        self.text = text
        self.chunk = chunk
        decoder = json.JSONDecoder(object_pairs_hook=hook)
        self.scan_once = json.scanner.make_scanner(decoder)  # type: ignore[attr-defined]

    def ws(self, idx: int) -> int:
        return JSON_WS_RE.match(self.text, idx).end()  # type: ignore[union-attr]

    def value(self, idx: int, depth: int) -> int:
        """Check the value at idx; returns where it ends."""
        char = self.text[idx : idx + 1]
        if (
            len(self.text) - idx <= self.chunk
            or (char in "[{" and depth >= JSON_MAX_WALK_DEPTH)
            or char not in '[{"'
        ):
            try:
                return self.scan_once(self.text, idx)[1]
            except StopIteration:
                raise ValueError("expecting a value") from None
        if char == '"':
            return self.string(idx)
        if char == "[":
            idx = self.ws(idx + 1)
            if self.text[idx : idx + 1] == "]":
                return idx + 1
            walk_to = idx
            while True:
                if idx >= walk_to:
                    idx, walk_to = self.elements(idx)
                idx = self.ws(self.value(idx, depth + 1))
                char, idx = self.text[idx : idx + 1], idx + 1
                if char == "]":
                    return idx
                if char != ",":
                    raise ValueError("expecting ',' delimiter")
                idx = self.ws(idx)
        return self.object(idx, depth, ())[1]

    def elements(self, idx: int) -> tuple[int, int]:
        """Check array elements from idx a batch at a time: the text up to one of the next few
        commas after `chunk` characters, parsed as an array of its own, in one C call. That comma is
        one between elements of this array exactly when the batch parses (a comma inside a string or
        a nested value leaves the batch unbalanced). Returns where the next element starts and, when
        no batch parsed, the position to walk element by element to before trying again (linear
        time).
        """
        comma = idx + self.chunk
        for _ in range(3):
            comma = self.text.find(",", comma)
            if comma == -1:
                break
            batch = "[" + self.text[idx:comma] + "]"
            try:
                if self.scan_once(batch, 0)[1] == len(batch):
                    return self.ws(comma + 1), comma + 1
            except (StopIteration, ValueError, RecursionError):
                pass
            comma += 1
        return idx, comma if comma != -1 else len(self.text)

    def string(self, idx: int) -> int:
        """Check the string starting at idx (its quote); returns where it ends."""
        idx += 1
        while True:
            run = JSON_STRING_RUN_RE.match(self.text, idx, idx + self.chunk)
            idx = run.end()  # type: ignore[union-attr]
            char = self.text[idx : idx + 1]
            if char == '"':
                return idx + 1
            if char == "\\":
                escape = JSON_ESCAPE_RE.match(self.text, idx)
                if escape is None:
                    raise ValueError("invalid escape")
                idx = escape.end()
            elif not char or char < " ":
                raise ValueError("unterminated string or control character")

    def object(self, idx: int, depth: int, keys: Sequence[str]) -> tuple[JsonPairs, int]:
        """Check the object at idx; returns its pairs whose key case-folds into `keys`, and its
        end."""
        kept = JsonPairs()
        models = 0
        idx = self.ws(idx + 1)
        if self.text[idx : idx + 1] == "}":
            return kept, idx + 1
        while True:
            if self.text[idx : idx + 1] != '"':
                raise ValueError("expecting a property name in double quotes")
            key, idx = json.decoder.scanstring(self.text, idx + 1)  # type: ignore[attr-defined]
            models += key == "model"
            idx = self.ws(idx)
            if self.text[idx : idx + 1] != ":":
                raise ValueError("expecting ':' delimiter")
            start = self.ws(idx + 1)
            folded = key.casefold()
            if folded == "session" and "session" in keys and self.text[start : start + 1] == "{":
                pairs, idx = self.object(start, depth + 1, ("model",))
                kept.append((key, pairs))
            else:
                idx = self.value(start, depth + 1)
                if folded in keys:
                    small = idx - start <= max(self.chunk, MAX_MODEL_VALUE_BYTES)
                    # a value too long to be a model name is kept as "", which no token allows
                    kept.append((key, self.scan_once(self.text, start)[0] if small else ""))
            idx = self.ws(idx)
            char, idx = self.text[idx : idx + 1], idx + 1
            if char == "}":
                break
            if char != ",":
                raise ValueError("expecting ',' delimiter")
            idx = self.ws(idx)
        if models > 1:
            raise ValueError("repeated model")
        return kept, idx


def json_models(
    body: bytes, nested_session: bool = False, chunk: int = JSON_CHUNK_CHARS
) -> list[str]:
    """Every `model` a JSON body names: the top-level one and, with nested_session, `session.model`.

    Returns them in that order ([] for none), "" for a model that is not a string (never an allowed
    value). Raises ApiError(400) for a body that is not JSON (as json.loads reads it), names "model"
    twice in one object or "session" twice, or has a key equal to one of them in another case
    (`MODEL`): parsers disagree on which one counts, and an upstream might read either. Safe to run
    in a thread on a large body: see JsonWalk (`chunk` is its step).
    """

    def no_repeated_model(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if sum(1 for k, _ in pairs if k == "model") > 1:
            raise ValueError("repeated model")
        return dict(pairs)

    keys = ("model", "session") if nested_session else ("model",)
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        walk = JsonWalk(text, no_repeated_model, chunk)
        start = walk.ws(0)
        if text[start : start + 1] == "{":
            pairs, end = walk.object(start, 0, keys)
        else:
            pairs, end = JsonPairs(), walk.value(start, 0)
        if text.startswith("\ufeff") or walk.ws(end) != len(text):
            raise ValueError("extra data")
    except (ValueError, RecursionError):
        raise bad_request("The body is not valid JSON, or names 'model' more than once.") from None
    found: list[str] = []
    sessions = [value for key, value in pairs if key == "session" and isinstance(value, JsonPairs)]
    for scope in (pairs, *sessions):
        names = [key for key, _ in scope]
        for key in names:
            if key.casefold() in keys and key != key.casefold():
                raise bad_request(
                    f"The body names {key!r}: write the key {key.casefold()!r} in lower case.",
                    param=key.casefold(),
                )
        if names.count("session") > 1:
            raise bad_request("The body names 'session' more than once.", param="session")
        found += [value if isinstance(value, str) else "" for key, value in scope if key == "model"]
    return found


@dataclass(frozen=True, slots=True)
class JsonFields:
    """Some top-level fields of a JSON object, with where each value stands, so that they can be
    changed in place and every other byte kept (JsonFields.splice)."""

    text: str
    encoding: str
    brace: int  # where the object's `{` stands
    values: dict[str, Any]
    spans: dict[str, tuple[int, int]]

    def splice(self, changes: Mapping[str, Any]) -> bytes:
        """The body with each changed field's value replaced, and new fields put first."""
        text, added = self.text, []
        for key, (start, end) in sorted(
            ((k, self.spans[k]) for k in changes if k in self.spans),
            key=lambda item: item[1],
            reverse=True,
        ):
            text = text[:start] + json.dumps(changes[key], separators=(",", ":")) + text[end:]
        for key, value in changes.items():
            if key not in self.spans:
                added.append(json.dumps(key) + ":" + json.dumps(value, separators=(",", ":")) + ",")
        if added:
            closed = text[self.brace + 1 :].lstrip(" \t\n\r").startswith("}")
            inserted = "".join(added)[:-1] + ("" if closed else ",")
            text = text[: self.brace + 1] + inserted + text[self.brace + 1 :]
        return text.encode("utf-8", "surrogatepass")


def json_fields(body: bytes, keys: Collection[str], chunk: int = JSON_CHUNK_CHARS) -> JsonFields:
    """The top-level fields named in `keys` of a JSON object body, read as json.loads reads it, a
    step at a time (see JsonWalk: safe in a thread on a large body).

    Raises ApiError(400) for a body that is not a JSON object, or that names one of `keys` twice
    (parsers disagree on which one counts).
    """
    try:
        encoding = json.detect_encoding(body)
        text = body.decode(encoding, "surrogatepass")
        walk = JsonWalk(text, dict, chunk)
        brace = walk.ws(0)
        if text[brace : brace + 1] != "{" or text.startswith("\ufeff"):
            raise ValueError("not an object")
        values: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        idx = walk.ws(brace + 1)
        while text[idx : idx + 1] != "}":
            if text[idx : idx + 1] != '"':
                raise ValueError("expecting a property name")
            key, idx = json.decoder.scanstring(text, idx + 1)  # type: ignore[attr-defined]
            idx = walk.ws(idx)
            if text[idx : idx + 1] != ":":
                raise ValueError("expecting ':'")
            start = walk.ws(idx + 1)
            end = walk.value(start, 1)
            if key in keys:
                if key in spans:
                    raise bad_request(f"The body names {key!r} more than once.", param=key)
                if end - start > chunk:
                    raise bad_request(
                        f"The body's {key!r} is too large to be what it names.", param=key
                    )
                values[key] = walk.scan_once(text, start)[0]
                spans[key] = (start, end)
            idx = walk.ws(end)
            if text[idx : idx + 1] == ",":
                idx = walk.ws(idx + 1)
                if text[idx : idx + 1] == "}":
                    raise ValueError("trailing comma")
            elif text[idx : idx + 1] != "}":
                raise ValueError("expecting ',' or '}'")
        if walk.ws(idx + 1) != len(text):
            raise ValueError("extra data")
    except (ValueError, RecursionError):
        raise bad_request("The body must be a JSON object.") from None
    return JsonFields(text, encoding, brace, values, spans)


def json_model(body: bytes) -> str | None:
    """The top-level `model` of a JSON body, None when it has none.

    Raises ApiError(400) as json_models.
    """
    found = json_models(body)
    return found[0] if found else None


def multipart_refused(rule: str) -> ApiError:
    """The 400 for a multipart body a models-limited token may not send, naming the broken rule."""
    return ApiError(
        400,
        "A token limited to certain models sends only multipart bodies SOAKP "
        f"reads with certainty (RFC 2046/7578): {rule}.",
        "multipart_not_strict",
    )


def parse_parameters(text: bytes) -> list[tuple[bytes, bytes, bool]] | None:
    """The `*( OWS ";" OWS [ name "=" value ] )` parameters after a media or disposition type (RFC
    9110 §5.6.6), as (lower-case name, value without quotes, whether it was quoted); None when
    malformed.

    A value is a token or a quoted-string without backslashes; at most MAX_PARAMETERS of them, so
    the slicing below stays linear in the input.
    """
    params: list[tuple[bytes, bytes, bool]] = []
    rest = text.lstrip(b" \t")
    while rest:
        if rest[:1] != b";" or len(params) >= MAX_PARAMETERS:
            return None
        rest = rest[1:].lstrip(b" \t")
        if not rest or rest[:1] == b";":
            continue
        name, equals, rest = rest.partition(b"=")
        if not equals or not name or name.translate(None, TCHARS):
            return None
        if rest[:1] == b'"':
            end = rest.find(b'"', 1)
            if end == -1 or rest[1:end].translate(None, QDTEXT_BYTES):
                return None
            value, quoted, rest = rest[1:end], True, rest[end + 1 :]
        else:
            after = rest.lstrip(TCHARS)
            value, quoted, rest = rest[: len(rest) - len(after)], False, after
            if not value:
                return None
        params.append((name.lower(), value, quoted))
        rest = rest.lstrip(b" \t")
    return params


def multipart_boundary(content_type: bytes | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type.

    Raises ApiError(400) unless the parameters are well formed and name exactly one boundary of 1-70
    RFC 2046 characters (a token when unquoted): a boundary one parser cuts at 70 and another reads
    whole lets a shortened "close delimiter" end one parser's reading before the other's.
    """
    media, semicolon, params_text = (content_type or b"").partition(b";")
    if media.strip(b" \t") != b"multipart/form-data":  # Werkzeug reads only this spelling
        raise multipart_refused("the media type must be written multipart/form-data, in lower case")
    params = parse_parameters(semicolon + params_text)
    if params is None:
        raise multipart_refused(
            "the Content-Type parameters must be tokens or plain quoted strings"
        )
    boundaries = [p for p in params if p[0] in (b"boundary", b"boundary*")]
    if len(boundaries) != 1 or boundaries[0][0] != b"boundary":
        raise multipart_refused("the Content-Type must name exactly one boundary")
    _, boundary, quoted = boundaries[0]
    allowed = BCHARS_NO_SPACE + b" " if quoted else TOKEN_BCHARS
    if (
        not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS
        or boundary.translate(None, allowed)
        or boundary.endswith(b" ")
    ):
        raise multipart_refused(
            "the boundary must be 1 to 70 characters of RFC 2046 bchars, not ending with a space"
        )
    return boundary


class MultipartModelScanner:
    """Reads a multipart/form-data body fed piece by piece, strictly (RFC 2046 §5.1.1, RFC 7578),
    and reports the value of every form field named `model`.

    The body must start with the first boundary (no preamble), use CRLF line endings, have no folded
    or malformed part headers, never hold `--boundary` except as a delimiter, and end with the close
    delimiter (optionally followed by one CRLF); `finish()` checks that last part. Anything else is
    an ApiError(400) naming the rule: SOAKP forwards only bodies that every parser reads as it does.
    Keeps only what it still needs (a delimiter's length, or one part's headers or model value), so
    a large file part streams past it.
    """

    def __init__(self, boundary: bytes) -> None:
        self.dash_boundary = b"--" + boundary
        self.pending = b""
        self.state: Literal["start", "headers", "body", "epilogue"] = "start"
        self.in_model = False
        self.value: list[bytes] = []
        self.value_bytes = 0
        self.model_fields = 0  # how many `model` parts were seen so far; more than one is refused

    def feed(self, data: bytes) -> list[str]:
        """Returns the model values completed by this piece ("" for one that is too long).

        Raises ApiError(400).
        """
        self.pending += data
        found: list[str] = []
        dash = self.dash_boundary
        while True:
            if self.state == "start":
                if self.pending[: len(dash)] != dash[: len(self.pending)]:
                    raise multipart_refused(
                        "the body must begin with the boundary, without a preamble"
                    )
                if len(self.pending) < len(dash) + 2:
                    break
                self.after_boundary(len(dash))
            elif self.state == "headers":
                if self.pending[:2] == b"\r\n":
                    raise multipart_refused(
                        "each part needs exactly one Content-Disposition header"
                    )
                end = self.pending.find(b"\r\n\r\n")
                bare = (self.pending[:end] if end != -1 else self.pending).replace(b"\r\n", b"")
                if end == -1 and bare.endswith(b"\r") and self.pending.endswith(b"\r"):
                    bare = bare[:-1]  # a CR whose LF is still on the way
                if b"\r" in bare or b"\n" in bare:
                    raise multipart_refused("part headers must use CRLF line endings")
                if end == -1 or end > MAX_PART_HEADER_BYTES:
                    if len(self.pending) > MAX_PART_HEADER_BYTES + 4:
                        raise multipart_refused(
                            "part headers must end with a blank line (CRLF "
                            f"CRLF) within {MAX_PART_HEADER_BYTES} bytes"
                        )
                    break
                self.start_part(self.pending[:end])
                self.pending = self.pending[end + 4 :]
                self.state = "body"
            elif self.state == "body":
                at = self.pending.find(dash)
                if at == -1:
                    keep = len(dash) + 3  # a delimiter cut by the network, with its CRLF in front
                    if len(self.pending) > keep:
                        self.take_value(self.pending[:-keep])
                        self.pending = self.pending[-keep:]
                    break
                if len(self.pending) < at + len(dash) + 2:
                    break
                if at < 2 or self.pending[at - 2 : at] != b"\r\n":
                    raise multipart_refused(
                        "the boundary may appear only as a delimiter, after a CRLF"
                    )
                self.take_value(self.pending[: at - 2])
                if self.in_model:
                    value = b"".join(self.value)
                    short = len(value) <= MAX_MODEL_VALUE_BYTES
                    found.append(value.decode("utf-8", "replace") if short else "")
                self.after_boundary(at + len(dash))
            else:  # epilogue: only one CRLF may follow the close delimiter
                if not b"\r\n".startswith(self.pending):
                    raise multipart_refused("nothing but a CRLF may follow the close delimiter")
                break
        return found

    def after_boundary(self, end: int) -> None:
        """Move past `--boundary` ending at `end`: CRLF starts a part, `--` closes the body."""
        follows = self.pending[end : end + 2]
        if follows == b"--":
            self.state = "epilogue"
        elif follows == b"\r\n":
            self.state = "headers"
        else:
            raise multipart_refused("a boundary must be followed by CRLF or by '--' (no padding)")
        self.pending = self.pending[end + 2 :]

    def take_value(self, data: bytes) -> None:
        if self.in_model and self.value_bytes <= MAX_MODEL_VALUE_BYTES:
            self.value.append(data)
            self.value_bytes += len(data)

    def start_part(self, block: bytes) -> None:
        name = part_name(block)
        self.in_model = name == b"model"
        self.value, self.value_bytes = [], 0
        if self.in_model:
            self.model_fields += 1

    def finish(self) -> None:
        """Call at the end of the body.

        Raises ApiError(400) when it did not end with a close delimiter.
        """
        if self.state != "epilogue":
            raise multipart_refused(
                "the body must end with a close delimiter ('--' after the boundary)"
            )


def part_name(block: bytes) -> bytes:
    """The form field name of a part, from its header lines (CRLF-separated, without the blank
    line).

    A part needs exactly one `Content-Disposition: form-data` with exactly one plain `name`. Raises
    ApiError(400) for anything form parsers could read differently: bare CR or LF, a folded or
    malformed line, two dispositions or names, RFC 2231 `name*`, a name that is "model" only once
    percent-decoded or case-folded, and a `model` part with a filename, a Content-Transfer-Encoding
    (python-multipart decodes base64) or a Content-Type other than text/plain in UTF-8. What SOAKP
    checks must be what the upstream reads.
    """
    try:
        block.decode("utf-8")  # RFC 7578 §5.1: names in UTF-8; Werkzeug fails on anything else
    except UnicodeDecodeError:
        raise multipart_refused("part headers must be UTF-8") from None
    dispositions: list[bytes] = []
    other: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            raise multipart_refused("part headers must use CRLF line endings")
        if line[:1] in (b" ", b"\t"):
            raise multipart_refused("part headers must not be folded")
        field_line = split_field_line(line)
        if field_line is None:
            raise multipart_refused("a part header is malformed")
        lower = field_line[0].lower()
        if lower == b"content-disposition":
            dispositions.append(field_line[1])
        else:
            other.append((lower, field_line[1]))
    if len(dispositions) != 1:
        raise multipart_refused("each part needs exactly one Content-Disposition header")
    kind, semicolon, params_text = dispositions[0].partition(b";")
    params = parse_parameters(semicolon + params_text)
    if kind.strip().lower() != b"form-data" or params is None:
        raise multipart_refused("a Content-Disposition must be form-data with plain parameters")
    names = [p for p in params if p[0] in (b"name", b"name*")]
    if len(names) != 1 or names[0][0] != b"name":
        raise multipart_refused("a part must name its field exactly once, without name*")
    name = names[0][1]
    if name != b"model" and urllib.parse.unquote_to_bytes(name).lower() == b"model":
        raise multipart_refused("the field name 'model' must be written in lower case, unencoded")
    if name == b"model":
        if any(p[0] in (b"filename", b"filename*") for p in params):
            raise multipart_refused("the model field must not carry a filename")
        for key, value in other:
            if key == b"content-transfer-encoding" or (
                key == b"content-type" and not plain_text(value)
            ):
                raise multipart_refused(
                    "the model field may only be text/plain in UTF-8, not encoded"
                )
    return name


def plain_text(content_type: bytes) -> bool:
    """Whether a part's Content-Type is text/plain, with no parameter but a UTF-8 or ASCII
    charset."""
    kind, semicolon, params_text = content_type.partition(b";")
    params = parse_parameters(semicolon + params_text)
    return (
        kind.strip().lower() == b"text/plain"
        and params is not None
        and all(
            key == b"charset" and value.lower() in (b"utf-8", b"us-ascii")
            for key, value, _ in params
        )
    )


class FramingError(ValueError):
    """A body's framing is broken or over a limit. Neutral: the side that reads the body says what
    it means (a request's: an answer with `status`; an upstream's: a 502)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ChunkedDecoder:
    """Decodes the chunked transfer coding (RFC 9112 §7.1) from pieces as they arrive: request
    bodies and upstream answers alike.

    Data is handed on as soon as it is read, never held for a whole chunk, and a network read that
    holds several chunks (SSE events) decodes in one call instead of three awaits per chunk. Trailer
    fields are dropped (hop-by-hop here); with `check_trailers` (a client's request) each must still
    be a valid field line. `max_body_bytes` bounds the payload (a 413). Bytes after the end are kept
    in `leftover`: the connection is then not reusable. A reader that must not read past the body (a
    client's next pipelined request) asks `next_read()` how much to read. Raises FramingError.
    """

    def __init__(self, max_body_bytes: int | None = None, check_trailers: bool = False) -> None:
        self.buffer = b""
        self.remaining = 0
        self.state: Literal["size", "data", "data_end", "trailer", "done"] = "size"
        self.trailer_bytes = 0
        self.total = 0
        self.max_body_bytes = max_body_bytes
        self.check_trailers = check_trailers
        self.leftover = b""
        self.decoded: list[bytes] = []  # what the current feed has decoded so far
        self.error: FramingError | None = None  # broken framing, raised on the next feed

    @property
    def done(self) -> bool:
        return self.state == "done"

    def next_read(self) -> int:
        """How many bytes may be read next without passing the end of the body: 0 for a line (read
        up to and with its CRLF)."""
        if self.state == "data":
            return self.remaining
        if self.state == "data_end":
            return 2 - len(self.buffer)
        return 0

    def feed(self, data: bytes) -> bytes:
        """Returns the payload bytes that `data` completes (possibly b"").

        Broken framing raises FramingError, but only once the payload before it has been handed on:
        a stream that breaks after good events still delivers them.
        """
        if self.error is not None:
            raise self.error
        try:
            return self.decode(data)
        except FramingError as exc:
            if not self.decoded:
                raise
            self.error = exc
            return b"".join(self.decoded)

    def decode(self, data: bytes) -> bytes:
        buf = self.buffer + data if self.buffer else data
        out: list[bytes] = []
        self.decoded = out
        pos, end = 0, len(buf)
        while pos < end and self.state != "done":
            if self.state == "data":
                take = min(self.remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = "data_end"
            elif self.state == "data_end":
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise FramingError("Chunk data is not followed by CRLF.")
                pos += 2
                self.state = "size"
            else:
                eol = buf.find(b"\r\n", pos)
                if eol == -1:
                    if end - pos > MAX_CHUNK_LINE_BYTES:
                        raise FramingError("Chunk size line too long.")
                    break
                line, pos = buf[pos:eol], eol + 2
                if self.state == "size":
                    self.start_chunk(line)
                elif line:
                    self.trailer_field(line)
                else:
                    self.state = "done"
        if self.state == "done":
            self.buffer, self.leftover = b"", buf[pos:]
        else:
            self.buffer = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def start_chunk(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE_BYTES:
            raise FramingError("Chunk size line too long.")
        try:
            size = parse_chunk_size(line)
        except ValueError:
            raise FramingError("Malformed chunk size line.") from None
        self.total += size
        if self.max_body_bytes is not None and self.total > self.max_body_bytes:
            raise FramingError(
                f"The request body is over the limit of {self.max_body_bytes} bytes.", 413
            )
        self.state, self.remaining = ("data", size) if size else ("trailer", 0)

    def trailer_field(self, line: bytes) -> None:
        self.trailer_bytes += len(line) + 2
        if self.trailer_bytes > MAX_HEAD_BYTES:
            raise FramingError("Trailer section too large.", 431)
        if self.check_trailers and split_field_line(line) is None:
            raise FramingError("Malformed header field in the trailer section.")


SMALL_BODY_BYTES = (
    64 * 1024
)  # bodies up to this are read whole so a request can be retried on a stale connection
REQUEST_DROP = frozenset({b"host", b"authorization", b"content-length", b"expect"})
ORG_HEADERS = frozenset({b"openai-organization", b"openai-project"})
CORS_RESPONSE_HEADERS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
    }
)
RESPONSE_DROP = frozenset({b"content-length"}) | CORS_RESPONSE_HEADERS


def build_upstream_head(
    head: RequestHead,
    upstream_path: str,
    claims: TokenClaims,
    target: UpstreamTarget,
    body_length: int | None = None,
    extra: bytes = b"",
    also_drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """The request head sent upstream: checked path and query, upstream Host, the real key, framing.

    Everything else the client sent passes unchanged, except hop-by-hop headers, and the org/project
    headers when the token sets them. `body_length` replaces the client's framing for a rewritten
    body; `extra` header lines replace the headers named in `also_drop` (the WebSocket handshake).
    """
    drop = (
        REQUEST_DROP | ORG_HEADERS
        if claims.org is not None or claims.project is not None
        else REQUEST_DROP
    )
    drop |= also_drop
    parts = [
        f"{head.method} {target.base_path}{upstream_path}{head.query} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\nAuthorization: Bearer {claims.key}\r\n".encode("ascii")
    ]
    if claims.org is not None:
        parts.append(b"OpenAI-Organization: " + claims.org.encode("ascii") + b"\r\n")
        if (
            claims.project is None
        ):  # a token that names only an org still lets the client pick a project
            drop = drop - {b"openai-project"}
    if claims.project is not None:
        parts.append(b"OpenAI-Project: " + claims.project.encode("ascii") + b"\r\n")
        if claims.org is None:
            drop = drop - {b"openai-organization"}
    parts.extend(forwarded_headers(head.headers, drop))
    parts.append(extra)
    if body_length is not None:
        parts.append(b"Content-Length: %d\r\n" % body_length)
    elif head.body_kind == "length":
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    elif head.body_kind == "chunked":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.zero_length_declared:
        parts.append(b"Content-Length: 0\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def without_secret(
    headers: Sequence[tuple[bytes, bytes]], secret: bytes
) -> Sequence[tuple[bytes, bytes]]:
    """The headers less any that holds the real key: an upstream that echoes what it was sent must
    not hand the key to the client."""
    if not secret or not any(secret in value or secret in name for name, value in headers):
        return headers
    return [(name, value) for name, value in headers if secret not in value and secret not in name]


def build_client_head(
    resp: ResponseHead, plan: AnswerPlan, cors: bytes = b"", secret: bytes = b""
) -> bytes:
    """The response head sent to the client: the upstream's status and headers less hop-by-hop ones
    and any that holds `secret` (the real key), framed as `plan` says.

    `cors` holds SOAKP's own CORS header lines, which replace any the upstream sent.
    """
    parts = [b"HTTP/1.1 %d " % resp.status + resp.reason + b"\r\n"]
    # For a body-less answer (HEAD, 204, 304) the upstream's Content-Length describes the resource:
    # keep it. CORS is SOAKP's policy (--cors-origins), never the upstream's: its own CORS headers
    # are dropped.
    drop = CORS_RESPONSE_HEADERS if resp.body_kind == "none" else RESPONSE_DROP
    parts.extend(forwarded_headers(without_secret(resp.headers, secret), drop))
    parts.append(cors)
    if plan.framing == "length":
        parts.append(b"Content-Length: %d\r\n" % resp.content_length)
    elif plan.framing == "chunked":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if not plan.keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


USAGE_WHOLE_BYTES = (
    1024 * 1024
)  # JSON answers up to this are parsed whole; larger ones from their tail
USAGE_TAIL_BYTES = 64 * 1024
USAGE_MAX_DECODED_BYTES = (
    16 * 1024 * 1024
)  # stop metering a compressed answer that inflates past this


def usage_counts(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object: Chat, Completions, Embeddings or
    Responses."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (prompt, completion)
    ):
        return None
    return cast(int, prompt), cast(int, completion)


def usage_in_document(document: object) -> tuple[int, int] | None:
    """The usage of a response body or SSE event: top-level `usage`, or `response.usage` (Responses
    API)."""
    if not isinstance(document, dict):
        return None
    found = usage_counts(document.get("usage"))
    if found is None and isinstance(document.get("response"), dict):
        found = usage_counts(document["response"].get("usage"))
    return found


USAGE_VALUE_RE = re.compile(rb"\s*:\s*(?=\{)")
JSON_DECODER = json.JSONDecoder()


def last_usage_object(data: bytes) -> tuple[int, int] | None:
    """The counts of the last `"usage": {...}` in a JSON text (OpenAI puts it last), decoding that
    object alone: cheaper than parsing the whole answer, and it works on the tail of a large one."""
    end = len(data)
    for _ in range(4):
        start = data.rfind(b'"usage"', 0, end)
        if start == -1:
            return None
        end = start
        value_at = USAGE_VALUE_RE.match(data, start + 7)
        if (
            start and data[start - 1] == 0x5C or value_at is None
        ):  # inside a string, or not an object
            continue
        try:
            value, _ = JSON_DECODER.raw_decode(data[value_at.end() :].decode("utf-8", "replace"))
        except ValueError:
            continue
        found = usage_counts(value)
        if found is not None:
            return found
    return None


class UsageMeter:
    """Reads OpenAI's own token counts from a response while it is relayed, without holding it back
    or changing a byte: a JSON body's `usage`, or the last SSE event that carries one."""

    def __init__(self, sse: bool, encoding: bytes) -> None:
        self.sse = sse
        self.inflater = (
            zlib.decompressobj(wbits=47 if encoding == b"gzip" else 15) if encoding else None
        )
        self.decoded_bytes = 0
        self.buffer = bytearray()
        self.whole = (
            True  # False once a JSON body, or the current SSE line, outgrew USAGE_WHOLE_BYTES
        )
        self.head = b""  # the first bytes of a huge SSE line
        self.found: tuple[int, int] | None = None

    @classmethod
    def for_response(cls, resp: ResponseHead) -> UsageMeter | None:
        """A meter for a JSON or SSE answer (identity, gzip or deflate), else None."""
        kind = media_type(resp.header(b"content-type"))
        encoding = (resp.header(b"content-encoding") or b"").strip().lower()
        if encoding not in (b"", b"identity", b"gzip", b"deflate") or resp.status >= 300:
            return None
        if kind == b"text/event-stream":
            return cls(True, encoding if encoding != b"identity" else b"")
        if kind == b"application/json":
            return cls(False, encoding if encoding != b"identity" else b"")
        return None

    def feed(self, piece: bytes) -> None:
        if self.inflater is not None:
            if self.decoded_bytes > USAGE_MAX_DECODED_BYTES:
                return
            try:
                piece = self.inflater.decompress(piece, USAGE_MAX_DECODED_BYTES)
            except zlib.error:
                self.decoded_bytes = USAGE_MAX_DECODED_BYTES + 1
                return
            self.decoded_bytes += len(piece)
        if self.sse:
            self.feed_sse(piece)
            return
        self.buffer += piece
        if len(self.buffer) > USAGE_WHOLE_BYTES:
            self.whole = False
            del self.buffer[:-USAGE_TAIL_BYTES]

    def feed_sse(self, piece: bytes) -> None:
        self.buffer += piece
        end = self.buffer.rfind(b"\n")
        if end == -1:
            if len(self.buffer) > USAGE_WHOLE_BYTES:
                # A huge event (Responses' response.completed repeats the whole output): its usage
                # comes last, so keep only the line's start and its tail.
                if not self.whole:
                    del self.buffer[:-USAGE_TAIL_BYTES]
                else:
                    self.head, self.whole = bytes(self.buffer[:8]), False
                    del self.buffer[:-USAGE_TAIL_BYTES]
            return
        lines, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 1 :]
        if not self.whole:  # the end of a huge line: read its usage from the tail
            first, _, lines = lines.partition(b"\n")
            if self.head.startswith(b"data:"):
                self.found = last_usage_object(first) or self.found
            self.whole = True
        if b'"usage"' not in lines:  # nearly every event: skip without parsing
            return
        for line in lines.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    found = usage_in_document(json.loads(line[5:]))
                except ValueError:
                    continue
                if found is not None:
                    self.found = found

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens once the body has been fed, or None when the answer
        had none."""
        if self.sse:
            return self.found
        return last_usage_object(bytes(self.buffer))


@dataclass(slots=True)
class RequestBody:
    """A request body as it is forwarded: what was read ahead (to check it, or to replay it on a
    fresh connection) and what still streams from the client."""

    read_ahead: bytes = b""
    rest: AsyncIterator[bytes] | None = None  # None: read_ahead is the whole body
    inspect: Callable[[bytes], None] | None = (
        None  # sees each streamed piece; raises ApiError to stop
    )
    rewritten: bool = False  # read_ahead is the whole body, changed by SOAKP (budget metering)


def check_model(allowed: Sequence[str], model: str | None) -> None:
    """Raises ApiError(403) when a models-limited token asks for another model."""
    if model is not None and model not in allowed:
        raise ApiError(
            403,
            f"This token may not use the model {safe_label(model)!r}.",
            "model_not_allowed",
            param="model",
        )


# For a budgeted token (SPEC.md, Limits): the output caps each endpoint knows, and the one SOAKP
# adds when the request has none. Reasoning models refuse `max_tokens`, so chat gets
# `max_completion_tokens`; legacy completions get the API's own default of 16, which changes nothing
# but makes it explicit.
CAPPED_ENDPOINTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "/v1/chat/completions": (("max_tokens", "max_completion_tokens"), "max_completion_tokens"),
    "/v1/responses": (("max_output_tokens",), "max_output_tokens"),
    "/v1/completions": (("max_tokens",), None),
}
LEGACY_COMPLETIONS_DEFAULT_CAP = 16


# Endpoints whose answers report usage; a budgeted answer without it is charged the estimate.
ESTIMATED_ENDPOINTS = frozenset({*CAPPED_ENDPOINTS, "/v1/embeddings"})
STREAM_USAGE_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
BUDGET_FIELDS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "stream",
        "stream_options",
        "background",
    }
)


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    changes: dict[str, Any]  # top-level fields to set in the request body (none: send it unchanged)
    reserved: int  # output tokens the answer may use at most (its cap times its choices)
    strip_usage_event: bool  # SOAKP asked for stream usage: take that event out of the answer


def whole_number(fields: Mapping[str, Any], name: str, default: int) -> int:
    value = fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"'{name}' must be a whole number of at least 1.", param=name)
    return value


def plan_budget(fields: Mapping[str, Any], upstream_path: str, left: int) -> BudgetPlan:
    """Lower (or add) a budgeted request's output cap to what the budget has left, shared among its
    choices.

    `fields` are the request's top-level BUDGET_FIELDS. Pure. Raises ApiError: 400 for a cap that is
    not a number, 403 for a background response (its usage is never reported in the answer), 429
    when nothing is left.
    """
    if upstream_path == "/v1/responses" and fields.get("background") not in (None, False):
        raise ApiError(
            403,
            "A token with a budget (max_tokens_total) may not start background responses: their "
            "token usage is not reported in the answer.",
            "budget_unmetered_endpoint",
            param="background",
        )
    if upstream_path not in CAPPED_ENDPOINTS:
        return BudgetPlan({}, 0, False)  # embeddings: no output to cap, charged by their usage
    names, added = CAPPED_ENDPOINTS[upstream_path]
    choices = 1
    if upstream_path != "/v1/responses":
        choices = max(whole_number(fields, "n", 1), whole_number(fields, "best_of", 1))
    per_choice = left // choices
    if per_choice < 1:
        raise budget_spent()
    changes: dict[str, Any] = {}
    caps = [whole_number(fields, name, 1) for name in names if fields.get(name) is not None]
    if caps:
        for name in names:
            if fields.get(name) is not None and fields[name] > per_choice:
                changes[name] = per_choice
        cap = min(min(caps), per_choice)
    elif added is not None:
        changes[added] = cap = per_choice
    else:
        changes["max_tokens"] = cap = min(LEGACY_COMPLETIONS_DEFAULT_CAP, per_choice)
    strip = False
    if upstream_path in STREAM_USAGE_ENDPOINTS and fields.get("stream") is True:
        options = fields.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options")
        if (options or {}).get("include_usage") is not True:
            changes["stream_options"] = {**(options or {}), "include_usage": True}
            strip = True
    return BudgetPlan(changes, cap * choices, strip)


USAGE_OBJECT_RE = re.compile(rb'"usage"\s*:\s*\{')
USAGE_NULL_RE = re.compile(
    rb',\s*"usage"\s*:\s*null'
)  # what include_usage adds to every other chunk


# An SSE event ends with a blank line; a line ends with CRLF, LF or CR (the SSE standard).
SSE_EVENT_END_RE = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseUsageStripper:
    """Takes back out of a chat stream what SOAKP's own `include_usage` added: the final usage-only
    event and the `"usage":null` of every other chunk, so the client receives the stream it asked
    for."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, piece: bytes) -> bytes:
        """Returns the complete events of the stream so far, cleaned; holds back a partial event."""
        self.buffer += piece
        ends = list(SSE_EVENT_END_RE.finditer(self.buffer))
        if not ends:
            if (
                len(self.buffer) > USAGE_WHOLE_BYTES
            ):  # no event boundary in sight: pass it on unchanged
                out, self.buffer = self.buffer, b""
                return out
            return b""
        end = ends[-1].end()
        events, self.buffer = self.buffer[:end], self.buffer[end:]
        return self.clean(events)

    def flush(self) -> bytes:
        out, self.buffer = self.buffer, b""
        return self.clean(out)

    @staticmethod
    def clean(events: bytes) -> bytes:
        if b'"usage"' not in events:
            return events
        kept = []
        start = 0
        for end in [m.end() for m in SSE_EVENT_END_RE.finditer(events)] + [len(events)]:
            event, start = events[start:end], end
            if event.startswith(b"data:") and USAGE_OBJECT_RE.search(event):
                try:
                    document = json.loads(event[5:])
                except ValueError:
                    document = None
                if (
                    isinstance(document, dict)
                    and document.get("choices") == []
                    and isinstance(document.get("usage"), dict)
                ):
                    continue
            kept.append(USAGE_NULL_RE.sub(b"", event))
        return b"".join(kept)


LAST_CHUNK = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding (nothing for no data: an empty chunk would end the
    body)."""
    return b"%x\r\n" % len(data) + data + b"\r\n" if data else b""


def frame_body(data: bytes, chunked: bool, final: bool) -> bytes:
    """Body bytes as they go upstream: raw for Content-Length, re-chunked for chunked."""
    if not chunked:
        return data
    return encode_chunk(data) + (LAST_CHUNK if final else b"")


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """How an upstream answer goes to the client."""

    framing: Literal["length", "chunked", "close", "none"]  # the client's framing
    keep_alive: bool  # whether the client connection may carry another request
    strip_usage_event: bool  # take out the usage event SOAKP asked for (the body's length changes)
    whole: bool  # small enough to read whole and send in one write


def plan_answer(
    resp: ResponseHead, http_minor: int, keep_alive: bool, strip_usage_event: bool
) -> AnswerPlan:
    """Decide the client's framing for an upstream answer. Pure.

    The upstream's own framing is kept where it can be; an answer whose length is unknown (chunked,
    or ended by close) goes to an HTTP/1.1 client chunked and to an HTTP/1.0 client ended by close,
    and so does one whose usage event SOAKP takes out (its length changes).
    """
    strip = (
        strip_usage_event
        and resp.status == 200
        and (resp.header(b"content-encoding") or b"identity").strip().lower() == b"identity"
    )
    if resp.body_kind == "none":
        return AnswerPlan("none", keep_alive, False, True)
    if resp.body_kind == "length" and not strip:
        return AnswerPlan("length", keep_alive, False, resp.content_length <= SMALL_BODY_BYTES)
    if http_minor == 1:
        return AnswerPlan("chunked", keep_alive, strip, False)
    return AnswerPlan(
        "close", False, strip, False
    )  # an HTTP/1.0 client learns where it ends by the close


def upstream_request(
    head: RequestHead,
    upstream_path: str,
    claims: TokenClaims,
    target: UpstreamTarget,
    body: RequestBody,
    strip_usage_event: bool,
) -> bytes:
    """The bytes of the first upstream write: the head and what was read ahead of the body."""
    if body.rewritten:  # the whole body, changed: sent with its own Content-Length
        # Uncompressed when the usage event SOAKP asked for must be taken out of the stream again.
        drop = frozenset({b"accept-encoding"}) if strip_usage_event else frozenset()
        return (
            build_upstream_head(
                head, upstream_path, claims, target, len(body.read_ahead), also_drop=drop
            )
            + body.read_ahead
        )
    return build_upstream_head(head, upstream_path, claims, target) + frame_body(
        body.read_ahead, head.body_kind == "chunked", final=body.rest is None
    )


WEBSOCKET_PATH = "/v1/realtime"
WEBSOCKET_KEY_PROTOCOL = (
    "openai-insecure-api-key."  # how browsers, which cannot set headers, pass a key
)
WEBSOCKET_MAX_S = 3600.0  # OpenAI ends Realtime sessions within the hour
WEBSOCKET_DROP = frozenset({b"sec-websocket-protocol"})


def offered_subprotocols(head: RequestHead) -> list[str]:
    """The Sec-WebSocket-Protocol values a client offered, in order."""
    return [
        p.strip()
        for name, value in head.headers
        if name.lower() == b"sec-websocket-protocol"
        for p in value.decode("latin-1").split(",")
        if p.strip()
    ]


def websocket_model(claims: TokenClaims, upstream_path: str, query: str) -> str | None:
    """The `model` of a WebSocket session (the Realtime API names it in the query), checked against
    a models-limited token. Such a token must name exactly one allowed model up front: a tunnel
    cannot see what a session asks for later (a Responses WebSocket, or a call joined by call_id).

    Raises ApiError 400 (`model` named twice in any case: `?model=ok&MODEL=bad`) or 403.
    """
    pairs = urllib.parse.parse_qsl(query[1:], keep_blank_values=True)
    models = [value for name, value in pairs if name == "model"]
    if len(models) > 1 or (
        len(models) != sum(name.casefold() == "model" for name, _ in pairs)
        and claims.permissions.models is not None
    ):
        raise bad_request("Name the model once, as `model` in lower case.", param="model")
    model = models[0] if models else None
    allowed = claims.permissions.models
    if allowed is not None:
        if upstream_path != WEBSOCKET_PATH or not model:
            raise ApiError(
                403,
                "This token is limited to certain models: open a Realtime session with "
                "/v1/realtime?model=<an allowed model>.",
                "model_not_allowed",
                param="model",
            )
        check_model(allowed, model)
    return model


def is_websocket_upgrade(head: RequestHead) -> bool:
    upgrade = head.header(b"upgrade")
    return head.method == "GET" and upgrade is not None and upgrade.strip().lower() == b"websocket"


def build_switching_head(
    resp: ResponseHead, offered: Sequence[str], cors: bytes, secret: bytes = b""
) -> bytes:
    """The 101 sent to the client. Its subprotocol is one the client offered that carries no
    credential: the upstream's choice when it is such, else the first such offer."""
    safe = [p for p in offered if not p.startswith(WEBSOCKET_KEY_PROTOCOL)]
    chosen = None
    for name, value in resp.headers:
        if name.lower() == b"sec-websocket-protocol" and value.decode("latin-1").strip() in safe:
            chosen = value.decode("latin-1").strip()
    if chosen is None and safe:
        chosen = safe[0]
    parts = [b"HTTP/1.1 101 " + (resp.reason or b"Switching Protocols") + b"\r\n"]
    parts.extend(
        forwarded_headers(
            without_secret(resp.headers, secret), WEBSOCKET_DROP | CORS_RESPONSE_HEADERS
        )
    )
    parts.append(b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    if chosen is not None:
        parts.append(b"Sec-WebSocket-Protocol: " + chosen.encode("latin-1") + b"\r\n")
    parts.append(cors + b"\r\n")
    return b"".join(parts)


def upstream_handshake(
    head: RequestHead, upstream_path: str, claims: TokenClaims, target: UpstreamTarget
) -> bytes:
    """The upstream WebSocket handshake: the client's, with the real key where the client put its
    token.

    The real key goes into the upstream's subprotocol only when the client authenticated that way; a
    client that sent Authorization gets Authorization upstream, and its key-shaped offers are
    dropped.
    """
    by_header = head.header(b"authorization") is not None
    protocols = [
        WEBSOCKET_KEY_PROTOCOL + claims.key if p.startswith(WEBSOCKET_KEY_PROTOCOL) else p
        for p in offered_subprotocols(head)
        if not (by_header and p.startswith(WEBSOCKET_KEY_PROTOCOL))
    ]
    extra = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    if protocols:
        extra += b"Sec-WebSocket-Protocol: " + ", ".join(protocols).encode("latin-1") + b"\r\n"
    return build_upstream_head(
        head, upstream_path, claims, target, extra=extra, also_drop=WEBSOCKET_DROP
    )


@dataclass(slots=True, eq=False)
class Exchange:
    """One request's progress and facts, from its head to its access log line: what forwarding needs
    to answer a failure honestly, what the limits settle afterwards, and what the log and metrics
    show. Forwarding's functions all take it (as uvicorn's RequestResponseCycle holds one request).
    """

    started: float
    watchdog: Watchdog
    status: int = 0
    route: str = "other"
    head: RequestHead | None = None  # None until the request line and headers are read
    upstream_path: str = ""  # the path (and query) it is forwarded to, once it is a /v1/... request
    cors_head: bytes = b""  # the CORS header lines every answer to it carries
    body_consumed: bool = False
    response_started: bool = False
    upstream: UpstreamConnection | None = None
    claims: TokenClaims | None = None
    cors: tuple[tuple[str, str], ...] = ()
    metered: bool = False
    usage: tuple[int, int] | None = None
    model: str | None = None
    request_id: str | None = None
    reserved: int = (
        0  # output tokens of the chain's budget promised to this request until it is settled
    )
    reservation: str | None = None  # its id in Redis (--redis); None: the reservation is local
    rate_taken: bool = False  # counted against rpm already, with its reservation (--redis)
    estimate: tuple[int, int] | None = (
        None  # what a budgeted request is charged if no usage is reported
    )
    revoked: bool = False  # its chain was revoked while it streamed
    upstream_started: float = 0.0
    upstream_s: float = 0.0
    first_byte_s: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error_kind: str | None = None
    strip_usage_event: bool = (
        False  # SOAKP asked for stream usage itself: hide that event from the client
    )

    def forwarded(self) -> tuple[RequestHead, TokenClaims]:
        """The head and verified token of a request on its way upstream; forwarding starts only
        after both are known."""
        if self.head is None or self.claims is None:
            raise RuntimeError("forwarding needs a request head and a verified token")
        return self.head, self.claims

    def mark_first_byte(self) -> None:
        """The first response byte is going out: from now on a failure can only cut the answer
        short."""
        if not self.response_started:
            self.response_started = True
            self.first_byte_s = time.monotonic() - self.started


# 6. Forwarding: a checked request in, the answer streamed back. All upstream I/O lives here.

# The limits that count against state: a budget's spending and reservations and a rate limit, kept
# by this instance or, with --redis, by every instance together (SharedStore, section 3).


def store_unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"SOAKP cannot reach the store shared by its instances, which keeps "
        f"{what}; try again shortly.",
        "store_unavailable",
        headers=[("Retry-After", "1")],
    )


async def chain_budgets(state: ServerState, claims: TokenClaims) -> dict[str, tuple[int, int]]:
    """(spent, reserved) of each budgeted chain of a token: from Redis with --redis (while it is
    unreachable a 503, or this instance's own counts with --budget-fail-open), else this
    instance's."""
    if state.shared is not None:
        try:
            return await state.shared.budget_figures(claims.budgets)
        except StoreDown:
            if not state.config.budget_fail_open:
                raise store_unavailable("token budgets") from None
    return {cid: (state.spent.get(cid, 0), state.reserved.get(cid, 0)) for cid, _ in claims.budgets}


def check_budget_figures(
    claims: TokenClaims, figures: Mapping[str, tuple[int, int]], reserved_too: bool = True
) -> int:
    """429 once a budgeted chain (its own or an ancestor's) has spent its whole budget, or
    (`reserved_too`) promised what is left to requests in flight: those may end under their caps,
    so that 429 may be retried. Returns what is left: the least any chain has, less
    (`reserved_too`) what is reserved."""
    budgets = claims.budgets
    if any(figures[cid][0] >= budget for cid, budget in budgets):
        raise budget_spent()
    left = min(
        (
            budget - figures[cid][0] - (figures[cid][1] if reserved_too else 0)
            for cid, budget in budgets
        ),
        default=0,
    )
    if reserved_too and left <= 0:
        raise ApiError(
            429,
            "What is left of this token's budget (max_tokens_total) is reserved by "
            "its requests in flight; retry when they have finished.",
            "budget_reserved",
            "requests",
            headers=[("Retry-After", "1")],
        )
    return left


async def check_budget(state: ServerState, claims: TokenClaims, reserved_too: bool = True) -> int:
    """check_budget_figures() on the chains' current figures. Returns what is left (0 without a
    budget)."""
    if not claims.budgets:
        return 0
    return check_budget_figures(claims, await chain_budgets(state, claims), reserved_too)


def budget_left(state: ServerState, claims: TokenClaims, reserved_too: bool = True) -> int:
    """What a budgeted token may still spend by this instance's counts: the least any of its
    chains' budgets has left, less what was spent and (`reserved_too`) what is reserved by
    requests in flight."""
    return min(
        (
            budget - state.spent.get(cid, 0) - (state.reserved.get(cid, 0) if reserved_too else 0)
            for cid, budget in claims.budgets
        ),
        default=0,
    )


def reserved_later(state: ServerState, head: RequestHead, upstream_path: str) -> bool:
    """Whether, with --redis, reserve_budget() will check the budget anyway (a capped JSON
    request), so that checking it before the body is read would only cost another round trip."""
    return (
        state.shared is not None
        and head.method == "POST"
        and upstream_path in CAPPED_ENDPOINTS
        and media_type(head.header(b"content-type")) != b"multipart/form-data"
    )


async def reserve_budget(
    state: ServerState,
    exchange: Exchange,
    claims: TokenClaims,
    document: dict[str, Any],
    upstream_path: str,
) -> BudgetPlan:
    """Plan a budgeted request (plan_budget) and reserve its output cap on every budgeted chain
    until record_outcome() settles it: in Redis with --redis, atomically per chain, else in this
    instance. Raises ApiError 400, 403, 429, or 503 while Redis is unreachable (without
    --budget-fail-open)."""
    shared = state.shared
    if shared is not None:
        budgets = claims.budgets
        least = min(budget for _, budget in budgets)
        want = plan_budget(dict(document), upstream_path, least).reserved
        if not want:
            return plan_budget(document, upstream_path, 1)  # nothing to cap: charged by its usage
        try:  # the rpm is taken here too: one round trip per chain for both
            rid, granted, figures, wait_s = await shared.admit(
                chain_limits_of(claims), want, claims.rexp + KEEP_AFTER_S, time.time()
            )
        except StoreDown:
            if not state.config.budget_fail_open:
                raise store_unavailable("token budgets") from None
        else:
            if wait_s:
                raise rate_limited(claims, wait_s)
            if not granted:
                # Refused before it reached every chain: the others' figures, for the right 429.
                missing = [(cid, budget) for cid, budget in budgets if cid not in figures]
                try:
                    figures.update(await shared.budget_figures(missing) if missing else {})
                except StoreDown:
                    raise store_unavailable("token budgets") from None
                check_budget_figures(claims, figures)
                raise store_unavailable("token budgets")  # not reached: a refusal has a reason
            exchange.reserved, exchange.reservation, exchange.rate_taken = granted, rid, True
            return plan_budget(document, upstream_path, granted)
    plan = plan_budget(document, upstream_path, budget_left(state, claims))
    exchange.reserved = plan.reserved
    if plan.reserved:
        for cid, _ in claims.budgets:
            state.reserved[cid] = state.reserved.get(cid, 0) + plan.reserved
    return plan


def chain_limits_of(claims: TokenClaims) -> list[tuple[str, int | None, int | None]]:
    """(cid, budget, rpm) of the token's own chain and each ancestor's, own first."""
    budgets, rates = dict(claims.budgets), dict(claims.rates)
    return [(cid, budgets.get(cid), rates.get(cid)) for cid in claims.chains]


def rate_limited(claims: TokenClaims, wait_s: float) -> ApiError:
    rpm = min(per_minute for _, per_minute in claims.rates)
    return ApiError(
        429,
        f"Rate limit of {rpm} requests per minute reached for this token"
        f"{' or a token it descends from' if claims.ancestors else ''}.",
        "rate_limit_exceeded",
        "requests",
        headers=[("Retry-After", str(math.ceil(wait_s)))],
    )


async def take_rate(state: ServerState, claims: TokenClaims, now: float) -> None:
    """Count one request against the `rpm` of its chain and of each ancestor: in Redis with --redis
    (this instance's counts while it is unreachable). Raises ApiError(429) with Retry-After."""
    rates = claims.rates
    if rates:
        wait_s = None
        if state.shared is not None:
            with contextlib.suppress(StoreDown):
                limits = [(cid, None, rpm) for cid, rpm in rates]
                wait_s = (await state.shared.admit(limits, 0, 0, now))[3]
        if wait_s is None:
            wait_s = state.rate.acquire_all(rates, now)
        if wait_s:
            raise rate_limited(claims, wait_s)


READ_CHUNK_BYTES = 64 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
POOL_MAX_IDLE = 128
POOL_IDLE_LIMIT_S = 50.0  # below the 60 s idle timeout common to cloud load balancers


class UpstreamError(Exception):
    """The upstream failed; `status` is what the client gets if no response byte was sent yet, and
    `kind` names the failure in metrics and the access log."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class ClientGone(Exception):
    """The client closed its connection or stopped sending; nothing more can be said to it."""


CLIENT_CHECK_S = (
    0.5  # while the upstream is silent, how often to look whether the client is still there
)


class Watchdog:
    """Every time limit of one client connection on one lazily rescheduled timer.

    A timer per read (asyncio.timeout) costs more than the read it guards; here arming is an
    attribute write and the timer, when it fires, checks whether a deadline really passed. A late
    read is ended by setting TimeoutError on the stream it waits on. While an upstream read waits,
    the timer also looks every CLIENT_CHECK_S whether the client has gone, so that no upstream keeps
    working (and billing) for an answer nobody will read: that read ends with ClientGone.
    """

    __slots__ = (
        "loop",
        "client",
        "client_transport",
        "client_timeout_s",
        "upstream_timeout_s",
        "client_deadline",
        "client_writing",
        "client_cut",
        "upstream_deadline",
        "upstream",
        "handle",
        "finish_upstream",
    )

    def __init__(
        self,
        client: asyncio.StreamReader,
        client_transport: asyncio.BaseTransport,
        client_timeout_s: float,
        upstream_timeout_s: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.client_transport = client_transport
        self.client_timeout_s = client_timeout_s
        self.upstream_timeout_s = upstream_timeout_s
        self.client_deadline: float | None = None
        self.client_writing = False
        self.client_cut = False  # a client read was ended by a timeout
        self.upstream_deadline: float | None = None
        self.upstream: UpstreamConnection | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.finish_upstream = False  # a budgeted answer: keep reading it when the client leaves

    def arm_client(self, writing: bool = False) -> None:
        """The client has --header-timeout to deliver what is read next, or to take what
        is written."""
        self.client_deadline = deadline = self.loop.time() + self.client_timeout_s
        self.client_writing = writing
        self.wake_by(deadline)

    def disarm_client(self) -> None:
        self.client_deadline = None

    def arm_upstream(self, upstream: UpstreamConnection) -> None:
        """The upstream has --read-timeout to send what is read next, or to take what is written."""
        now = self.loop.time()
        self.upstream = upstream
        self.upstream_deadline = deadline = now + self.upstream_timeout_s
        self.wake_by(min(deadline, now + CLIENT_CHECK_S))

    def disarm_upstream(self) -> None:
        self.upstream_deadline = None
        self.upstream = None

    def wake_by(self, when: float) -> None:
        handle = self.handle
        if handle is None:
            self.handle = self.loop.call_at(when, self.check)
        elif handle.when() > when:
            handle.cancel()
            self.handle = self.loop.call_at(when, self.check)

    def check(self) -> None:
        self.handle = None
        now = self.loop.time()
        wake = math.inf
        if self.client_deadline is not None:
            if now < self.client_deadline:
                wake = self.client_deadline
            elif self.client_writing or self.client_cut:
                # A client that stopped reading, or whose read went on after being told to stop:
                # only closing ends the wait.
                self.client_deadline = None
                cast(asyncio.Transport, self.client_transport).abort()
            else:
                # End the read so that a 408 can still be sent. A stream checks for the exception
                # only when a read starts: one woken by a byte just now would go on, so look again
                # shortly.
                self.client.set_exception(TimeoutError("the client was too slow"))
                self.client_cut = True
                self.client_deadline = wake = now + CLIENT_CHECK_S
        upstream = self.upstream
        if self.upstream_deadline is not None and upstream is not None:
            if now >= self.upstream_deadline or self.client.at_eof() and not self.finish_upstream:
                gone = now < self.upstream_deadline
                upstream.reader.set_exception(
                    ClientGone("the client went away while the upstream was silent")
                    if gone
                    else TimeoutError("the upstream was silent too long")
                )
                upstream.abort()  # also ends a write stuck on an upstream that stopped reading
                self.disarm_upstream()
            else:
                wake = min(wake, self.upstream_deadline, now + CLIENT_CHECK_S)
        if wake != math.inf:
            self.handle = self.loop.call_at(wake, self.check)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


@dataclass(slots=True)
class UpstreamConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reusable: bool = True

    def close(self) -> None:
        """Retire a connection whose exchange ended cleanly (TLS close_notify, then FIN)."""
        if not self.writer.transport.is_closing():
            self.writer.close()

    def abort(self) -> None:
        """Drop a connection at once with a TCP reset, so the upstream stops working on it now. A
        plain close would queue the FIN behind unsent bytes that an upstream which stopped reading
        never takes."""
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()


def unread_bytes(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read. Past the end of a response there must be none: an upstream
    that sent more than its framing announced would otherwise answer the next request, another
    client's, with them (RFC 9112 §9.3). StreamReader has no public peek; its buffer is the stdlib's
    own."""
    return len(reader._buffer)  # type: ignore[attr-defined]  # noqa: SLF001


class UpstreamPool:
    """Keep-alive connections to the one configured upstream, verified TLS, reused newest first."""

    def __init__(
        self, target: UpstreamTarget, ssl_context: ssl.SSLContext | None, connect_timeout_s: float
    ) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[UpstreamConnection] = []
        self.connections_opened = 0

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """An idle connection that still looks alive, else a new one. Returns
        (connection, reused)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if (
                conn.reader.at_eof()
                or conn.writer.transport.is_closing()
                or now - conn.idle_since > POOL_IDLE_LIMIT_S
                or unread_bytes(conn.reader)
            ):  # bytes nobody asked for: the stream is out of step
                conn.abort()
                continue
            return conn, True
        return await self.connect(), False

    async def connect(self) -> UpstreamConnection:
        """Open a new connection. Raises UpstreamError(502)."""
        target = self.target
        try:
            reader, writer = await bounded(
                asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=self.ssl_context,
                    server_hostname=target.host if self.ssl_context else None,
                    limit=MAX_HEAD_BYTES,
                ),
                self.connect_timeout_s,
            )
        except ssl.SSLCertVerificationError as exc:
            # Never retried without verification: a certificate that does not verify is an attack or
            # a misconfiguration, and the key must not go to whoever holds it.
            raise UpstreamError(
                502,
                f"The upstream's TLS certificate did not verify: {exc.verify_message}.",
                "tls_verify",
            ) from None
        except TimeoutError:
            raise UpstreamError(
                502, "The upstream did not accept a connection in time.", "connect_timeout"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(
                502, f"The upstream is unreachable ({describe_error(exc)}).", "connect_failed"
            ) from None
        self.connections_opened += 1
        return UpstreamConnection(reader, writer)

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange finished cleanly."""
        if (
            len(self.idle) >= POOL_MAX_IDLE
            or conn.reader.at_eof()
            or conn.writer.transport.is_closing()
            or conn.reader.exception() is not None
            or not conn.reusable
            or unread_bytes(conn.reader)
        ):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


async def read_request_body(
    reader: asyncio.StreamReader, head: RequestHead, max_body_bytes: int, watchdog: Watchdog
) -> AsyncIterator[bytes]:
    """Yield the client's request body in pieces as they arrive, decoding chunked framing with the
    same ChunkedDecoder as upstream answers, and never reading past the body's end (a pipelined
    request).

    Raises ApiError (400 bad chunking, 413 over the limit, 408 too slow) or ClientGone.
    """

    async def client_read(read: Any) -> Any:
        watchdog.arm_client()
        try:
            return await read
        finally:
            watchdog.disarm_client()

    try:
        if head.body_kind == "length":
            remaining = head.content_length
            while remaining:
                piece = await client_read(reader.read(min(remaining, READ_CHUNK_BYTES)))
                if not piece:
                    raise ClientGone("client closed mid-body")
                remaining -= len(piece)
                yield piece
        elif head.body_kind == "chunked":
            decoder = ChunkedDecoder(max_body_bytes, check_trailers=True)
            while not decoder.done:
                wanted = decoder.next_read()
                if wanted:
                    data = await client_read(reader.read(min(wanted, READ_CHUNK_BYTES)))
                    if not data:
                        raise ClientGone("client closed mid-body")
                else:
                    data = await client_read(reader.readuntil(b"\r\n"))
                piece = decoder.feed(data)
                if piece:
                    yield piece
    except FramingError as exc:
        raise ApiError(
            exc.status, str(exc), "request_too_large" if exc.status == 413 else "invalid_request"
        ) from None
    except TimeoutError:
        raise ApiError(408, "The request body arrived too slowly.", "request_timeout") from None
    except asyncio.LimitOverrunError:
        raise bad_request("Chunk size line too long.") from None
    except asyncio.IncompleteReadError:
        raise ClientGone("client closed mid-body") from None
    except ConnectionError:
        raise ClientGone("client connection lost") from None


async def read_upstream_body(
    conn: UpstreamConnection, resp: ResponseHead, watchdog: Watchdog
) -> AsyncIterator[bytes]:
    """Yield the upstream's response body in pieces as they arrive (chunked framing decoded).

    Raises UpstreamError if the upstream stalls, breaks its framing or closes early; ClientGone if
    the client leaves while the upstream is silent.
    """
    reader = conn.reader

    async def wait(read: Any) -> Any:
        watchdog.arm_upstream(conn)
        try:
            return await read
        finally:
            watchdog.disarm_upstream()

    try:
        if resp.body_kind == "length":
            remaining = resp.content_length
            while remaining:
                piece = await wait(reader.read(min(remaining, READ_CHUNK_BYTES)))
                if not piece:
                    raise UpstreamError(502, "upstream closed mid-body", "reset_mid_body")
                remaining -= len(piece)
                yield piece
        elif resp.body_kind == "chunked":
            decoder = ChunkedDecoder()
            while not decoder.done:
                if decoder.error is not None:
                    raise decoder.error
                data = await wait(reader.read(READ_CHUNK_BYTES))
                if not data:
                    raise UpstreamError(502, "upstream closed mid-chunk", "reset_mid_body")
                piece = decoder.feed(data)
                if piece:
                    yield piece
            if decoder.leftover:  # more than one answer's worth: the stream cannot be trusted again
                conn.reusable = False
        elif resp.body_kind == "close":
            while True:
                piece = await wait(reader.read(READ_CHUNK_BYTES))
                if not piece:
                    return
                yield piece
    except TimeoutError:
        raise UpstreamError(504, "upstream went silent mid-body", "read_timeout_mid_body") from None
    except (FramingError, asyncio.LimitOverrunError):
        raise UpstreamError(502, "upstream broke its chunked framing", "protocol") from None
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        raise UpstreamError(502, "upstream connection broke mid-body", "reset_mid_body") from None


async def read_response_head(
    conn: UpstreamConnection, method: str, watchdog: Watchdog, upgrade: bool = False
) -> ResponseHead:
    """Read the upstream's final response head, skipping 1xx interim answers (but a 101 when
    upgrading).

    Raises UpstreamError (504 on silence, 502 otherwise) or ConnectionResetError/IncompleteReadError
    with nothing read, which the caller may retry on a fresh connection.
    """
    while True:
        try:
            watchdog.arm_upstream(conn)
            try:
                data = await conn.reader.readuntil(b"\r\n\r\n")
            finally:
                watchdog.disarm_upstream()
        except TimeoutError:
            raise UpstreamError(
                504, "The upstream did not answer in time.", "read_timeout"
            ) from None
        except asyncio.LimitOverrunError:
            raise UpstreamError(
                502, "The upstream's response head is too large.", "protocol"
            ) from None
        try:
            resp = parse_response_head(data, method)
        except UpstreamProtocolError as exc:
            raise UpstreamError(
                502, f"The upstream sent an invalid response ({exc}).", "protocol"
            ) from None
        if not 100 <= resp.status < 200 or upgrade and resp.status == 101:
            return resp


async def write_client(
    writer: asyncio.StreamWriter, data: bytes, watchdog: Watchdog | None = None
) -> None:
    """Write and wait for the buffer to drain, so a slow client slows the upstream instead of
    filling memory.

    With a watchdog, a client that takes nothing for --header-timeout is disconnected.
    """
    writer.write(data)
    transport = writer.transport
    if not transport.get_write_buffer_size():
        # The kernel took it all (nearly every write of a stream): there is nothing to wait for,
        # and skipping drain() spares a chain of coroutine calls per event. A client that is gone
        # shows as a closing transport, which drain() would have turned into an exception.
        if transport.is_closing():
            raise ClientGone("client went away")
        return
    if watchdog is not None:
        watchdog.arm_client(writing=True)
    try:
        await writer.drain()
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone("client went away") from exc
    finally:
        if watchdog is not None:
            watchdog.disarm_client()


async def read_whole(pieces: AsyncIterator[bytes], limit_bytes: int, what: str) -> bytes:
    collected, size = [], 0
    async for piece in pieces:
        size += len(piece)
        if size > limit_bytes:
            raise ApiError(
                413, f"{what} is over the limit of {limit_bytes} bytes.", "request_too_large"
            )
        collected.append(piece)
    return b"".join(collected)


async def read_body_ahead(
    state: ServerState,
    exchange: Exchange,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    claims: TokenClaims,
    upstream_path: str,
) -> RequestBody:
    """Read as much of the request body as forwarding needs before it connects upstream.

    A small body is read whole (one write upstream, and replayable). For a models-limited token, a
    JSON body is read whole, since a later repeated "model" key would otherwise slip past the check;
    a multipart body is read until its `model` field, and the rest is watched as it streams. For a
    token with a budget, a streamed chat request is made to report its usage (see SseUsageStripper).
    Raises ApiError (403 for a model outside the token's list, 400, 408, 413) or ClientGone.
    """
    if head.body_kind == "none":
        return RequestBody()
    config = state.config
    if head.expect_continue:
        await write_client(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
    models = claims.permissions.models
    budgeted = bool(claims.budgets) and head.method == "POST"
    meter_stream = budgeted and upstream_path in CAPPED_ENDPOINTS
    content_type = head.header(b"content-type") if models is not None or meter_stream else None
    if models is not None and len(head.index.get(b"content-type", ())) > 1:
        raise bad_request("A request has one Content-Type.")
    multipart = media_type(content_type) == b"multipart/form-data"
    small = head.body_kind == "length" and head.content_length <= SMALL_BODY_BYTES
    if small:
        exchange.watchdog.arm_client()
        try:
            data = await reader.readexactly(head.content_length)
        except TimeoutError:
            raise ApiError(408, "The request body arrived too slowly.", "request_timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ClientGone("client closed mid-body") from None
        finally:
            exchange.watchdog.disarm_client()
    elif not multipart and (
        models is not None or meter_stream or budgeted and upstream_path in ESTIMATED_ENDPOINTS
    ):
        data = await read_whole(
            read_request_body(reader, head, config.max_body_bytes, exchange.watchdog),
            min(MODEL_SCAN_LIMIT_BYTES, config.max_body_bytes),
            "A JSON body sent with a models-limited or budgeted token",
        )
    else:
        pieces = read_request_body(reader, head, config.max_body_bytes, exchange.watchdog)
        if models is None:
            return RequestBody(b"", pieces)
        return await read_multipart_ahead(
            exchange, pieces, multipart_boundary(content_type), models
        )

    exchange.body_consumed = True
    found = MODEL_IN_BODY_RE.search(data)  # for the access log only; checks below parse properly
    exchange.model = found[1].decode("latin-1") if found else None
    if models is not None:
        if multipart:
            scanner = MultipartModelScanner(multipart_boundary(content_type))
            check_multipart_models(exchange, models, scanner, scanner.feed(data))
            scanner.finish()
        else:
            nested = upstream_path in SESSION_MODEL_PATHS
            if len(data) > JSON_OFF_LOOP_BYTES:  # JsonWalk's steps are short: the loop runs between
                named = await asyncio.to_thread(json_models, data, nested)
            else:
                named = json_models(data, nested)
            for model in named:
                check_model(models, model)
    if budgeted and not multipart and upstream_path in ESTIMATED_ENDPOINTS:
        return await budget_body(state, exchange, claims, upstream_path, data)
    return RequestBody(data)


async def budget_body(
    state: ServerState, exchange: Exchange, claims: TokenClaims, upstream_path: str, data: bytes
) -> RequestBody:
    """A budgeted request's JSON body, its output cap lowered to what the chain's budget has left,
    and that much reserved until the answer's usage settles it (record_outcome). Raises ApiError
    400, 403, 429."""
    if len(data) > JSON_OFF_LOOP_BYTES:  # JsonWalk's steps are short: the loop runs between them
        fields = await asyncio.to_thread(json_fields, data, BUDGET_FIELDS)
    else:
        fields = json_fields(data, BUDGET_FIELDS)
    plan = await reserve_budget(state, exchange, claims, fields.values, upstream_path)
    exchange.estimate = (max(1, len(data)), plan.reserved)
    exchange.strip_usage_event = plan.strip_usage_event
    if not plan.changes:
        return RequestBody(data)
    return RequestBody(fields.splice(plan.changes), rewritten=True)


def check_multipart_models(
    exchange: Exchange, allowed: Sequence[str], scanner: MultipartModelScanner, found: Sequence[str]
) -> None:
    """Check the model values a scanner just reported; a second `model` field is a 400 even when
    allowed.

    Raises ApiError 403 (a model outside the list) or 400.
    """
    for model in found:
        check_model(allowed, model)
        exchange.model = model
    if scanner.model_fields > 1:
        raise multipart_refused("a body may have at most one model field")


async def read_multipart_ahead(
    exchange: Exchange, pieces: AsyncIterator[bytes], boundary: bytes, models: Sequence[str]
) -> RequestBody:
    """Read a multipart body up to its `model` field and check it; watch the rest as it streams.

    The rest streams one piece behind: the last piece goes upstream only once the scanner has seen
    the close delimiter, so a body that does not end as RFC 2046 says never reaches the upstream
    whole. Raises ApiError (400, 403) or ClientGone.
    """
    scanner = MultipartModelScanner(boundary)
    ahead: list[bytes] = []
    size = 0
    async for piece in pieces:
        ahead.append(piece)
        size += len(piece)
        seen = scanner.feed(piece)
        check_multipart_models(exchange, models, scanner, seen)
        if seen or size >= MODEL_SCAN_LIMIT_BYTES:
            break
    else:
        scanner.finish()
        exchange.body_consumed = True
        return RequestBody(b"".join(ahead))

    async def rest(held: bytes) -> AsyncIterator[bytes]:  # a second or late `model` is checked too
        async for piece in pieces:
            check_multipart_models(exchange, models, scanner, scanner.feed(piece))
            yield held
            held = piece
        scanner.finish()
        yield held

    return RequestBody(b"".join(ahead[:-1]), rest(ahead[-1]))


async def forward(
    state: ServerState,
    exchange: Exchange,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Send one request upstream and stream the answer back. Returns whether the client connection
    may be reused.

    Raises ApiError/UpstreamError before the response starts; after that a failure closes the client
    connection so the client sees a truncated response, never an invented ending.
    """
    head, claims = exchange.forwarded()
    upstream_path, cors = exchange.upstream_path, exchange.cors_head
    body = await read_body_ahead(state, exchange, reader, writer, head, claims, upstream_path)
    if not exchange.rate_taken:  # every other check has passed: now it counts against rpm
        await take_rate(state, claims, time.time())
    # A budgeted answer is read to its end even when the client leaves, so that it is charged.
    exchange.watchdog.finish_upstream = exchange.reserved > 0 or exchange.estimate is not None
    first_write = upstream_request(
        head, upstream_path, claims, state.config.upstream, body, exchange.strip_usage_event
    )
    exchange.bytes_in = len(body.read_ahead)
    exchange.upstream_started = time.monotonic()
    conn, resp = await send_upstream(state, exchange, head, first_write, body)
    plan = plan_answer(
        resp,
        head.http_minor,
        head.keep_alive and not state.shutting_down,
        exchange.strip_usage_event,
    )
    exchange.status = resp.status
    note_request_id(exchange, resp)
    meter = UsageMeter.for_response(resp) if exchange.metered else None
    try:
        client_head = build_client_head(resp, plan, cors, claims.key.encode("ascii"))
        if plan.whole:
            await relay_whole(exchange, writer, conn, resp, client_head, meter)
        else:
            await relay_stream(state, exchange, writer, conn, resp, plan, client_head, meter)
    except BaseException:
        conn.abort()
        exchange.upstream = None
        raise
    finally:
        exchange.upstream_s = time.monotonic() - exchange.upstream_started
        if meter:
            exchange.usage = meter.usage()
    exchange.upstream = None
    if resp.keep_alive:
        state.pool.release(conn)
    else:
        conn.close()
    return plan.keep_alive


async def send_upstream(
    state: ServerState, exchange: Exchange, head: RequestHead, first_write: bytes, body: RequestBody
) -> tuple[UpstreamConnection, ResponseHead]:
    """Send the request on a pooled connection and read the answer's head, trying once more on a
    fresh connection when that is safe. Raises UpstreamError (502 reset, 504) or what the body's
    reading raises.
    """
    replayable = body.rest is None
    for attempt in (1, 2):
        conn, reused = await state.pool.acquire()
        exchange.upstream = conn
        try:
            conn.writer.write(first_write)
            if body.rest is not None:
                exchange.bytes_in += await send_rest_of_body(
                    conn, body, head.body_kind == "chunked", exchange.watchdog
                )
                exchange.body_consumed = True
            return conn, await read_response_head(conn, head.method, exchange.watchdog)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            conn.abort()
            exchange.upstream = None
            # A pooled connection that broke before any answer was most likely closed by the
            # upstream while idle, but the upstream may also have received the whole request and
            # acted on it. Like Go's net/http and nginx, try once more only a request that may run
            # twice (RFC 9110 §9.2.2); for a POST the client decides (the SDKs retry a 502
            # themselves).
            if attempt == 1 and reused and replayable and head.method in IDEMPOTENT_METHODS:
                continue
            raise upstream_reset(exc) from None
        except BaseException:
            conn.abort()
            exchange.upstream = None
            raise
    raise AssertionError("unreachable: the second attempt returns or raises")


def upstream_reset(exc: BaseException) -> UpstreamError:
    """The 502 for an upstream connection that broke before its answer's head."""
    return UpstreamError(502, f"The upstream connection broke ({describe_error(exc)}).", "reset")


def note_request_id(exchange: Exchange, resp: ResponseHead) -> None:
    request_id = resp.header(b"x-request-id")
    if request_id is not None:
        exchange.request_id = safe_for_log(request_id.decode("latin-1"))


async def relay_whole(
    exchange: Exchange,
    writer: asyncio.StreamWriter,
    conn: UpstreamConnection,
    resp: ResponseHead,
    client_head: bytes,
    meter: UsageMeter | None,
) -> None:
    """A small answer (most JSON responses), or one without a body, in one write: fewer syscalls,
    and a failure while reading it still leaves the client an honest 502."""
    data = b""
    if resp.body_kind != "none":
        data = b"".join(
            [piece async for piece in read_upstream_body(conn, resp, exchange.watchdog)]
        )
        if meter:
            meter.feed(data)
            exchange.usage = meter.usage()
    exchange.mark_first_byte()
    await write_client(writer, client_head + data)
    exchange.bytes_out = len(client_head) + len(data)


async def relay_stream(
    state: ServerState,
    exchange: Exchange,
    writer: asyncio.StreamWriter,
    conn: UpstreamConnection,
    resp: ResponseHead,
    plan: AnswerPlan,
    client_head: bytes,
    meter: UsageMeter | None,
) -> None:
    """A large or streamed answer, piece by piece as it arrives: one client write per
    upstream read (see StreamRelay)."""
    claims = exchange.claims
    assert claims is not None
    client = ClientWriter(writer, exchange)
    stripper = SseUsageStripper() if plan.strip_usage_event else None
    relay = StreamRelay(exchange, client, conn, resp, meter, stripper, plan.framing == "chunked")
    with open_stream(state, claims, exchange):
        # The head goes out at once, unless the first body bytes came with it (an SSE stream's first
        # event usually does): then both leave in one write.
        exchange.bytes_out = len(client_head)
        if unread_bytes(conn.reader):
            relay.pending = client_head
        else:
            exchange.mark_first_byte()
            await client.write(client_head)
        await relay.run()
        tail = stripper.flush() if stripper else b""
        if relay.chunked:
            tail = encode_chunk(tail) + LAST_CHUNK
        exchange.bytes_out += len(tail)
        if relay.pending:
            tail, relay.pending = relay.pending + tail, b""
            exchange.mark_first_byte()
        if tail:
            await client.write(tail)
        client.check_gone()


BUDGET_DRAIN_MAX_BYTES = 64 * 1024**2  # what is read of a budgeted answer after its client left
CLIENT_WRITE_HIGH_BYTES = 64 * 1024  # a streamed answer waits for its client above this much unsent


class ClientWriter:
    """Writes an answer to the client. For a budgeted answer (the watchdog finishes its upstream), a
    client that leaves does not end the relay at once: the rest is read and metered, so that it is
    charged, up to BUDGET_DRAIN_MAX_BYTES and --read-timeout; check_gone() then ends the exchange.
    """

    __slots__ = ("writer", "exchange", "gone", "drained")

    def __init__(self, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
        self.writer = writer
        self.exchange = exchange
        self.gone: ClientGone | None = None
        self.drained = 0

    def send_now(self, data: bytes) -> bool:
        """Hand data to the client's transport without waiting. Returns whether the client must be
        drained before more is sent. Raises ClientGone (see left)."""
        transport = self.writer.transport
        if self.gone is None and not transport.is_closing():
            transport.write(data)
            return transport.get_write_buffer_size() > CLIENT_WRITE_HIGH_BYTES
        self.left(self.gone or ClientGone("client went away"), data)
        return False

    async def write(self, data: bytes, watchdog: Watchdog | None = None) -> None:
        if self.gone is None:
            try:
                await write_client(self.writer, data, watchdog)
                return
            except ClientGone as exc:
                self.left(exc, data)
                return
        self.left(self.gone, data)

    def left(self, gone: ClientGone, data: bytes) -> None:
        """The client is gone and data was not sent: raise, unless the answer is budgeted, then
        count it until BUDGET_DRAIN_MAX_BYTES."""
        if not self.exchange.watchdog.finish_upstream:
            raise gone
        self.gone = gone
        self.drained += len(data)
        if self.drained > BUDGET_DRAIN_MAX_BYTES:
            raise gone

    def check_gone(self) -> None:
        if self.gone is not None:
            raise self.gone


class StreamRelay(asyncio.Protocol):
    """Relays a streamed answer's body from the upstream transport's own callbacks, as nginx does:
    each network read is decoded, metered, framed and handed to the client inside the callback that
    received it, with no StreamReader, task switch or coroutine chain between (one event loop turn
    per SSE event instead of two). It stands in for the connection's StreamReaderProtocol until the
    body ends, then hands the connection back, ready for the pool.

    The coroutine in run() only waits: for the end, for an error, or for a client that must drain
    (then the upstream is paused, as StreamWriter.drain() would slow it). Time limits stay with the
    Watchdog, which ends a silent upstream by setting an exception on its StreamReader and aborting
    it; connection_lost reads that exception back.
    """

    def __init__(
        self,
        exchange: Exchange,
        client: ClientWriter,
        conn: UpstreamConnection,
        resp: ResponseHead,
        meter: UsageMeter | None,
        stripper: SseUsageStripper | None,
        chunked: bool,
    ) -> None:
        self.exchange, self.client, self.conn = exchange, client, conn
        self.meter, self.stripper, self.chunked = meter, stripper, chunked
        self.body_kind = resp.body_kind
        self.remaining = resp.content_length  # of a body_kind "length" body
        self.decoder = ChunkedDecoder() if resp.body_kind == "chunked" else None
        self.pending = b""  # the client's head, when it waits to leave with the first body bytes
        self.ended = False
        self.error: BaseException | None = None
        self.must_drain = False
        self.wakeup: asyncio.Future[None] | None = None
        self.original: Any = None

    async def run(self) -> None:
        """Relay until the body ends. Raises UpstreamError (502, 504) or ClientGone."""
        reader, transport = self.conn.reader, self.conn.writer.transport
        try:
            while unread_bytes(reader) and not self.ended:  # what came with the head
                self.take(await reader.read(READ_CHUNK_BYTES))
        except (TimeoutError, ClientGone, ConnectionError, ssl.SSLError) as exc:
            self.end_of_stream(exc)
        if not self.ended and reader.at_eof():
            self.end_of_stream(reader.exception())
        self.raise_error()
        if self.ended:
            return
        watchdog = self.exchange.watchdog
        self.original = transport.get_protocol()
        transport.set_protocol(self)
        try:
            while True:
                if self.must_drain:
                    await self.drain_client(transport)
                watchdog.arm_upstream(self.conn)
                self.wakeup = asyncio.get_running_loop().create_future()
                await self.wakeup
                watchdog.disarm_upstream()
                self.raise_error()
                if self.ended:
                    return
        finally:
            watchdog.disarm_upstream()
            if transport.get_protocol() is self:
                transport.set_protocol(self.original)

    async def drain_client(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.ReadTransport, transport).pause_reading()
        try:
            await self.client.write(b"", self.exchange.watchdog)
        finally:
            self.must_drain = False
            if not transport.is_closing():
                cast(asyncio.ReadTransport, transport).resume_reading()

    def raise_error(self) -> None:
        if self.error is not None:
            self.conn.reusable = False
            raise self.error

    def wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # The transport's callbacks. None may raise: an error is kept for run() to raise.

    def data_received(self, data: bytes) -> None:
        self.exchange.watchdog.arm_upstream(self.conn)
        try:
            self.take(data)
        except (UpstreamError, ClientGone) as exc:
            self.error = exc
        if self.ended or self.error is not None or self.must_drain:
            self.wake()

    def eof_received(self) -> bool | None:
        self.end_of_stream(None)
        self.wake()
        return cast(bool | None, self.original.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.original.connection_lost(exc)  # so that the connection's StreamReader knows too
        if not self.ended:
            self.end_of_stream(self.conn.reader.exception() or exc)
        self.wake()

    def pause_writing(self) -> None:
        self.original.pause_writing()

    def resume_writing(self) -> None:
        self.original.resume_writing()

    def end_of_stream(self, exc: BaseException | None) -> None:
        """The upstream closed (or the Watchdog ended it, with exc)."""
        if self.ended or self.error is not None:
            return
        if isinstance(exc, TimeoutError):
            self.error = UpstreamError(
                504, "upstream went silent mid-body", "read_timeout_mid_body"
            )
        elif isinstance(exc, ClientGone):
            self.error = exc
        elif self.body_kind == "close" and exc is None:
            self.ended = True
        else:
            self.error = UpstreamError(502, "upstream connection broke mid-body", "reset_mid_body")

    def take(self, data: bytes) -> None:
        """One network read of the body: decode, meter, frame, send. Raises UpstreamError (broken
        framing) or ClientGone."""
        if not data:
            return
        if self.decoder is not None:
            try:
                piece = self.decoder.feed(data)
            except FramingError:
                raise UpstreamError(502, "upstream broke its chunked framing", "protocol") from None
            if self.decoder.done:
                self.ended = True
                if self.decoder.leftover:  # more than one answer's worth: not to be trusted again
                    self.conn.reusable = False
        elif self.body_kind == "length":
            piece = data[: self.remaining]
            self.remaining -= len(piece)
            if len(data) > len(piece):
                self.conn.reusable = False
            self.ended = not self.remaining
        else:
            piece = data
        if piece:
            self.send(piece)
        if self.decoder is not None and self.decoder.error is not None:
            raise UpstreamError(502, "upstream broke its chunked framing", "protocol")

    def send(self, piece: bytes) -> None:
        exchange = self.exchange
        if self.meter:
            self.meter.feed(piece)
        if self.stripper:
            piece = self.stripper.feed(piece)
            if not piece:
                return
        if self.chunked:
            piece = encode_chunk(piece)
        exchange.bytes_out += len(piece)
        if self.pending:
            piece, self.pending = self.pending + piece, b""
            exchange.mark_first_byte()
        if self.client.send_now(piece):
            self.must_drain = True


@contextlib.contextmanager
def open_stream(state: ServerState, claims: TokenClaims, exchange: Exchange) -> Iterator[None]:
    """While an answer streams or a WebSocket session lasts: counted in the metrics, and registered
    under its chain and every ancestor's, so that revoking any of them ends it (end_chain_streams).
    """
    state.metrics.streams_open += 1
    for cid in claims.chains:
        state.streams.setdefault(cid, set()).add(exchange)
    try:
        yield
    finally:
        state.metrics.streams_open -= 1
        for cid in claims.chains:
            streams = state.streams.get(cid)
            if streams is not None:
                streams.discard(exchange)
                if not streams:
                    del state.streams[cid]


async def send_rest_of_body(
    conn: UpstreamConnection, body: RequestBody, chunked: bool, watchdog: Watchdog
) -> int:
    """Stream the rest of a request body upstream piece by piece as it arrives. Returns its size."""
    assert body.rest is not None
    size = 0
    async for piece in body.rest:
        if body.inspect is not None:
            body.inspect(piece)
        size += len(piece)
        conn.writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece)
        await drain_upstream(conn, watchdog)
    if chunked:
        conn.writer.write(b"0\r\n\r\n")
    await drain_upstream(conn, watchdog)
    return size


async def drain_upstream(conn: UpstreamConnection, watchdog: Watchdog) -> None:
    """Wait until the upstream takes what was written, within --read-timeout."""
    watchdog.arm_upstream(conn)
    try:
        await conn.writer.drain()
    except TimeoutError:  # drain() raises what the watchdog set on the connection's reader
        raise UpstreamError(
            504, "The upstream stopped taking the request body.", "write_timeout"
        ) from None
    finally:
        watchdog.disarm_upstream()


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    activity: list[float],
    moved: list[int],
) -> None:
    """Copy bytes one way until EOF or an error; `activity` holds the time of the last byte, `moved`
    the count."""
    try:
        while piece := await reader.read(READ_CHUNK_BYTES):
            activity[0] = time.monotonic()
            moved[0] += len(piece)
            writer.write(piece)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, RuntimeError):
        pass


async def tunnel_websocket(
    state: ServerState,
    exchange: Exchange,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """The Realtime API: make the upstream handshake with the real key, relay the 101, then move
    bytes both ways without parsing frames until either side closes, goes idle or the session is too
    long.

    Returns False: the client connection is never reused. Raises ApiError/UpstreamError before the
    101.
    """
    head, claims = exchange.forwarded()
    upstream_path, cors = exchange.upstream_path, exchange.cors_head
    exchange.upstream_started = time.monotonic()
    conn = await state.pool.connect()
    exchange.upstream = conn
    try:
        conn.writer.write(upstream_handshake(head, upstream_path, claims, state.config.upstream))
        try:
            resp = await read_response_head(conn, head.method, exchange.watchdog, upgrade=True)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise upstream_reset(exc) from None
        exchange.status = resp.status
        note_request_id(exchange, resp)
        if (
            resp.status != 101
        ):  # a refusal: relay it like any answer, less what the handshake sent upstream
            data = b"".join(
                [piece async for piece in read_upstream_body(conn, resp, exchange.watchdog)]
            )
            resp = dataclasses.replace(
                resp,
                body_kind="length",
                content_length=len(data),
                headers=tuple((n, v) for n, v in resp.headers if n.lower() not in WEBSOCKET_DROP),
            )
            exchange.mark_first_byte()
            await write_client(
                writer,
                build_client_head(
                    resp, AnswerPlan("length", False, False, True), cors, claims.key.encode("ascii")
                )
                + data,
            )
            return False
        exchange.mark_first_byte()
        switching = build_switching_head(
            resp, offered_subprotocols(head), cors, claims.key.encode("ascii")
        )
        exchange.bytes_out = len(switching)
        await write_client(writer, switching)
        with open_stream(state, claims, exchange):
            await relay_frames(state, exchange, reader, writer, conn, claims)
        return False
    finally:
        conn.abort()
        exchange.upstream = None
        exchange.upstream_s = time.monotonic() - exchange.upstream_started


async def relay_frames(
    state: ServerState,
    exchange: Exchange,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: UpstreamConnection,
    claims: TokenClaims,
) -> None:
    """Move a WebSocket session's bytes both ways until either side closes, it goes idle past
    --read-timeout, it lasts WEBSOCKET_MAX_S, or its token is revoked or expires."""
    activity, sent_up, sent_down = [time.monotonic()], [0], [0]
    tasks = {
        asyncio.create_task(pipe(reader, conn.writer, activity, sent_up)),
        asyncio.create_task(pipe(conn.reader, writer, activity, sent_down)),
    }
    deadline = time.monotonic() + WEBSOCKET_MAX_S
    try:
        while True:
            done, _ = await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            now = time.monotonic()
            if done or now - activity[0] > state.config.read_timeout_s or now > deadline:
                break
            # A session lives no longer than its token: revoked or expired ends it.
            if state.revoked.chain_revoked(claims) or claims.exp <= time.time():
                log.info(
                    "closing a WebSocket session: its token jti=%s was revoked or expired",
                    claims.jti,
                )
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        exchange.bytes_in, exchange.bytes_out = sent_up[0], exchange.bytes_out + sent_down[0]


# 7. TLS: PEM files in, SSL contexts out.


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for Certbot's fullchain.pem + privkey.pem: TLS 1.2+, ALPN http/1.1.

    Raises ConfigError with one line when the pair cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS pair {cert_file} + {key_file}: "
            f"{describe_error(exc)}; check the files --cert-dir, --domain or "
            "--cert/--tls-key name"
        ) from None
    return context


CERT_CHECK_INTERVAL_S = 5.0  # SPEC.md: a renewed pair is in use within 10 s
NOT_TRIED = object()


def pair_fingerprint(cert_file: str, key_file: str) -> tuple[tuple[int, int, int], ...] | None:
    """What identifies the files now on disk (through Certbot's symlinks); None if one
    is missing."""
    try:
        return tuple(
            (st.st_ino, st.st_size, st.st_mtime_ns)
            for st in (os.stat(cert_file), os.stat(key_file))
        )
    except OSError:
        return None


def certificate_serial(cert_file: str) -> str:
    """The serial of the first certificate in a PEM file, for log lines."""
    from cryptography import x509  # noqa: PLC0415 - only TLS serving reads certificates (issue #17)

    try:
        return format(
            x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).serial_number, "x"
        )
    except (OSError, ValueError):
        return "?"


class CertReloader:
    """Serves the newest loadable certificate pair without a restart.

    The listening socket keeps one front context whose SNI callback (OpenSSL calls it for every
    ClientHello, with or without SNI) hands each new handshake the current pair's context; open
    connections keep the one they started with. A pair that does not load (Certbot swaps its
    symlinks one at a time, so a renewal can be seen half done) keeps the old one and is tried
    again.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.current = server_ssl_context(cert_file, key_file)
        self.loaded = pair_fingerprint(cert_file, key_file)
        self.failed: object = (
            NOT_TRIED  # fingerprint of the last pair that did not load, to log it once
        )
        self.front = server_ssl_context(cert_file, key_file)
        self.front.sni_callback = self.pick_context
        log.info("TLS certificate serial %s from %s", certificate_serial(cert_file), cert_file)

    def pick_context(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        ssl_object.context = self.current

    def reload(self, force: bool = False) -> bool:
        """Load the pair again if it changed on disk (or always, when forced). Returns whether it
        was swapped."""
        seen = pair_fingerprint(self.cert_file, self.key_file)
        if not force and (seen == self.loaded or seen == self.failed):
            return False
        try:
            context = server_ssl_context(self.cert_file, self.key_file)
        except ConfigError as exc:
            if seen != self.failed or force:
                log.warning(
                    "keeping the current certificate: the new pair does not load (%s); will retry",
                    exc,
                )
            self.failed = seen
            return False
        self.current, self.loaded, self.failed = context, seen, NOT_TRIED
        log.info("TLS certificate reloaded: serial %s", certificate_serial(self.cert_file))
        return True

    async def watch(self) -> None:
        """Poll the files; SIGHUP calls reload() directly."""
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL_S)
            self.reload()


def upstream_ssl_context(cafile: str | None) -> ssl.SSLContext:
    """A verifying client context: hostname checked, certifi's bundle unless --upstream-ca names
    another."""
    if not cafile:
        import certifi  # noqa: PLC0415 - not even imported when --upstream-ca names a file (#17)

        cafile = certifi.where()
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--upstream-ca: cannot load the CA file {cafile}: {describe_error(exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def write_selfsigned(directory: str, host: str, now: datetime.datetime) -> None:
    """Write a self-signed development pair in Certbot's layout (cert, chain, fullchain, privkey).

    The certificate names `host`, localhost, 127.0.0.1 and ::1.
    """
    # Certificate making is for `soakp selfsigned` only: a server never loads it (issue #17).
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([host, "localhost"])]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    try:
        names.insert(0, x509.IPAddress(ipaddress.ip_address(host)))
        names = [n for n in names if not (isinstance(n, x509.DNSName) and n.value == host)]
    except ValueError:
        pass
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path = out / "privkey.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    for name in ("cert.pem", "fullchain.pem"):
        (out / name).write_bytes(cert_pem)
    (out / "chain.pem").write_bytes(b"")


# 8. Server: sockets in, one request at a time per connection; every error becomes a response here.

ADMIN_BODY_LIMIT_BYTES = 64 * 1024
ADMIN_FAILURES_ALLOWED = (
    5  # SPEC.md: 5 failed Basic attempts within a minute lock the address for a minute
)
ADMIN_FAILURE_WINDOW_S = 60.0
ADMIN_LOCKOUT_S = 60.0
ADMIN_TRACKED_ADDRESSES = 10000
REGISTRY_POLL_S = 0.5  # SPEC.md: a `soakp revoke` is honoured within 2 s; this leaves a wide margin
REGISTRY_PRUNE_S = 3600.0


CORS_ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_EXPOSED_HEADERS = (
    "x-request-id, openai-processing-ms, openai-organization, openai-project, openai-version, "
    "x-ratelimit-limit-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-requests, "
    "x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, x-ratelimit-reset-tokens, "
    "retry-after"
)
CORS_MAX_AGE_S = 600
REQUEST_HEADERS_LIST_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+\-.^_`|~, \t]{0,2048}\Z")

# OpenAI's top-level resources, so that metric labels stay a bounded set whatever paths clients
# send.
METRIC_RESOURCES = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chat",
        "completions",
        "containers",
        "conversations",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "models",
        "moderations",
        "organization",
        "realtime",
        "responses",
        "threads",
        "uploads",
        "vector_stores",
        "videos",
    }
)
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class Histogram:
    """A Prometheus histogram with fixed buckets."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds

    def render(self, name: str, labels: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {running}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {running}")
        return lines


def prom_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(slots=True)
class Metrics:
    """Counters for /metrics; plain dicts and ints updated once per request."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)
    first_byte: dict[str, Histogram] = field(default_factory=dict)
    upstream_errors: dict[str, int] = field(default_factory=dict)
    tokens_used: dict[tuple[str, str], int] = field(default_factory=dict)
    streams_open: int = 0
    client_disconnects: int = 0

    def record(self, exchange: Exchange, elapsed_s: float) -> None:
        key = (exchange.route, f"{exchange.status // 100}xx" if exchange.status else "none")
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(exchange.route, Histogram()).observe(elapsed_s)
        if exchange.first_byte_s is not None:
            self.first_byte.setdefault(exchange.route, Histogram()).observe(exchange.first_byte_s)
        if exchange.error_kind == "client_gone":
            self.client_disconnects += 1
        elif exchange.error_kind is not None:
            self.upstream_errors[exchange.error_kind] = (
                self.upstream_errors.get(exchange.error_kind, 0) + 1
            )
        if exchange.usage is not None and exchange.claims is not None:
            for kind, count in zip(("prompt", "completion"), exchange.usage, strict=True):
                key = (exchange.claims.sub, kind)
                self.tokens_used[key] = self.tokens_used.get(key, 0) + count

    def render(self, connections: int) -> str:
        lines = [
            "# HELP soakp_requests_total Requests answered, by route and status class.",
            "# TYPE soakp_requests_total counter",
        ]
        lines += [
            f'soakp_requests_total{{route="{route}",status="{status}"}} {n}'
            for (route, status), n in sorted(self.requests.items())
        ]
        for name, what, histograms in (
            (
                "soakp_request_duration_seconds",
                "Time from request head to the end of the response.",
                self.latency,
            ),
            (
                "soakp_time_to_first_byte_seconds",
                "Time from request head to the first response byte.",
                self.first_byte,
            ),
        ):
            lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"]
            for route, histogram in sorted(histograms.items()):
                lines += histogram.render(name, f'route="{route}"')
        lines += [
            "# HELP soakp_upstream_errors_total Upstream failures, by kind.",
            "# TYPE soakp_upstream_errors_total counter",
        ]
        lines += [
            f'soakp_upstream_errors_total{{kind="{k}"}} {n}'
            for k, n in sorted(self.upstream_errors.items())
        ]
        lines += [
            "# HELP soakp_client_disconnects_total Requests whose client left before the answer "
            "was complete.",
            "# TYPE soakp_client_disconnects_total counter",
            f"soakp_client_disconnects_total {self.client_disconnects}",
        ]
        lines += [
            "# HELP soakp_open_connections Client connections open now.",
            "# TYPE soakp_open_connections gauge",
            f"soakp_open_connections {connections}",
            "# HELP soakp_open_streams Responses being streamed now.",
            "# TYPE soakp_open_streams gauge",
            f"soakp_open_streams {self.streams_open}",
            "# HELP soakp_tokens_used_total OpenAI tokens used, from the upstream's usage, "
            "by token sub.",
            "# TYPE soakp_tokens_used_total counter",
        ]
        lines += [
            f'soakp_tokens_used_total{{sub="{prom_label(sub)}",kind="{kind}"}} {n}'
            for (sub, kind), n in sorted(self.tokens_used.items())
        ]
        return "\n".join(lines) + "\n"


@dataclass(slots=True)
class ServerState:
    """Everything the running server shares across connections. Created by serve(), passed down."""

    config: Config
    keyring: dict[str, SecretKeys]
    tokens: TokenCache
    pool: UpstreamPool
    registry: RegistryWorker
    revoked: Revocations  # shared with `tokens`
    spent: dict[str, int]  # cid -> prompt + completion tokens recorded, for budgets
    shared: SharedStore | None = None  # --redis: state shared with other instances
    reserved: dict[str, int] = field(
        default_factory=dict
    )  # cid -> output tokens promised to requests in flight
    streams: dict[str, set[Exchange]] = field(
        default_factory=dict
    )  # cid -> its answers still streaming
    cors_origins: frozenset[str] = frozenset()
    rate: RateLimiter = field(default_factory=RateLimiter)
    usage: dict[str, UsageDelta] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    access: AccessLog = field(default_factory=lambda: AccessLog(None))
    connections: set[asyncio.StreamWriter] = field(default_factory=set)
    busy: set[asyncio.StreamWriter] = field(default_factory=set)
    admin_failures: dict[str, list[float]] = field(default_factory=dict)
    admin_locked_until: dict[str, float] = field(default_factory=dict)
    request_counter: itertools.count = field(default_factory=itertools.count)
    shutting_down: bool = False

    @property
    def current_keys(self) -> SecretKeys:
        return next(iter(self.keyring.values()))


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


STATUS_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def plain_response(
    status: int,
    body: bytes,
    content_type: str | None,
    keep_alive: bool,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A complete response SOAKP makes itself."""
    lines = [f"HTTP/1.1 {status} {STATUS_REASONS.get(status, 'Unknown')}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if status != 204:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_response(
    status: int, payload: Any, keep_alive: bool, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    return plain_response(status, json_bytes(payload), "application/json", keep_alive, headers)


def error_response(
    exc: ApiError, keep_alive: bool, extra_headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """Render any SOAKP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    payload = {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
    }
    return json_response(exc.status, payload, keep_alive, [*exc.headers, *extra_headers])


def bearer_token(head: RequestHead) -> str:
    """The token from `Authorization: Bearer ...`. Raises ApiError(401)."""
    value = head.header(b"authorization")
    if value is None:
        raise invalid_token(
            "Missing bearer token: send your SOAKP token as 'Authorization: Bearer <token>'."
        )
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise invalid_token("The Authorization header must be 'Bearer <token>'.")
    return token.strip().decode("latin-1")


def websocket_token(head: RequestHead) -> str:
    """A WebSocket client's token: `Authorization: Bearer`, or the subprotocol browsers use
    for it."""
    if head.header(b"authorization") is not None:
        return bearer_token(head)
    for protocol in offered_subprotocols(head):
        if protocol.startswith(WEBSOCKET_KEY_PROTOCOL):
            return protocol[len(WEBSOCKET_KEY_PROTOCOL) :]
    raise invalid_token(
        "Missing token: send 'Authorization: Bearer <token>' or the subprotocol "
        f"'{WEBSOCKET_KEY_PROTOCOL}<token>'."
    )


def check_admin(state: ServerState, head: RequestHead, peer: str, now: float) -> None:
    """HTTP Basic for the admin endpoints, compared in constant time, with a lockout after repeated
    failures.

    Raises ApiError: 404 when no admin credentials are configured, 429 while locked out, 401 on
    failure.
    """
    config = state.config
    if config.admin_user is None or config.admin_pass is None:
        raise ApiError(404, "Not found.", "not_found")
    locked_until = state.admin_locked_until.get(peer, 0.0)
    if locked_until > now:
        raise ApiError(
            429,
            "Too many failed admin logins from this address; try again later.",
            "rate_limit_exceeded",
            headers=[("Retry-After", str(math.ceil(locked_until - now)))],
        )
    value = head.header(b"authorization")
    if value is None:
        # Asking without credentials is how a browser learns it must log in (the console's page does
        # it for each endpoint it calls): not a guess, so it does not count towards the lockout.
        raise ApiError(
            401,
            "Admin login required: send HTTP Basic credentials (--admin-user / --admin-pass).",
            "invalid_admin_credentials",
            headers=[("WWW-Authenticate", 'Basic realm="soakp"')],
        )
    scheme, _, encoded = value.partition(b" ")
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        user, sep, password = b"", b"", b""
    user_ok = hmac.compare_digest(user, config.admin_user.encode("utf-8"))
    pass_ok = hmac.compare_digest(password, config.admin_pass.encode("utf-8"))
    if scheme.lower() == b"basic" and sep and user_ok & pass_ok:
        state.admin_failures.pop(peer, None)
        return
    failures = [
        t for t in state.admin_failures.get(peer, ()) if now - t < ADMIN_FAILURE_WINDOW_S
    ] + [now]
    if len(state.admin_failures) >= ADMIN_TRACKED_ADDRESSES and peer not in state.admin_failures:
        del state.admin_failures[next(iter(state.admin_failures))]
    state.admin_failures[peer] = failures
    if len(failures) >= ADMIN_FAILURES_ALLOWED:
        if len(state.admin_locked_until) >= ADMIN_TRACKED_ADDRESSES:
            state.admin_locked_until = {
                p: t for p, t in state.admin_locked_until.items() if t > now
            }
        state.admin_locked_until[peer] = now + ADMIN_LOCKOUT_S
        del state.admin_failures[peer]
        log.warning(
            "admin login failed %d times from %s: locked out for %.0fs",
            len(failures),
            peer,
            ADMIN_LOCKOUT_S,
        )
    else:
        log.warning("admin login failed from %s", peer)
    raise ApiError(
        401,
        "Wrong admin user or password."
        if value
        else "Admin credentials are required: send the admin user and password (HTTP Basic).",
        "invalid_admin_credentials",
        headers=[("WWW-Authenticate", 'Basic realm="soakp"')],
    )


async def check_admin_everywhere(state: ServerState, head: RequestHead, peer: str) -> None:
    """check_admin(), with --redis also counting failures and locking out across the instances (each
    instance's own count while Redis is unreachable)."""
    shared = state.shared
    if shared is None or state.config.admin_user is None:
        return check_admin(state, head, peer, time.monotonic())
    args = (peer, ADMIN_FAILURES_ALLOWED, ADMIN_FAILURE_WINDOW_S, ADMIN_LOCKOUT_S)
    with contextlib.suppress(StoreDown):
        locked_ms = await shared.admin("check", *args)
        if locked_ms > 0:
            raise ApiError(
                429,
                "Too many failed admin logins from this address; try again later.",
                "rate_limit_exceeded",
                headers=[("Retry-After", str(math.ceil(locked_ms / 1000)))],
            )
    try:
        check_admin(state, head, peer, time.monotonic())
    except ApiError as exc:
        if exc.status == 401:
            with contextlib.suppress(StoreDown):
                if await shared.admin("fail", *args) >= ADMIN_FAILURES_ALLOWED:
                    log.warning(
                        "admin logins failed %d times from %s across the instances: "
                        "locked out for %.0fs",
                        ADMIN_FAILURES_ALLOWED,
                        peer,
                        ADMIN_LOCKOUT_S,
                    )
        raise
    with contextlib.suppress(StoreDown):
        await shared.admin("ok", *args)
    return None


async def read_json_body(
    reader: asyncio.StreamReader, head: RequestHead, config: Config, exchange: Exchange
) -> dict[str, Any]:
    """Read and parse a small JSON object body (admin endpoints). Raises ApiError 400 or 413."""
    if head.body_kind == "length" and head.content_length > ADMIN_BODY_LIMIT_BYTES:
        raise ApiError(413, "The request body is too large.", "request_too_large")
    data = b""
    if head.body_kind != "none":
        data = await read_whole(
            read_request_body(reader, head, ADMIN_BODY_LIMIT_BYTES, exchange.watchdog),
            ADMIN_BODY_LIMIT_BYTES,
            "The request body",
        )
    exchange.body_consumed = True
    exchange.bytes_in = len(data)
    try:
        fields = json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The body must be a JSON object.") from None
    if not isinstance(fields, dict):
        raise bad_request("The body must be a JSON object.")
    return fields


def token_reply(minted: MintedToken) -> dict[str, Any]:
    return {
        "status": 201,
        "message": "JWT added",
        "data": {"jwt": minted.token, "jti": minted.jti, "expires_at": minted.expires_at},
    }


async def issue_token(state: ServerState, grant: Grant) -> MintedToken:
    """Mint with the current secret and register the new token."""
    keys = state.current_keys
    now = int(time.time())
    minted = new_token(keys, grant, now)
    parent = grant.ancestors[-1].cid if grant.ancestors else None
    limits = chain_limits(grant)
    await state.registry.call(
        state.registry.registry.register, minted, grant.sub, keys.kid, now, limits, parent
    )
    if state.shared is not None:
        args = state.shared.chain_args(minted, grant.sub, now, limits, parent)
        await state.shared.register(minted.cid, args)
    log.info(
        "minted jti=%s cid=%s sub=%s kid=%s expires_at=%d renew_until=%d",
        minted.jti,
        minted.cid,
        safe_for_log(grant.sub),
        keys.kid,
        minted.expires_at,
        minted.renew_until,
    )
    return minted


def end_chain_streams(state: ServerState, cids: Sequence[str]) -> None:
    """Cut the answers and WebSocket sessions still streaming for revoked chains: the upstream
    connection is reset, so the client sees a truncated answer (SPEC.md: within the revocation
    delay)."""
    for cid in cids:
        for exchange in list(state.streams.get(cid, ())):
            log.info("ending a stream of revoked chain cid=%s", cid)
            exchange.revoked = True
            if exchange.upstream is not None:
                exchange.upstream.abort()


async def revoke_chain(state: ServerState, cid: str, renew_until: int) -> int:
    """Revoke a whole chain at once in memory, then durably. Returns revoked_at."""
    state.revoked.chains[cid] = renew_until
    end_chain_streams(state, [cid])
    revoked_at = await state.registry.call(
        state.registry.registry.revoke_chain, cid, renew_until, int(time.time())
    )
    log.info("revoked cid=%s", safe_label(cid))
    if state.shared is not None and await state.shared.revoke(f"c:{cid}", renew_until) is None:
        raise ApiError(
            503,
            "Revoked on this instance, but the store shared with the other "
            "instances is unreachable: they learn of it when it is back (SOAKP "
            "keeps retrying). Send the request again to confirm.",
            "store_unavailable",
            headers=[("Retry-After", "1")],
        )
    return revoked_at


async def handle_admin(
    state: ServerState,
    reader: asyncio.StreamReader,
    head: RequestHead,
    exchange: Exchange,
    peer: str,
) -> tuple[int, bytes, str]:
    """The admin endpoints, behind HTTP Basic. Returns (status, body, content type)."""
    await check_admin_everywhere(state, head, peer)
    config = state.config
    if head.path in CONSOLE_ASSETS:
        exchange.body_consumed = head.body_kind == "none"
        content_type, asset = CONSOLE_ASSETS[head.path]
        return 200, asset, content_type
    if head.path in ("/jwt/generate", "/get-jwt"):
        fields = await read_json_body(reader, head, config, exchange)
        minted = await issue_token(
            state, parse_grant(fields, config.token_ttl_s, config.max_token_ttl_s)
        )
        return 201, json_bytes(token_reply(minted)), "application/json"
    if head.path == "/jwt/revoke":
        fields = await read_json_body(reader, head, config, exchange)
        cid, renew_until = await revocation_target(state, fields)
        revoked_at = await revoke_chain(state, cid, renew_until)
        return (
            200,
            json_bytes(
                {
                    "status": 200,
                    "message": "JWT revoked",
                    "data": {"cid": cid, "revoked_at": revoked_at},
                }
            ),
            "application/json",
        )
    exchange.body_consumed = head.body_kind == "none"
    await flush_usage(state)
    rows = None
    if state.shared is not None:
        with contextlib.suppress(StoreDown):
            await state.shared.send_pending()
            rows = await state.shared.list()
    if head.path == "/jwt":
        if rows is None:  # no --redis, or Redis unreachable: this instance's registry
            rows = await state.registry.call(state.registry.registry.list)
        return 200, json_bytes({"data": rows}), "application/json"
    metrics = (
        state.metrics
        if rows is None
        else dataclasses.replace(state.metrics, tokens_used=sub_usage(rows))
    )
    text = metrics.render(len(state.connections)) + store_metrics(state)
    return 200, text.encode("utf-8"), "text/plain; version=0.0.4"


async def revocation_target(state: ServerState, fields: Mapping[str, Any]) -> tuple[str, int]:
    """The chain (cid, renew-until) that a revoke request names by `jti`, `cid` or a whole `jwt`.

    A token's text proves itself, so it may be revoked here even if this registry never saw it; an
    id this registry does not know is a 404. Raises ApiError 400 or 404.
    """
    named = [name for name in ("jti", "cid", "jwt") if fields.get(name) is not None]
    if len(named) != 1 or set(fields) - {"jti", "cid", "jwt"}:
        raise bad_request('Send one of {"jti": "..."}, {"cid": "..."} or {"jwt": "..."}.')
    value = fields[named[0]]
    if named[0] == "jwt":
        if not isinstance(value, str):
            raise bad_request("'jwt' must be a string.", param="jwt")
        try:
            claims = verify_token(value, state.keyring, time.time(), allow_expired=True)
        except ApiError:
            raise bad_request("'jwt' is not a valid token of this server.", param="jwt") from None
        return claims.cid, claims.rexp
    if not isinstance(value, str) or not TOKEN_ID_RE.match(value):
        raise bad_request(f"'{named[0]}' is not a token id.", param=named[0])
    chain = await state.registry.call(state.registry.registry.chain_of, value)
    if chain is None and state.shared is not None:
        try:
            chain = await state.shared.chain_of(value)
        except StoreDown:
            raise store_unavailable("the tokens minted by other instances") from None
    if chain is None:
        raise ApiError(
            404,
            f"No token or chain with {named[0]} {value!r} is known here; nothing was revoked. "
            'Send the whole token as {"jwt": "..."} to revoke one minted elsewhere.',
            "token_not_found",
            param=named[0],
        )
    return chain


async def handle_refresh(
    state: ServerState, reader: asyncio.StreamReader, head: RequestHead, exchange: Exchange
) -> tuple[int, bytes, str]:
    """POST /jwt/refresh: the next token of the same chain; the presented one is revoked.

    The chain keeps its id, renew-until time, limits, usage, budget and place in the rate limit, so
    refreshing is never a way around them; a refresh counts as a request against `rpm`.
    """
    claims = state.tokens.verify(bearer_token(head), time.time())
    exchange.claims = claims
    await read_json_body(reader, head, state.config, exchange)
    now = time.time()
    claims = state.tokens.verify(
        bearer_token(head), now
    )  # again: a concurrent refresh may have won
    if now >= claims.rexp:
        raise invalid_token(
            "This token can no longer be refreshed: its chain's renew-until time has passed "
            "(mint a new one, with a longer renew_ttl if needed)."
        )
    check_origin(claims, head)
    await check_budget(state, claims, reserved_too=False)
    await take_rate(state, claims, now)
    claims = state.tokens.verify(bearer_token(head), time.time())  # the checks above may wait
    state.revoked.tokens[claims.jti] = (
        claims.exp
    )  # at once, before any await: one refresh per token wins
    shared = state.shared
    if shared is not None and await shared.revoke(f"t:{claims.jti}", claims.exp) is False:
        raise invalid_token("The token has been revoked.")  # another instance refreshed it first
    minted = await issue_token(state, claims.regrant(state.config.max_token_ttl_s))
    await state.registry.call(
        state.registry.registry.revoke_token, claims.jti, claims.cid, claims.exp, int(now)
    )
    return 201, json_bytes(token_reply(minted)), "application/json"


async def handle_delegate(
    state: ServerState, reader: asyncio.StreamReader, head: RequestHead, exchange: Exchange
) -> tuple[int, bytes, str]:
    """POST /jwt/delegate: a child token for the presented one, every limit within its own (SPEC.md,
    Delegation). The child carries the parent's key, sealed again for the child's jti; the holder of
    the parent never sees it. Minting counts as a request against the parent's `rpm`."""
    parent = state.tokens.verify(bearer_token(head), time.time())
    exchange.claims = parent
    fields = await read_json_body(reader, head, state.config, exchange)
    now = time.time()
    parent = state.tokens.verify(bearer_token(head), now)
    check_origin(parent, head)
    left = await check_budget(state, parent, reserved_too=False) if parent.budgets else None
    grant = delegate_grant(
        parent, fields, state.config.token_ttl_s, state.config.max_token_ttl_s, int(now), left
    )
    await take_rate(state, parent, now)
    minted = await issue_token(state, grant)
    return 201, json_bytes(token_reply(minted)), "application/json"


def upstream_path_for(path: str) -> str | None:
    """The /v1/... path a proxied request goes to, or None when the path is not proxied."""
    if path.startswith("/v1/"):
        return path
    if path.startswith("/openai/"):
        return "/v1/" + path[len("/openai/") :]
    return None


def metric_route(upstream_path: str) -> str:
    resource = upstream_path[4:].split("/", 1)[0]
    return "/v1/" + resource if resource in METRIC_RESOURCES else "/v1/other"


ADMIN_ROUTES = {
    "/jwt/generate": "POST",
    "/get-jwt": "POST",
    "/jwt/revoke": "POST",
    "/jwt": "GET",
    "/metrics": "GET",
    # the console's page and assets, CONSOLE_ASSETS
    "/admin": "GET",
    CONSOLE_PATH: "GET",
    "/admin/console.js": "GET",
    "/admin/console.css": "GET",
    "/admin/icon.svg": "GET",
}
# On every admin answer: the console's page may run only its own script and style and talk only to
# its own origin (the admin endpoints), nothing may frame it, and neither it nor a token is cached.
ADMIN_RESPONSE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
)


def allowed_cors_origin(state: ServerState, head: RequestHead) -> str | None:
    """The request's Origin when --cors-origins lets it read responses, else None."""
    if not state.cors_origins:
        return None
    origin = head.header(b"origin")
    if origin is None:
        return None
    text = origin.decode("latin-1")
    return text if "*" in state.cors_origins or text.lower() in state.cors_origins else None


def allow_cors(exchange: Exchange, origin: str) -> None:
    """Let the page at origin read every answer to this request, errors included."""
    exchange.cors = (
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Expose-Headers", CORS_EXPOSED_HEADERS),
        ("Vary", "Origin"),
    )
    exchange.cors_head = "".join(f"{n}: {v}\r\n" for n, v in exchange.cors).encode("latin-1")


def preflight_response(state: ServerState, head: RequestHead, origin: str | None) -> bytes:
    """Answer a CORS preflight itself: browsers send it without the token. Raises ApiError(403)."""
    if origin is None:
        raise ApiError(
            403,
            "This origin is not allowed to call SOAKP (see --cors-origins).",
            "origin_not_allowed",
        )
    requested = head.header(b"access-control-request-headers") or b"authorization, content-type"
    if not REQUEST_HEADERS_LIST_RE.match(requested):
        raise bad_request("Malformed Access-Control-Request-Headers.")
    headers = [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", CORS_ALLOWED_METHODS),
        ("Access-Control-Allow-Headers", requested.decode("latin-1")),
        ("Access-Control-Max-Age", str(CORS_MAX_AGE_S)),
        ("Vary", "Origin"),
    ]
    return plain_response(204, b"", None, head.keep_alive and head.body_kind == "none", headers)


def check_origin(claims: TokenClaims, head: RequestHead) -> None:
    """A browser's Origin must be one of the token's `origins`. Raises ApiError(403)."""
    origins = claims.permissions.origins
    if origins is not None:
        origin = head.header(b"origin")
        if origin is not None and origin.decode("latin-1").lower() not in origins:
            raise ApiError(
                403, "This token may not be used from this origin.", "origin_not_allowed"
            )


# Endpoints whose token usage is not reported in the answer: a budget could not be kept on them.
UNMETERED_PREFIXES = ("/v1/batches", "/v1/fine_tuning")


def check_permissions(
    state: ServerState, claims: TokenClaims, head: RequestHead, upstream_path: str
) -> None:
    """Enforce a token's paths, credential endpoints and origins before the body is read; the caller
    then awaits check_budget().

    Raises ApiError 403. The rate limit is taken later (take_rate), once every check has passed.
    """
    permissions = claims.permissions
    if permissions.paths is not None and not path_allowed(permissions.paths, upstream_path):
        raise ApiError(
            403, f"This token may not call {safe_label(upstream_path)}.", "path_not_allowed"
        )
    endpoint = credential_endpoint(upstream_path)
    if endpoint is not None and not credential_endpoint_opened(permissions.paths, endpoint):
        raise ApiError(
            403,
            f"{endpoint} hands out credentials or admin rights outside this token's limits; "
            f"it is open only to tokens whose paths name it (for example '{endpoint}*').",
            "credential_endpoint",
        )
    check_origin(claims, head)
    if claims.budgets:
        if any(pattern_matches(prefix + "*", upstream_path) for prefix in UNMETERED_PREFIXES):
            raise ApiError(
                403,
                f"A token with a budget (max_tokens_total) may not use {safe_label(upstream_path)}:"
                " its token usage is not reported in the answer, so it could not be counted.",
                "budget_unmetered_endpoint",
            )


# SPEC.md, Methods: what the OpenAI API uses; anything else, a lowercase spelling included, is a
# 501.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Listener:
    """What one listening socket serves: the proxy, the admin endpoints, or both (no
    --admin-listen)."""

    scheme: str  # "https" or "http": the Origin an admin page served here has
    proxy: bool = True
    admin: bool = True


def is_admin_path(path: str) -> bool:
    return path in ADMIN_ROUTES or path == "/admin" or path.startswith("/admin/")


def check_admin_request(head: RequestHead, listener: Listener) -> None:
    """An admin request must come from no browser page but its own: an `Origin` other than this
    request's own `scheme://Host` is a 403, and a POST must say it is JSON (a cross-site form or a
    `text/plain` fetch cannot). Raises ApiError 403 or 415."""
    origin = head.header(b"origin")
    if origin is not None:
        host = head.header(b"host") or b""
        own = listener.scheme.encode("ascii") + b"://" + host.strip().lower()
        if origin.strip().lower() != own:
            raise ApiError(
                403,
                "Admin endpoints do not answer requests from other origins.",
                "origin_not_allowed",
            )
    if (
        head.method == "POST"
        and ADMIN_ROUTES.get(head.path) == "POST"
        and media_type(head.header(b"content-type")) != b"application/json"
    ):
        raise ApiError(
            415,
            "Admin requests must send 'Content-Type: application/json'.",
            "unsupported_media_type",
        )


async def handle_request(
    state: ServerState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    exchange: Exchange,
    peer: str,
    listener: Listener,
) -> bool:
    """Route one request and answer it. Returns whether the connection may carry another request."""
    if state.shutting_down:
        raise ApiError(
            503, "SOAKP is shutting down.", "shutting_down", headers=[("Retry-After", "1")]
        )
    path = head.path
    if is_admin_path(path):
        # Admin answers never carry CORS headers: no other page may read them.
        if not listener.admin:
            raise not_found(path)
        check_admin_request(head, listener)
    else:
        origin = allowed_cors_origin(state, head)
        if origin is not None:
            allow_cors(exchange, origin)
        if (
            head.method == "OPTIONS"
            and head.header(b"access-control-request-method") is not None
            and listener.proxy
        ):
            exchange.route, exchange.status = "preflight", 204
            await write_client(writer, preflight_response(state, head, origin))
            return head.keep_alive and head.body_kind == "none"
        upstream_path = upstream_path_for(path)
        if upstream_path is not None and listener.proxy:
            exchange.upstream_path = upstream_path
            return await handle_proxied(state, reader, writer, head, exchange)
    exchange.route = (
        path
        if path in ADMIN_ROUTES or path in ("/healthz", "/jwt/refresh", "/jwt/delegate")
        else "other"
    )
    if path == "/healthz":
        if head.method not in ("GET", "HEAD"):
            raise method_not_allowed("GET, HEAD")
        store = store_health(state)
        health: dict[str, Any] = {"status": "ok"}
        if store is not None:
            health = {"status": "ok" if store["redis"] == "up" else "degraded", "store": store}
        status, body, content_type = 200, json_bytes(health), "application/json"
    elif path == "/jwt/refresh" and listener.proxy:
        if head.method != "POST":
            raise method_not_allowed("POST")
        status, body, content_type = await handle_refresh(state, reader, head, exchange)
    elif path == "/jwt/delegate" and listener.proxy:
        if head.method != "POST":
            raise method_not_allowed("POST")
        status, body, content_type = await handle_delegate(state, reader, head, exchange)
    elif path in ADMIN_ROUTES:
        if head.method != ADMIN_ROUTES[path]:
            raise method_not_allowed(ADMIN_ROUTES[path])
        status, body, content_type = await handle_admin(state, reader, head, exchange, peer)
    else:
        raise not_found(path)
    keep_alive = head.keep_alive and (exchange.body_consumed or head.body_kind == "none")
    exchange.status = status
    extra_headers = exchange.cors
    if path in ADMIN_ROUTES:
        extra_headers = (*exchange.cors, *ADMIN_RESPONSE_HEADERS)
    response = plain_response(status, body, content_type, keep_alive, extra_headers)
    await write_client(
        writer, response[: len(response) - len(body)] if head.method == "HEAD" else response
    )
    exchange.bytes_out = len(response)
    return keep_alive


def not_found(path: str) -> ApiError:
    return ApiError(
        404,
        f"Unknown path {safe_for_log(path)!r}: SOAKP forwards /v1/... and /openai/....",
        "not_found",
    )


async def handle_proxied(
    state: ServerState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    exchange: Exchange,
) -> bool:
    """A /v1/... request: the token, its limits, then forwarding or the WebSocket tunnel."""
    upstream_path = exchange.upstream_path
    exchange.route = metric_route(upstream_path)
    if head.method not in FORWARDED_METHODS:
        raise ApiError(
            501,
            f"The method {safe_for_log(head.method)!r} is not forwarded: SOAKP forwards "
            "GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS.",
            "method_not_supported",
        )
    now = time.time()
    websocket = is_websocket_upgrade(head)
    claims = state.tokens.verify(websocket_token(head) if websocket else bearer_token(head), now)
    exchange.claims = claims
    # Usage is spent when an answer is made (POST); fetching a stored one later must not count it
    # again.
    exchange.metered = head.method == "POST"
    record_use(state, claims, int(now))
    check_permissions(state, claims, head, upstream_path)
    if not reserved_later(state, head, upstream_path):
        await check_budget(state, claims)
    if websocket:
        if head.body_kind != "none":
            raise bad_request("A WebSocket handshake has no body.")
        if claims.budgets:
            raise ApiError(
                403,
                "A token with a budget (max_tokens_total) may not open WebSocket sessions: "
                "their token usage is not reported to SOAKP.",
                "budget_unmetered_endpoint",
            )
        exchange.model = websocket_model(claims, upstream_path, head.query)
        await take_rate(state, claims, now)
        return await tunnel_websocket(state, exchange, reader, writer)
    if head.body_kind == "length" and head.content_length > state.config.max_body_bytes:
        raise ApiError(
            413,
            f"The request body is over the limit of {state.config.max_body_bytes} bytes.",
            "request_too_large",
        )
    return await forward(state, exchange, reader, writer)


def method_not_allowed(allowed: str) -> ApiError:
    return ApiError(405, "Method not allowed.", "method_not_allowed", headers=[("Allow", allowed)])


def usage_delta(state: ServerState, claims: TokenClaims) -> UsageDelta:
    delta = state.usage.get(claims.cid)
    if delta is None:
        delta = state.usage[claims.cid] = UsageDelta(
            claims.jti, claims.sub, claims.kid, claims.iat, claims.exp, claims.rexp
        )
    return delta


def record_use(state: ServerState, claims: TokenClaims, now: int) -> None:
    """Count a request against its chain, in memory; flush_usage() writes the batch."""
    delta = usage_delta(state, claims)
    delta.requests += 1
    delta.last_used_at = now


def record_outcome(state: ServerState, exchange: Exchange) -> None:
    """After a proxied request: its tokens and errors against the chain, and its budget reservation
    settled by what it really spent."""
    claims = exchange.claims
    if claims is None:
        return
    delta = usage_delta(state, claims)
    if (
        exchange.status >= 400
        or exchange.status == 0
        or exchange.error_kind not in (None, "client_gone")
    ):
        delta.errors += 1  # an error status, or an answer the upstream broke off
    if exchange.reserved and exchange.reservation is None:
        for cid, _ in claims.budgets:
            left = state.reserved.get(cid, 0) - exchange.reserved
            if left > 0:
                state.reserved[cid] = left
            else:
                state.reserved.pop(cid, None)
    exchange.reserved = 0
    usage = exchange.usage
    if usage is None and exchange.estimate is not None and 200 <= exchange.status < 300:
        usage = (
            exchange.estimate
        )  # the upstream reported nothing: charge what it may have cost at most
        log.info(
            "no usage reported for a budgeted request of cid=%s: charged an estimate of %d tokens",
            claims.cid,
            sum(usage),
        )
    if usage is not None:
        prompt, completion = usage
        for (
            ancestor
        ) in claims.ancestors:  # a child's usage shows in, and is charged to, every ancestor
            upper = state.usage.get(ancestor.cid)
            if upper is None:
                upper = state.usage[ancestor.cid] = UsageDelta(
                    None, None, None, None, claims.exp, claims.rexp
                )
            upper.prompt_tokens += prompt
            upper.completion_tokens += completion
        for cid in claims.chains:
            state.spent[cid] = state.spent.get(cid, 0) + prompt + completion
        delta.prompt_tokens += prompt
        delta.completion_tokens += completion
    if state.shared is not None and (exchange.reservation or usage and claims.budgets):
        state.shared.settle(
            claims.budgets, exchange.reservation or "", sum(usage or ()), claims.rexp + KEEP_AFTER_S
        )
    exchange.reservation = None


async def flush_usage(state: ServerState) -> None:
    """Write the usage batch in one transaction, off the event loop."""
    if not state.usage:
        return
    batch, state.usage = state.usage, {}
    if state.shared is not None:  # sent by keep_shared_state(), at most SHARED_POLL_S later
        state.shared.add_usage(batch)
    try:
        await state.registry.call(
            state.registry.registry.add_usage, [d.row(cid) for cid, d in batch.items()]
        )
    except sqlite3.Error as exc:
        log.warning("could not record token usage (%s); will retry", exc)
        for cid, delta in batch.items():  # merge back, so nothing is lost
            kept = state.usage.setdefault(
                cid,
                dataclasses.replace(
                    delta, requests=0, prompt_tokens=0, completion_tokens=0, errors=0
                ),
            )
            kept.requests += delta.requests
            kept.prompt_tokens += delta.prompt_tokens
            kept.completion_tokens += delta.completion_tokens
            kept.errors += delta.errors
            kept.last_used_at = max(kept.last_used_at, delta.last_used_at)


async def keep_registry(state: ServerState) -> None:
    """Background: flush usage, pick up revocations made by other processes, prune expired rows."""
    registry = state.registry.registry
    version = await state.registry.call(registry.data_version)
    next_prune = time.monotonic() + REGISTRY_PRUNE_S
    while True:
        await asyncio.sleep(REGISTRY_POLL_S)
        try:
            # Revocations first: a usage write that has to wait for the database must not delay
            # them.
            now_version = await state.registry.call(registry.data_version)
            if now_version != version:
                version = now_version
                stored = await state.registry.call(registry.revocations, int(time.time()))
                new_chains = [cid for cid in stored.chains if cid not in state.revoked.chains]
                state.revoked.chains.update(stored.chains)
                state.revoked.tokens.update(stored.tokens)
                end_chain_streams(state, new_chains)
            await flush_usage(state)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + REGISTRY_PRUNE_S
                now = int(time.time())
                pruned = await state.registry.call(registry.prune, now)
                state.revoked.forget_before(now)
                state.rate.prune(time.time())
                if pruned:
                    log.info(
                        "pruned %s past their renew-until time from the registry",
                        plural(pruned, "token chain"),
                    )
        except sqlite3.Error as exc:
            log.warning("token registry error: %s", exc)


def learn_revocations(state: ServerState, found: Revocations) -> None:
    """Add revocations learnt from Redis to the set every request checks; end the revoked chains'
    streams."""
    new_chains = [cid for cid in found.chains if cid not in state.revoked.chains]
    state.revoked.chains.update(found.chains)
    state.revoked.tokens.update(found.tokens)
    end_chain_streams(state, new_chains)


async def keep_shared_state(state: ServerState) -> None:
    """Background, with --redis: every SHARED_POLL_S check the revocation set's version (the
    backstop for pub/sub, which loses messages while disconnected) and send what waits; while Redis
    is down, probe it. The revocation set stays trusted for --redis-stale-after after the last check
    that reached Redis."""
    shared = state.shared
    assert shared is not None
    next_renewal = time.monotonic() + RESERVATION_RENEW_S
    while True:
        try:
            if not shared.up:
                await asyncio.wait_for(shared.client.ping(), STORE_TIMEOUT_S)
                shared.up = True
                log.warning(
                    "Redis is reachable again: revocations, rpm, budgets and lock-out are "
                    "shared again"
                )
            found = await shared.sync_revocations(state.revoked)
            state.revoked.fresh_until = shared.synced_at + state.config.redis_stale_after_s
            if found is not None:
                learn_revocations(state, found)
            await shared.send_pending()
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + RESERVATION_RENEW_S
                await shared.renew_leases()
                now = time.time()
                over = shared.over_limit_until
                shared.over_limit_until = {cid: until for cid, until in over.items() if until > now}
        except StoreDown:
            pass
        except (*shared.errors, TimeoutError, OSError) as exc:  # type: ignore[misc]
            shared.mark_down(exc)
        await asyncio.sleep(SHARED_POLL_S)


async def listen_revocations(state: ServerState) -> None:
    """Background, with --redis: revocations made on other instances, by pub/sub, as they happen."""
    shared = state.shared
    assert shared is not None
    while True:
        try:
            async with shared.subscriber.pubsub() as pubsub:
                await asyncio.wait_for(pubsub.subscribe(REVOCATIONS_CHANNEL), STORE_TIMEOUT_S)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and isinstance(message.get("data"), str):
                        member, _, until = message["data"].partition(" ")
                        if until.isdigit():
                            learn_revocations(state, parse_revocation_set([(member, float(until))]))
        except (*shared.errors, TimeoutError, OSError):  # type: ignore[misc]
            await asyncio.sleep(SHARED_POLL_S)  # the version check covers what is missed meanwhile


def sub_usage(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """Tokens used by each `sub`, from every instance's chain rows: a chain's own use, less its
    children's (which its row includes), as soakp_tokens_used_total counts it on one instance."""
    own = {row["cid"]: [row["prompt_tokens"], row["completion_tokens"]] for row in rows}
    for row in rows:
        if row.get("parent") in own:
            parent = own[row["parent"]]
            parent[0] -= row["prompt_tokens"]
            parent[1] -= row["completion_tokens"]
    totals: dict[tuple[str, str], int] = {}
    for row in rows:
        for kind, count in zip(("prompt", "completion"), own[row["cid"]], strict=True):
            if count > 0:
                key = (row["sub"] or "", kind)
                totals[key] = totals.get(key, 0) + count
    return totals


def store_health(state: ServerState) -> dict[str, Any] | None:
    """What /healthz says about the shared store: up or down, and what each state does now."""
    shared = state.shared
    if shared is None:
        return None
    age_s = max(0.0, time.time() - shared.synced_at)
    fallback = "per-instance"
    return {
        "redis": "up" if shared.up else "down",
        "revocations": "shared"
        if shared.up
        else "stale"
        if time.time() > state.revoked.fresh_until
        else f"last known set, {age_s:.0f}s old",
        "rpm": "shared" if shared.up else fallback,
        "budgets": "shared" if shared.up else fallback if state.config.budget_fail_open else "503",
        "admin_lockout": "shared" if shared.up else fallback,
    }


def store_metrics(state: ServerState) -> str:
    if state.shared is None:
        return ""
    return (
        "# HELP soakp_store_up Whether the Redis shared by the instances answers (1) or the "
        "fallbacks are in use (0).\n# TYPE soakp_store_up gauge\n"
        f'soakp_store_up{{store="redis"}} {int(state.shared.up)}\n'
    )


LINGER_BYTES = 1024 * 1024
LINGER_S = 1.0


async def answer_error(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    exc: ApiError,
    keep_alive: bool,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> int:
    """Send an error response. When the connection is to close with request bytes possibly unread,
    read and discard a little first, so the client receives the answer instead of a reset. Returns
    bytes sent."""
    response = error_response(exc, keep_alive, extra_headers)
    try:
        await write_client(writer, response)
        if not keep_alive:
            discarded = 0
            deadline = time.monotonic() + LINGER_S
            while discarded < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                piece = await bounded(reader.read(READ_CHUNK_BYTES), left)
                if not piece:
                    break
                discarded += len(piece)
    except (ClientGone, ConnectionError, TimeoutError, asyncio.LimitOverrunError):
        pass
    return len(response)


json_string = json.encoder.encode_basestring_ascii  # C-accelerated: a str as a JSON string literal


def json_text(value: str | None) -> str:
    return "null" if value is None else json_string(value)


def json_ms(seconds: float | None) -> str:
    return "null" if seconds is None else repr(round(seconds * 1000, 2))


@functools.lru_cache(maxsize=2)
def utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def access_log_line(
    state: ServerState,
    exchange: Exchange,
    peer: str,
    head: RequestHead | None,
    elapsed_s: float,
    now: float,
) -> str:
    """One JSON line per request: safe to ship anywhere (never the key, a token or a body).

    Written out by hand rather than with json.dumps(dict): it runs for every request, and this way
    costs a third as much.
    """
    claims = exchange.claims
    request_id = exchange.request_id or f"soakp-{next(state.request_counter)}"
    line = (
        f'{{"time":"{utc_second(int(now))}.{int(now % 1 * 1000):03d}+00:00",'
        f'"request_id":{json_string(request_id)},'
        f'"client":{json_string(peer)},"method":{json_text(head.method if head else None)},'
        f'"path":{json_text(safe_for_log(head.path) if head else None)},"status":{exchange.status},'
        f'"bytes_in":{exchange.bytes_in},"bytes_out":{exchange.bytes_out},"duration_ms":{json_ms(elapsed_s)},'
        f'"upstream_ms":{json_ms(exchange.upstream_s if exchange.upstream_started else None)},'
        f'"ttfb_ms":{json_ms(exchange.first_byte_s)},'
        f'"sub":{json_text(claims.sub if claims else None)},'
        f'"jti":{json_text(claims.jti if claims else None)},"model":{json_text(exchange.model)}'
    )
    if exchange.usage is not None:
        prompt, completion = exchange.usage
        line += f',"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}'
    if exchange.error_kind:
        line += f',"error":{json_string(exchange.error_kind)}'
    return line + "}"


ACCESS_LOG_FLUSH_S = 0.05
ACCESS_LOG_MAX_LINES = 256


class AccessLog:
    """The access log: one JSON object per line on stderr, written in small batches, since a write
    and a flush per request would cost more CPU than proxying the request. Lines wait at most 50 ms.
    """

    def __init__(self, stream: Any | None) -> None:
        self.stream = stream  # None: the log is off (--log-level warning or error)
        self.lines: list[str] = []
        self.handle: asyncio.TimerHandle | None = None

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= ACCESS_LOG_MAX_LINES:
            self.flush()
        elif self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(ACCESS_LOG_FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.lines and self.stream is not None:
            text = "\n".join(self.lines) + "\n"
            self.lines.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone (closed pipe): the proxy keeps serving
                pass


def finish_exchange(state: ServerState, exchange: Exchange, peer: str) -> None:
    """Account for one request: metrics, usage and the access log line."""
    elapsed_s = time.monotonic() - exchange.started
    record_outcome(state, exchange)
    state.metrics.record(exchange, elapsed_s)
    if state.access.stream is not None:
        line = access_log_line(state, exchange, peer, exchange.head, elapsed_s, time.time())
        state.access.add(line)


async def answer_failure(
    state: ServerState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    exchange: Exchange,
    exc: ApiError | UpstreamError,
    peer: str,
) -> bool | None:
    """Answer a request that failed with SOAKP's own error, or the upstream's failure as a 502/504;
    after the answer started, an upstream failure can only cut it short. Returns whether the
    connection may carry another request, None when it must close at once."""
    if isinstance(exc, UpstreamError):
        exchange.error_kind = exc.kind
        if exchange.response_started:
            log.warning(
                "%s %s %s: upstream failed mid-response: %s",
                peer,
                head.method,
                safe_for_log(head.path),
                exc,
            )
            return None
        log.warning("upstream error: %s", exc)
        exc = ApiError(exc.status, str(exc), "upstream_error")
    exchange.status = exc.status
    keep_alive = (
        head.keep_alive
        and not state.shutting_down
        and (exchange.body_consumed or head.body_kind == "none")
    )
    exchange.bytes_out = await answer_error(reader, writer, exc, keep_alive, exchange.cors)
    return keep_alive


@dataclass(slots=True)
class Turn:
    """The request a connection is serving, if any: what the catch-all answers and logs."""

    exchange: Exchange | None = None


async def handle_connection(
    state: ServerState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    listener: Listener,
) -> None:
    """Serve one client connection: request after request until either side closes.

    The one place that catches everything: an unexpected error is logged and answered with 500 if no
    response byte went out, otherwise the connection is closed.
    """
    config = state.config
    peername = writer.get_extra_info("peername")
    peer = peername[0] if isinstance(peername, tuple) else "unix"
    state.connections.add(writer)
    turn = Turn()
    watchdog = Watchdog(reader, writer.transport, config.header_timeout_s, config.read_timeout_s)
    try:
        if len(state.connections) > config.max_connections:
            overloaded = ApiError(
                503,
                "SOAKP is at its connection limit; try again.",
                "overloaded",
                headers=[("Retry-After", "1")],
            )
            await answer_error(reader, writer, overloaded, False)
            return
        while await serve_request(state, reader, writer, watchdog, peer, listener, turn):
            pass
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s", peer)
        if turn.exchange is not None and not turn.exchange.response_started:
            turn.exchange.status = 500
            internal = ApiError(500, "Internal error in SOAKP.", "internal_error")
            await answer_error(reader, writer, internal, False)
    finally:
        watchdog.close()
        if turn.exchange is not None:
            finish_exchange(state, turn.exchange, peer)
        state.connections.discard(writer)
        state.busy.discard(writer)
        writer.close()


async def serve_request(
    state: ServerState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    watchdog: Watchdog,
    peer: str,
    listener: Listener,
    turn: Turn,
) -> bool:
    """Read one request head, answer the request, log it. Returns whether to read another."""
    watchdog.arm_client()
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return False
    except asyncio.LimitOverrunError:
        watchdog.disarm_client()
        turn.exchange = Exchange(started=time.monotonic(), watchdog=watchdog, status=431)
        too_large = bad_request("The request head is too large.", 431)
        turn.exchange.bytes_out = await answer_error(reader, writer, too_large, False)
        return False
    watchdog.disarm_client()
    exchange = turn.exchange = Exchange(started=time.monotonic(), watchdog=watchdog)
    state.busy.add(writer)
    try:
        head = exchange.head = parse_request_head(raw)
    except ApiError as exc:
        exchange.status = exc.status
        exchange.bytes_out = await answer_error(reader, writer, exc, keep_alive=False)
        return False
    try:
        keep_alive = await handle_request(state, reader, writer, head, exchange, peer, listener)
    except (ApiError, UpstreamError) as exc:
        answered = await answer_failure(state, reader, writer, head, exchange, exc, peer)
        if answered is None:
            return False
        keep_alive = answered
    except ClientGone:
        exchange.error_kind = exchange.error_kind or "client_gone"
        return False
    finally:
        state.busy.discard(writer)
        if exchange.upstream is not None:
            exchange.upstream.abort()
    finish_exchange(state, exchange, peer)
    turn.exchange = None
    return keep_alive and not state.shutting_down


def build_state(config: Config) -> ServerState:
    """Everything serve() shares across connections. Raises ConfigError (CA file, database)."""
    keyring = build_keyring(config.secret, config.old_secrets)
    upstream_tls = upstream_ssl_context(config.upstream_ca) if config.upstream.tls else None
    registry = TokenRegistry(config.db)
    now = int(time.time())
    pruned = registry.prune(now)
    if pruned:
        log.info(
            "pruned %s past their renew-until time from the registry", plural(pruned, "token chain")
        )
    revoked = registry.revocations(now)
    spent = registry.spent(now)
    return ServerState(
        config=config,
        keyring=keyring,
        tokens=TokenCache(keyring, revoked),
        pool=UpstreamPool(config.upstream, upstream_tls, config.connect_timeout_s),
        registry=RegistryWorker(registry),
        revoked=revoked,
        spent=spent,
        cors_origins=frozenset(o.lower() for o in config.cors_origins),
        access=AccessLog(sys.stderr if config.log_level in ("debug", "info") else None),
    )


TLS_READ_BUFFER_BYTES = 64 * 1024  # four TLS records (RFC 8446 §5.1) per socket read
FDS_PER_CONNECTION = 2  # the client's socket and, while it is forwarded, the upstream's


def share_tls_read_buffer(protocol_class: type) -> None:
    """Give every asyncio TLS connection one shared landing buffer for socket reads.

    The buffer only carries bytes from recv_into() to the TLS object's incoming BIO within one
    synchronous callback (get_buffer, recv_into, buffer_updated), so on the one event loop thread
    no two connections ever use it at once. A buffer per connection cost 16 KiB of resident memory
    per held stream at one record's size, and at four records' size (fewer reads and syscalls for
    large downloads) it would cost 64 KiB; shared, it costs 64 KiB in all. A class that does not
    look like CPython 3.11-3.13's SSLProtocol is left alone (uvloop has its own).
    """
    original_init = protocol_class.__init__  # type: ignore[misc]
    if getattr(original_init, "shares_read_buffer", False) or not hasattr(
        protocol_class, "get_buffer"
    ):
        return
    protocol_class.max_size = TLS_READ_BUFFER_BYTES  # type: ignore[attr-defined]
    shared = bytearray(TLS_READ_BUFFER_BYTES)
    shared_view = memoryview(shared)

    @functools.wraps(original_init)
    def init_sharing_the_buffer(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if isinstance(getattr(self, "_ssl_buffer", None), bytearray):
            self._ssl_buffer, self._ssl_buffer_view = shared, shared_view

    init_sharing_the_buffer.shares_read_buffer = True  # type: ignore[attr-defined]
    protocol_class.__init__ = init_sharing_the_buffer  # type: ignore[misc]


def tune_process(config: Config) -> None:
    """Fit the process to many concurrent streams.

    asyncio's TLS layer gives every connection a zero-filled read buffer of SSLProtocol.max_size
    (256 KiB in CPython 3.11 to 3.13): 1,000 streams over TLS held 250 MiB of zeros. See
    share_tls_read_buffer. And every connection needs file descriptors: raise the soft limit
    towards the hard one, as nginx's worker_rlimit_nofile does, so that --max-connections is
    reachable.
    """
    share_tls_read_buffer(asyncio.sslproto.SSLProtocol)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.max_connections * FDS_PER_CONNECTION + 64
    if soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError):
            new_soft = soft
        if new_soft < config.max_connections + 64:
            log.warning(
                "only %d file descriptors: fewer than --max-connections %d needs; "
                "raise `ulimit -n`",
                new_soft,
                config.max_connections,
            )


def release_start_up_memory() -> None:
    """Give the kernel back the heap that start-up used and freed: compiling soakp.py when no .pyc
    could be read or written (a read-only install, PYTHONDONTWRITEBYTECODE) leaves ~8 MiB free in
    the middle of glibc's heap, which free() never returns and only malloc_trim() does (issue #17).
    A no-op elsewhere than on glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415 - once per process, only to reach glibc's malloc_trim()

    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # musl has none
    if malloc_trim is not None:
        malloc_trim(0)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


TLS_HANDSHAKE_RECORD = 0x16  # RFC 8446 §5.1: ContentType handshake, a TLS client's first byte
PLAIN_HTTP_LINGER_S = 2.0  # how long a plain-HTTP client on the TLS port may take to read our 400
LISTEN_BACKLOG = 1024


async def peek_first_byte(transport: asyncio.BaseTransport, timeout_s: float) -> int | None:
    """The first byte the client sent, left unread in the socket; None if it closed or timed out.

    The transport is paused, so asyncio reads nothing meanwhile; the peek goes through a duplicate
    descriptor because the loop refuses a reader on a descriptor a transport owns.
    """
    loop = asyncio.get_running_loop()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        dup.setblocking(False)
        readable = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(dup.fileno(), wake)
        try:
            await asyncio.wait_for(readable, timeout_s)
            data = dup.recv(1, socket.MSG_PEEK)
        except (asyncio.TimeoutError, OSError):
            return None
        finally:
            loop.remove_reader(dup.fileno())
    finally:
        dup.close()
    return data[0] if data else None


class PlainHttpRefusal(asyncio.Protocol):
    """A plain-HTTP client on the TLS port: answer 400 in plain HTTP (as nginx does), then read and
    drop what it sends until it closes or PLAIN_HTTP_LINGER_S pass, so that a reset does not destroy
    the answer before the client read it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        message = (
            "This port speaks HTTPS, and the request came as plain HTTP: use an https:// "
            "URL (with curl, https://; with an SDK, base_url='https://...')."
        )
        transport.write(error_response(ApiError(400, message, "https_required"), keep_alive=False))
        self.closer = asyncio.get_running_loop().call_later(PLAIN_HTTP_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closer.cancel()


class TlsOrPlainSniffer(asyncio.Protocol):
    """The TLS listener's first protocol on each connection: looks at the first byte before any TLS.

    A TLS handshake record goes on to loop.start_tls and the usual stream handler; anything else
    is a plain-HTTP request on the HTTPS port and gets PlainHttpRefusal, with one log line.
    """

    def __init__(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        context: ssl.SSLContext,
        handshake_timeout_s: float,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self.handler = handler
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Pause on the next turn of the loop, not now: the transport starts reading in a callback
        # queued after this one, and before Python 3.11.3 it did so even when paused here (the
        # client's first bytes were then read into this protocol and lost). Pausing later also
        # cancels a read the loop already queued, so the bytes stay in the socket either way.
        asyncio.get_running_loop().call_soon(self.pause_and_sniff, transport)

    def pause_and_sniff(self, transport: asyncio.Transport) -> None:
        if transport.is_closing():
            return
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.sniff(transport))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def sniff(self, transport: asyncio.Transport) -> None:
        first = await peek_first_byte(transport, self.handshake_timeout_s)
        if first is None:
            transport.close()
            return
        if first != TLS_HANDSHAKE_RECORD:
            peer = transport.get_extra_info("peername")
            log.warning(
                "plain HTTP request from %s on the HTTPS port: answered 400 (it needs https://)",
                peer[0] if isinstance(peer, tuple) else "unix",
            )
            transport.set_protocol(PlainHttpRefusal(transport))
            transport.resume_reading()
            return
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader, self.handler)
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport,
                protocol,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout_s,
            )
        except (
            OSError,
            asyncio.TimeoutError,
        ) as exc:  # SSLError is an OSError; it closed the socket
            log.debug("TLS handshake failed: %s", describe_error(exc))
            return
        assert tls_transport is not None  # start_tls raises rather than return None on a server
        protocol.connection_made(tls_transport)  # start_tls leaves that call to the caller


async def start_listener(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    handshake_timeout_s: float,
) -> asyncio.AbstractServer:
    """asyncio.start_server(), but a TLS listener answers plain HTTP with a plain-HTTP 400.

    On asyncio's own loops only: the sniffer needs the loop to read nothing before connection_made
    returns, which uvloop does not promise, so under uvloop the TLS port stays TLS-only as before.
    """
    loop = asyncio.get_running_loop()
    if context is None or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return await asyncio.start_server(
            handler,
            host,
            port,
            ssl=context,
            limit=MAX_HEAD_BYTES,
            backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=handshake_timeout_s if context else None,
        )
    tasks: set[asyncio.Task[None]] = set()
    return await loop.create_server(
        lambda: TlsOrPlainSniffer(handler, context, handshake_timeout_s, tasks),
        host,
        port,
        backlog=LISTEN_BACKLOG,
    )


def log_start_notes(config: Config, keyring: Mapping[str, SecretKeys]) -> None:
    """Settings SOAKP corrected or ignored, and the secrets it uses by kid (the name each token
    carries in its header), so that a rotation can be checked from the start-up log."""
    for warning in config.warnings:
        log.warning("%s", warning)
    kids = list(keyring)
    log.info("signing tokens with the secret kid=%s", kids[0])
    if len(kids) > 1:
        log.info(
            "also accepting tokens of %s (--old-secrets): kid=%s",
            plural(len(kids) - 1, "old secret"),
            ", kid=".join(kids[1:]),
        )


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run the proxy until `stop` is set or SIGTERM/SIGINT arrives; then drain and return 0.

    Raises ConfigError when the certificate, database or listen address cannot be used.
    """
    state = build_state(config)
    if config.redis_url:
        state.shared = await open_shared_store(config)
    certs = (
        CertReloader(config.cert_file, config.key_file)
        if config.cert_file and config.key_file
        else None
    )
    tune_process(config)
    stop = stop or asyncio.Event()
    handle_signals(stop, certs)
    servers = await start_listeners(state, certs.front if certs else None)
    background = [asyncio.create_task(keep_registry(state))]
    if state.shared is not None:
        background += [
            asyncio.create_task(keep_shared_state(state)),
            asyncio.create_task(listen_revocations(state)),
        ]
    if certs:
        background.append(asyncio.create_task(certs.watch()))
    log_start_notes(config, state.keyring)
    release_start_up_memory()
    if not certs and not is_loopback(config.listen_host):
        log.warning(
            "serving plain HTTP on a non-loopback address: tokens cross the network unencrypted; "
            "give --cert-dir, --domain or --cert/--key"
        )
    if not config.upstream.tls:
        log.warning("the upstream is plain http://: the OpenAI key crosses the network unencrypted")
    try:
        await stop.wait()
        await shut_down(state, servers, background)
    finally:
        for server in servers:
            server.close()
    log.info("stopped")
    return 0


def handle_signals(stop: asyncio.Event, certs: CertReloader | None) -> None:
    """SIGTERM and SIGINT stop the server; SIGHUP reloads the certificate, and never kills the
    server (systemd's ExecReload sends it): without TLS it only logs."""
    loop = asyncio.get_running_loop()
    handlers = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (
            signal.SIGHUP,
            (lambda: certs.reload(force=True))
            if certs
            else (lambda: log.info("SIGHUP: no certificate to reload (serving plain HTTP)")),
        ),
    ]
    for signum, handler in handlers:
        try:
            loop.add_signal_handler(signum, handler)
        except (
            NotImplementedError,
            RuntimeError,
        ):  # not the main thread (tests) or no signals (Windows)
            pass


async def start_listeners(
    state: ServerState, server_tls: ssl.SSLContext | None
) -> list[asyncio.AbstractServer]:
    """The main listener and, with --admin-listen, the admin one; logs where each listens.

    Raises ConfigError naming the option whose address cannot be used.
    """
    config = state.config
    scheme = "https" if server_tls else "http"
    addresses = [
        (
            (config.listen_host, config.listen_port),
            Listener(scheme, admin=config.admin_listen is None),
        )
    ]
    if config.admin_listen is not None:
        addresses.append((config.admin_listen, Listener(scheme, proxy=False)))
    servers: list[asyncio.AbstractServer] = []
    try:
        for (host, port), listener in addresses:
            servers.append(
                await start_listener(
                    functools.partial(handle_connection, state, listener=listener),
                    host,
                    port,
                    server_tls,
                    config.header_timeout_s,
                )
            )
    except OSError as exc:
        for server in servers:
            server.close()
        state.registry.close()
        option = (
            "--listen"
            if (host, port) == (config.listen_host, config.listen_port)
            else "--admin-listen"
        )
        raise ConfigError(
            f"{option}: cannot listen on {host}:{port}: {describe_error(exc)}"
        ) from None
    for server, (_, listener) in zip(servers, addresses, strict=True):
        for sock in server.sockets:  # type: ignore[attr-defined]
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            if listener.proxy:
                log.info(
                    "soakp %s listening on %s://%s:%d, forwarding to %s://%s%s",
                    __version__,
                    scheme,
                    shown,
                    port,
                    config.upstream.scheme,
                    config.upstream.host_header,
                    config.upstream.base_path,
                )
            else:
                log.info("admin endpoints listening on %s://%s:%d", scheme, shown, port)
    return servers


async def shut_down(
    state: ServerState,
    servers: Sequence[asyncio.AbstractServer],
    background: Sequence[asyncio.Task[Any]],
) -> None:
    """No new connections; in-flight requests and streams get --shutdown-grace to finish (a new
    request on an open connection gets 503); then everything is closed and the last usage written.
    """
    config = state.config
    log.info(
        "shutting down: no new connections, %d requests in flight get up to %.0fs",
        len(state.busy),
        config.shutdown_grace_s,
    )
    for server in servers:
        server.close()
    state.shutting_down = True
    deadline = time.monotonic() + config.shutdown_grace_s
    while state.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.busy:
        log.warning("shutdown grace over: closing %d unfinished requests", len(state.busy))
    for writer in list(state.connections):
        if writer in state.busy:
            writer.transport.abort()  # cut off: the grace is over
        else:
            writer.close()  # idle keep-alive connections get a clean close
    state.pool.close()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    state.access.flush()
    try:
        await flush_usage(state)
        if state.shared is not None:
            with contextlib.suppress(StoreDown):
                await state.shared.send_pending()
            await state.shared.close()
    finally:
        state.registry.close()


# The operator console at /admin: one page, its script, style and icon, served by handle_admin()
# behind the admin login, with ADMIN_RESPONSE_HEADERS. Plain HTML, CSS and JavaScript: no build
# step, no external asset, nothing but this file to ship. The script uses the admin endpoints only
# and turns server data into text nodes, never markup: a token's sub is whatever its minter chose.
# (Each constant is a raw string so the JavaScript's backslashes stay as written.)

CONSOLE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SOAKP console</title>
<link rel="icon" href="/admin/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/admin/console.css">
<script type="module" src="/admin/console.js"></script>
</head>
<body>
<a class="skip" href="#chains-title">Skip to the token chains</a>
<header class="topbar">
  <h1>SOAKP <span>console</span></h1>
  <p id="live-status" class="live-status" role="status" aria-live="polite">Loading…</p>
</header>
<main>
  <section class="live" aria-labelledby="live-title">
    <h2 id="live-title" class="visually-hidden">Live figures</h2>
    <dl class="figures">
      <div class="figure"><dt>Requests/s</dt><dd id="fig-rps">–</dd>
        <dd class="figure-note">proxied, last 5 s</dd>
        <dd class="figure-spark" id="fig-spark"></dd></div>
      <div class="figure"><dt>Error rate</dt><dd id="fig-errors">–</dd>
        <dd class="figure-note" id="fig-errors-note">last minute</dd></div>
      <div class="figure"><dt>Open streams</dt><dd id="fig-streams">–</dd>
        <dd class="figure-note">responses streaming now</dd></div>
      <div class="figure"><dt>Upstream errors</dt><dd id="fig-upstream">–</dd>
        <dd class="figure-note" id="fig-upstream-note">since start</dd></div>
      <div class="figure"><dt>Time to first byte</dt><dd id="fig-ttfb">–</dd>
        <dd class="figure-note" id="fig-ttfb-note">median, last minute</dd></div>
    </dl>
  </section>

  <section class="chains" aria-labelledby="chains-title">
    <div class="section-head">
      <h2 id="chains-title" tabindex="-1">Token chains</h2>
      <button type="button" id="mint-open" class="primary">Mint a token</button>
    </div>
    <form id="filters" class="filters" role="search">
      <label>Filter
        <input id="filter-text" type="search" placeholder="sub, id, path, model, origin"
               autocomplete="off" spellcheck="false"></label>
      <label>Status
        <select id="filter-status">
          <option value="all">All</option>
          <option value="active">Active</option>
          <option value="expired">Expired</option>
          <option value="revoked">Revoked</option>
        </select></label>
      <label>Sort by
        <select id="sort-key"></select></label>
      <button type="button" id="sort-dir" aria-label="Sort direction">↓ newest first</button>
      <p id="count" class="count" aria-live="polite"></p>
    </form>
    <div class="table-wrap">
      <table id="chains">
        <thead><tr id="chains-head"></tr></thead>
        <tbody id="chains-body"></tbody>
      </table>
    </div>
    <p id="empty" class="empty" hidden>No token chain matches.</p>
  </section>
</main>

<dialog id="mint-dialog" aria-labelledby="mint-title">
  <form id="mint-form" class="mint" novalidate>
    <h2 id="mint-title">Mint a token</h2>
    <p class="hint">The key goes to SOAKP's <code>/jwt/generate</code> only and is sealed into the
      token; this page keeps no copy. Empty fields are left out: no limit, or the server's
      default.</p>
    <div class="fields">
      <label class="wide"><span>OpenAI key <span class="required">(required)</span></span>
        <input name="key" type="password" required autocomplete="off" spellcheck="false"></label>
      <label>Label (sub)
        <input name="sub" autocomplete="off" placeholder="default"></label>
      <label>Lifetime (ttl)
        <input name="ttl" autocomplete="off" placeholder="server default, e.g. 12h"></label>
      <label>Renewable until (renew_ttl)
        <input name="renew_ttl" autocomplete="off" placeholder="e.g. 30d"></label>
      <label>Delegation depth (delegate)
        <input name="delegate" inputmode="numeric" autocomplete="off" placeholder="0"></label>
      <label class="wide">Paths
        <textarea name="paths" rows="2" spellcheck="false"
                  placeholder="/v1/chat/completions&#10;/v1/responses*"></textarea>
        <small>One per line or comma-separated; a <code>*</code> at the end matches everything
          below.</small></label>
      <label>Models
        <input name="models" autocomplete="off" spellcheck="false"
               placeholder="gpt-4o-mini, …"></label>
      <label>Origins
        <input name="origins" autocomplete="off" spellcheck="false"
               placeholder="https://app.example"></label>
      <label>Requests per minute (rpm)
        <input name="rpm" inputmode="numeric" autocomplete="off"></label>
      <label>Token budget (max_tokens_total)
        <input name="max_tokens_total" inputmode="numeric" autocomplete="off"></label>
      <label>Organization (org)
        <input name="org" autocomplete="off" spellcheck="false"></label>
      <label>Project
        <input name="project" autocomplete="off" spellcheck="false"></label>
    </div>
    <p id="mint-error" class="error" role="alert"></p>
    <div class="actions">
      <button type="button" id="mint-cancel">Cancel</button>
      <button type="submit" id="mint-submit" class="primary">Mint</button>
    </div>
  </form>
</dialog>

<dialog id="token-dialog" aria-labelledby="token-title">
  <div class="mint">
    <h2 id="token-title">Your new token</h2>
    <p class="hint">Copy it now: it is shown this once, and neither this page nor SOAKP keeps
      it.</p>
    <textarea id="token-value" rows="5" readonly spellcheck="false" aria-label="Token"></textarea>
    <p id="token-facts" class="hint"></p>
    <div class="actions">
      <button type="button" id="token-copy" class="primary">Copy</button>
      <button type="button" id="token-done">Done</button>
    </div>
  </div>
</dialog>

<dialog id="revoke-dialog" aria-labelledby="revoke-title">
  <div class="mint">
    <h2 id="revoke-title">Revoke this chain?</h2>
    <p id="revoke-text"></p>
    <p class="hint">Every token of the chain stops working within seconds. This cannot be
      undone.</p>
    <p id="revoke-error" class="error" role="alert"></p>
    <div class="actions">
      <button type="button" id="revoke-cancel">Cancel</button>
      <button type="button" id="revoke-confirm" class="danger">Revoke</button>
    </div>
  </div>
</dialog>
</body>
</html>
"""

CONSOLE_CSS = r""":root {
  color-scheme: light dark;
  --bg: #f4f5f7; --panel: #fff; --text: #1b1f24; --muted: #5d6670; --line: #dde1e6;
  --accent: #0b6e69; --accent-text: #fff; --danger: #b42318; --chip: #eef1f4;
  --ok-bg: #dcf4e6; --ok: #116b3a; --off-bg: #eceef1; --off: #4f5863; --bad-bg: #fde4e1;
  --bar: #14191f; --bar-text: #f2f4f6; --focus: #2f6fed; --on-danger: #fff;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111418; --panel: #1a1f25; --text: #e6e9ed; --muted: #9aa4ae; --line: #2c333b;
    --accent: #3fb8ae; --accent-text: #06201e; --danger: #f0776c; --chip: #242b33;
    --ok-bg: #17382a; --ok: #7fdca8; --off-bg: #262c33; --off: #aab3bc; --bad-bg: #432020;
    --bar: #0b0e11; --focus: #7aa5ff; --on-danger: #2a0a08;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); }
h1, h2 { margin: 0; line-height: 1.2; }
h2 { font-size: 1.15rem; }
code { font: .85em ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
button, input, select, textarea { font: inherit; color: inherit; }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
.visually-hidden {
  position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%);
  white-space: nowrap;
}
.skip { position: absolute; left: .5rem; top: -3rem; background: var(--panel); padding: .4rem .7rem;
  z-index: 2; }
.skip:focus { top: .5rem; }
.muted { color: var(--muted); }

.topbar { display: flex; flex-wrap: wrap; align-items: baseline; justify-content: space-between;
  gap: .25rem 1rem; padding: .8rem 1.5rem; background: var(--bar); color: var(--bar-text); }
.topbar h1 { font-size: 1.25rem; letter-spacing: .02em; }
.topbar h1 span { font-weight: 400; opacity: .7; }
.live-status { margin: 0; font-size: .9rem; opacity: .85; }
.live-status::before { content: ""; display: inline-block; width: .55rem; height: .55rem;
  border-radius: 50%; background: #3ccf7d; margin-right: .45rem; vertical-align: .05rem; }
.live-status.error { opacity: 1; color: #ffb4ab; }
.live-status.error::before { background: #ff6b5e; }

main { padding: 1.25rem 1.5rem 2rem; max-width: 100rem; margin: 0 auto; }
section + section { margin-top: 1.25rem; }

.figures { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: .75rem;
  margin: 0; }
.figure { background: var(--panel); border: 1px solid var(--line); border-radius: .6rem;
  padding: .7rem .9rem; min-width: 0; }
.figure dt { font-size: .8rem; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
.figure dd { margin: 0; font-size: 1.7rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.figure dd.figure-note { font-size: .8rem; font-weight: 400; color: var(--muted);
  min-height: 1.2rem; }
.figure dd.figure-spark { height: 1.5rem; margin-top: .2rem; }
.spark { display: block; width: 100%; height: 100%; overflow: visible; }
.spark polyline { fill: none; stroke: var(--accent); stroke-width: 1.5;
  vector-effect: non-scaling-stroke; }

.chains { background: var(--panel); border: 1px solid var(--line); border-radius: .6rem;
  padding: 1rem 1rem .5rem; }
.section-head { display: flex; justify-content: space-between; align-items: center; gap: 1rem; }
.filters { display: flex; flex-wrap: wrap; align-items: end; gap: .6rem 1rem;
  margin: .9rem 0 .6rem; }
.filters label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted);
  gap: .2rem; }
.filters input { width: 17rem; max-width: 100%; }
.filters input, .filters select, .mint input, .mint textarea {
  background: var(--bg); border: 1px solid var(--line); border-radius: .4rem; padding: .4rem .55rem;
  color: var(--text); font-size: .95rem; }
.filters select { padding: .4rem .4rem; }
.count { margin: 0 0 0 auto; color: var(--muted); font-size: .85rem; align-self: center; }

button { border: 1px solid var(--line); background: var(--panel); border-radius: .4rem;
  padding: .4rem .9rem; cursor: pointer; }
button:hover { border-color: var(--muted); }
button:disabled { opacity: .55; cursor: progress; }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-text);
  font-weight: 600; }
button.danger { color: var(--danger); border-color: currentColor; background: transparent; }
button.small { padding: .2rem .6rem; font-size: .85rem; }
#revoke-confirm { background: var(--danger); color: var(--on-danger); border-color: var(--danger);
  font-weight: 600; }

.table-wrap { overflow-x: auto; }
table { width: 100%; border-collapse: collapse; font-size: .9rem; }
th { text-align: left; font-size: .78rem; color: var(--muted); font-weight: 600;
  border-bottom: 2px solid var(--line); padding: .35rem .5rem; white-space: nowrap; }
th.num, td.num { text-align: right; }
td { border-bottom: 1px solid var(--line); padding: .55rem .5rem; vertical-align: top; }
tbody tr:hover { background: color-mix(in srgb, var(--chip) 60%, transparent); }
th .sort { all: unset; cursor: pointer; display: inline-flex; gap: .25rem; align-items: center; }
th .sort:focus-visible { outline: 3px solid var(--focus); }
th .arrow { font-size: .7rem; min-width: .7rem; }
td time, .token { display: flex; flex-direction: column; }
td time small, .budget-bar small, .id, td small.errors { color: var(--muted); font-size: .78rem; }
td small.errors { display: block; color: var(--danger); }
td time span, td time small { white-space: nowrap; }
td.c-sub { min-width: 10rem; max-width: 18rem; }
.who { font-weight: 600; overflow-wrap: anywhere; }
.id { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.c-limits { min-width: 11rem; max-width: 22rem; }
.chips { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: .25rem; }
.chip { background: var(--chip); border-radius: .3rem; padding: .05rem .4rem; font-size: .8rem;
  overflow-wrap: anywhere; }
.chip b { font-weight: 600; color: var(--muted); }
.budget-bar { display: flex; flex-direction: column; gap: .15rem; min-width: 7rem; }
.budget-bar meter { width: 100%; height: .7rem; }
.badge { display: inline-block; border-radius: 1rem; padding: .05rem .6rem; font-size: .78rem;
  font-weight: 600; text-transform: capitalize; }
.badge.active { background: var(--ok-bg); color: var(--ok); }
.badge.expired { background: var(--off-bg); color: var(--off); }
.badge.revoked { background: var(--bad-bg); color: var(--danger); }
.empty { color: var(--muted); padding: 1rem .5rem; margin: 0; }

dialog { border: 1px solid var(--line); border-radius: .7rem; padding: 0; background: var(--panel);
  color: var(--text); width: min(44rem, calc(100vw - 1.5rem)); max-height: calc(100vh - 1.5rem); }
dialog::backdrop { background: rgb(10 14 18 / .55); }
.mint { padding: 1.2rem 1.3rem; display: flex; flex-direction: column; gap: .7rem; }
.hint { margin: 0; color: var(--muted); font-size: .87rem; }
.fields { display: grid; grid-template-columns: 1fr 1fr; gap: .7rem 1rem; }
.fields label { display: flex; flex-direction: column; gap: .25rem; font-size: .85rem;
  font-weight: 600; }
.fields .wide { grid-column: 1 / -1; }
.fields small { font-weight: 400; color: var(--muted); }
.fields input, .fields textarea { font-weight: 400; }
.required { font-weight: 400; color: var(--muted); font-size: .75rem; }
.mint textarea { resize: vertical; font-family: ui-monospace, Menlo, Consolas, monospace; }
#token-value { word-break: break-all; font-size: .8rem; }
.error { color: var(--danger); margin: 0; min-height: 1em; }
.error:empty { display: none; }
.actions { display: flex; justify-content: flex-end; gap: .6rem; }

@media (max-width: 1100px) {
  .figures { grid-template-columns: repeat(3, minmax(0, 1fr)); }
}
@media (max-width: 760px) {
  .topbar { padding: .7rem 1rem; }
  main { padding: 1rem .75rem 2rem; }
  .figures { grid-template-columns: repeat(2, minmax(0, 1fr)); gap: .5rem; }
  .figure dd { font-size: 1.35rem; }
  .figure:last-child { grid-column: 1 / -1; }
  .chains { padding: .8rem .75rem .25rem; }
  .filters label { flex: 1 1 8rem; }
  .filters input { width: 100%; }
  .count { margin: 0; flex-basis: 100%; }
  thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
  table, tbody, tr, td { display: block; }
  tr { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: .5rem .6rem;
    padding: .8rem 0; border-bottom: 1px solid var(--line); }
  tbody tr:hover { background: none; }
  td { border: 0; padding: 0; max-width: none; min-width: 0; }
  td.c-sub, td.c-limits { grid-column: 1 / -1; max-width: none; }
  td.c-sub { grid-column: 1 / 3; }
  td.c-status { grid-column: 3; grid-row: 1; justify-self: end; }
  td.c-budget { grid-column: 1 / 3; }
  td.num { text-align: left; }
  td::before { content: attr(data-label); display: block; font-size: .72rem; color: var(--muted);
    text-transform: uppercase; letter-spacing: .04em; }
  td.c-sub::before, td.c-actions::before { content: none; }
  td.c-status::before { content: none; }
  td.c-actions { align-self: end; justify-self: end; }
  td.c-actions:empty { display: none; }
  .fields { grid-template-columns: 1fr; }
  dialog { width: calc(100vw - 1rem); }
}
"""

CONSOLE_JS = r"""// SOAKP's operator console.
// It talks to the admin endpoints and nothing else: GET /jwt, GET /metrics, POST /jwt/generate and
// POST /jwt/revoke, same origin, with the Basic login the browser already has.
// Everything the server sends is data, and some of it (a token's sub, paths, origins) is chosen by
// whoever asked for the token: it only ever becomes text nodes, never markup.

const POLL_MS = 5000;
const WINDOW_S = 60; // error rate, time to first byte and new upstream errors: over the last minute
const SPARK_POINTS = 24;
const MAX_ROWS = 500; // rebuilt every poll: more would make a busy server's page sluggish
const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat();

// DOM built from values: strings become text nodes; attribute names are always written here.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

// Talking to SOAKP --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, body) {
  const init = body === undefined ? { cache: "no-store" } : {
    method: "POST",
    cache: "no-store",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "SOAKP cannot be reached.");
  }
  const text = await response.text();
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      message = JSON.parse(text).error.message || message;
    } catch {
      // not SOAKP's JSON error shape: keep the status line
    }
    if (response.status === 401) {
      message = "Your admin login was refused: reload the page to log in.";
    }
    throw new ApiError(response.status, message);
  }
  return text;
}

// Metrics: Prometheus text in, the five live figures out ------------------------------------------

function parseLabels(text) {
  const labels = {};
  let i = 0;
  while (i < text.length) {
    const eq = text.indexOf("=", i);
    if (eq < 0 || text[eq + 1] !== '"') break;
    const name = text.slice(i, eq).trim();
    let value = "";
    let j = eq + 2;
    for (; j < text.length && text[j] !== '"'; j++) {
      if (text[j] === "\\" && j + 1 < text.length) {
        j++;
        value += text[j] === "n" ? "\n" : text[j];
      } else {
        value += text[j];
      }
    }
    labels[name] = value;
    i = text.indexOf(",", j) < 0 ? text.length : text.indexOf(",", j) + 1;
  }
  return labels;
}

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    const brace = line.indexOf("{");
    const hasLabels = brace >= 0 && brace < space;
    const name = hasLabels ? line.slice(0, brace) : line.slice(0, space);
    const labels = hasLabels ? parseLabels(line.slice(brace + 1, line.lastIndexOf("}"))) : {};
    samples.push({ name, labels, value: Number(line.slice(space + 1)) });
  }
  return samples;
}

// One reading of the counters that matter, summed over the proxied routes (/v1/...): the console's
// own polling of /jwt and /metrics is not traffic.
function reading(samples, at) {
  const r = { at, total: 0, client: 0, server: 0, streams: 0, upstream: 0, ttfb: new Map() };
  for (const { name, labels, value } of samples) {
    const proxied = (labels.route || "").startsWith("/v1/");
    if (name === "soakp_requests_total" && proxied) {
      r.total += value;
      if (labels.status === "4xx") r.client += value;
      else if (labels.status === "5xx" || labels.status === "none") r.server += value;
    } else if (name === "soakp_open_streams") {
      r.streams = value;
    } else if (name === "soakp_upstream_errors_total") {
      r.upstream += value;
    } else if (name === "soakp_time_to_first_byte_seconds_bucket" && proxied) {
      const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
      r.ttfb.set(le, (r.ttfb.get(le) || 0) + value);
    }
  }
  return r;
}

// Prometheus' histogram_quantile over the difference of two readings of cumulative buckets.
function quantile(q, newer, older) {
  const bounds = [...newer.ttfb.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le) => newer.ttfb.get(le) - (older.ttfb.get(le) || 0));
  const total = counts[counts.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      const lower = i === 0 ? 0 : bounds[i - 1];
      if (bounds[i] === Infinity) return lower;
      const below = i === 0 ? 0 : counts[i - 1];
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + (bounds[i] - lower) * ((rank - below) / inBucket) : bounds[i];
    }
  }
  return null;
}

const history = [];
const rates = [];

function formatSeconds(s) {
  if (s === null) return "–";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

function percent(part, whole) {
  const value = (100 * part) / whole;
  return `${value < 10 && value > 0 ? value.toFixed(1) : Math.round(value)} %`;
}

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 100 24");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "spark");
  const top = Math.max(...values, 0.001);
  const step = 100 / Math.max(1, values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(22 - (20 * v) / top)
    .toFixed(1)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

function showFigures() {
  const newest = history[history.length - 1];
  const previous = history[history.length - 2];
  const oldest = history.find((r) => newest.at - r.at <= WINDOW_S * 1000 + POLL_MS / 2) || newest;
  if (previous) {
    rates.push(Math.max(0, (newest.total - previous.total) / ((newest.at - previous.at) / 1000)));
    if (rates.length > SPARK_POINTS) rates.shift();
    const rps = rates[rates.length - 1];
    $("fig-rps").replaceChildren(rps >= 10 ? Math.round(rps).toString() : rps.toFixed(1));
    $("fig-spark").replaceChildren(rates.length > 2 ? sparkline(rates) : "");
  } else {
    $("fig-rps").replaceChildren("…");
  }
  const requests = newest.total - oldest.total;
  const client = newest.client - oldest.client;
  const server = newest.server - oldest.server;
  $("fig-errors").replaceChildren(requests > 0 ? percent(client + server, requests) : "–");
  $("fig-errors-note").replaceChildren(requests > 0 ?
    `4xx ${numbers.format(client)} · 5xx ${numbers.format(server)} of ` +
    `${numbers.format(requests)}` :
    "no requests in the last minute");
  $("fig-streams").replaceChildren(numbers.format(newest.streams));
  $("fig-upstream").replaceChildren(numbers.format(newest.upstream));
  $("fig-upstream-note").replaceChildren(`+${numbers.format(newest.upstream - oldest.upstream)} ` +
    "in the last minute");
  const median = quantile(0.5, newest, oldest);
  $("fig-ttfb").replaceChildren(formatSeconds(median));
  $("fig-ttfb-note").replaceChildren(median === null ? "no requests in the last minute" :
    `median · p95 ${formatSeconds(quantile(0.95, newest, oldest))}`);
}

async function pollMetrics() {
  const now = Date.now();
  const latest = reading(parseMetrics(await api("/metrics")), now);
  if (history.length && latest.total < history[history.length - 1].total) {
    history.length = 0; // the server restarted: its counters began again
    rates.length = 0;
  }
  history.push(latest);
  while (history.length > 2 && now - history[1].at > WINDOW_S * 1000 + POLL_MS) history.shift();
  showFigures();
}

// Token chains ------------------------------------------------------------------------------------

let chains = [];
let sortKey = "created";
let sortAscending = false;

const rowId = (row) => row.cid ?? row.jti;
// A token from before chains is a chain of one: it can be renewed until it expires.
const renewUntil = (row) => row.renew_until ?? row.expires_at;
const used = (row) => (row.prompt_tokens ?? 0) + (row.completion_tokens ?? 0);

function status(row, now) {
  if (row.revoked_at) return "revoked";
  return row.expires_at <= now ? "expired" : "active";
}

const STATUS_ORDER = { active: 0, expired: 1, revoked: 2 };

// [key, heading, sort value (none: not sortable), numeric]
const COLUMNS = [
  ["sub", "Token", (r) => r.sub.toLowerCase()],
  ["limits", "Limits"],
  ["created", "Created", (r) => r.created_at],
  ["expires", "Expires", (r) => r.expires_at],
  ["renew", "Renewable to", renewUntil],
  ["used", "Last used", (r) => r.last_used_at ?? -1],
  ["requests", "Requests", (r) => r.requests ?? 0, true],
  ["prompt", "Prompt", (r) => r.prompt_tokens ?? 0, true],
  ["completion", "Completion", (r) => r.completion_tokens ?? 0, true],
  ["budget", "Budget", (r) => (r.max_tokens_total ? used(r) / r.max_tokens_total : -1)],
  ["status", "Status", (r) => STATUS_ORDER[status(r, Date.now() / 1000)]],
  ["actions", "Actions"],
];
const SORTABLE = COLUMNS.filter((c) => c[2]);
const columnOf = (key) => COLUMNS.find((c) => c[0] === key);

function relative(ts, now) {
  const delta = ts - now;
  const s = Math.abs(delta);
  if (s < 10) return "just now";
  const text = s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` :
    s < 172800 ? `${Math.round(s / 3600)} h` : `${Math.round(s / 86400)} d`;
  return delta > 0 ? `in ${text}` : `${text} ago`;
}

const dateFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  hourCycle: "h23",
});

const shortDate = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23",
});

function when(ts, now) {
  if (ts === null || ts === undefined) return el("span", { class: "muted" }, "never");
  const date = new Date(ts * 1000);
  const sameYear = date.getFullYear() === new Date(now * 1000).getFullYear();
  return el("time", { datetime: date.toISOString(), title: date.toString() },
    el("span", {}, relative(ts, now)),
    el("small", {}, (sameYear ? shortDate : dateFormat).format(date)));
}

function limitChips(row) {
  const chips = [];
  const list = (label, values) => {
    if (Array.isArray(values) && values.length) {
      chips.push(el("li", { class: "chip" }, el("b", {}, label), " ", values.join(", ")));
    }
  };
  list("paths", row.paths);
  list("models", row.models);
  list("origins", row.origins);
  const one = (label, value) => {
    if (value) chips.push(el("li", { class: "chip" }, el("b", {}, label), " ", value));
  };
  one("rpm", row.rpm && numbers.format(row.rpm));
  one("org", row.org);
  one("project", row.project);
  // Rows without limit fields come from a server that does not list them: say so, not "none".
  if (!chips.length) return el("span", { class: "muted" }, row.paths === undefined ? "–" : "none");
  return el("ul", { class: "chips" }, chips);
}

function budget(row) {
  if (!row.max_tokens_total) return el("span", { class: "muted" }, "–");
  const total = row.max_tokens_total;
  const spent = Math.min(used(row), total);
  return el("div", { class: "budget-bar" },
    el("meter", { min: 0, max: total, low: total * 0.7, high: total * 0.9, optimum: 0, value: spent,
      "aria-label": `${numbers.format(spent)} of ${numbers.format(total)} tokens used` }),
    el("small", {}, `${numbers.format(spent)} / ${numbers.format(total)}`));
}

function tokenCell(row) {
  const id = rowId(row);
  const facts = [el("span", { class: "id", title: `chain ${id}` }, `chain ${id.slice(0, 10)}…`)];
  if (row.jti && row.jti !== id) {
    facts.push(el("span", { class: "id", title: `newest token ${row.jti}` },
      `token ${row.jti.slice(0, 10)}…`));
  }
  if (row.parent) facts.push(el("span", { class: "id", title: `parent chain ${row.parent}` },
    `child of ${row.parent.slice(0, 10)}…`));
  return el("div", { class: "token" }, el("span", { class: "who" }, row.sub), ...facts);
}

function cell(key, row, now) {
  switch (key) {
    case "sub": return tokenCell(row);
    case "limits": return limitChips(row);
    case "created": return when(row.created_at, now);
    case "expires": return when(row.expires_at, now);
    case "renew": return when(renewUntil(row), now);
    case "used": return when(row.last_used_at, now);
    case "requests": return [numbers.format(row.requests ?? 0), row.errors ?
      el("small", { class: "errors" }, `${numbers.format(row.errors)} failed`) : null];
    case "prompt": return numbers.format(row.prompt_tokens ?? 0);
    case "completion": return numbers.format(row.completion_tokens ?? 0);
    case "budget": return budget(row);
    case "status": {
      const s = status(row, now);
      return el("span", { class: `badge ${s}` }, s);
    }
    default: return status(row, now) !== "active" ? null : el("button", {
      type: "button", class: "danger small", dataset: { action: "revoke", id: rowId(row) },
      "aria-label": `Revoke ${row.sub}`, onclick: () => askRevoke(row),
    }, "Revoke");
  }
}

function matches(row, text, wanted, now) {
  if (wanted !== "all" && status(row, now) !== wanted) return false;
  if (!text) return true;
  const haystack = [row.sub, row.jti, row.cid, row.parent, row.org, row.project,
    ...(row.paths || []), ...(row.models || []), ...(row.origins || [])];
  return haystack.some((value) => typeof value === "string" && value.toLowerCase().includes(text));
}

function renderHead() {
  const cells = COLUMNS.map(([key, label, sortValue, numeric]) => {
    const current = key === sortKey;
    const th = el("th", { scope: "col", class: numeric ? "num" : null,
      "aria-sort": current ? (sortAscending ? "ascending" : "descending") : null });
    if (key === "actions") th.append(el("span", { class: "visually-hidden" }, label));
    else if (!sortValue) th.append(label);
    else {
      th.append(el("button", { type: "button", class: "sort", dataset: { sort: key },
        onclick: () => setSort(key, current ? !sortAscending : key === "sub") },
      label, el("span", { class: "arrow", "aria-hidden": "true" },
        current ? (sortAscending ? "▲" : "▼") : "")));
    }
    return th;
  });
  $("chains-head").replaceChildren(...cells);
  $("sort-key").value = sortKey;
  $("sort-dir").replaceChildren(sortAscending ? "↑ ascending" : "↓ descending");
}

function renderChains() {
  const now = Date.now() / 1000;
  const text = $("filter-text").value.trim().toLowerCase();
  const wanted = $("filter-status").value;
  const sortValue = columnOf(sortKey)[2];
  const order = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
  const shown = chains.filter((row) => matches(row, text, wanted, now)).sort((a, b) =>
    (order(sortValue(a), sortValue(b)) || order(a.created_at, b.created_at) ||
     order(rowId(a), rowId(b))) * (sortAscending ? 1 : -1));
  // Keep keyboard focus on the same control across a re-render.
  const focused = document.activeElement?.dataset?.id;
  const rows = shown.slice(0, MAX_ROWS).map((row) => el("tr", { dataset: { id: rowId(row) } },
    COLUMNS.map(([key, label, , numeric]) => el("td", {
      class: numeric ? `c-${key} num` : `c-${key}`, "data-label": label, dataset: { col: key },
    }, cell(key, row, now)))));
  $("chains-body").replaceChildren(...rows);
  if (focused) $("chains-body").querySelector(`button[data-id="${CSS.escape(focused)}"]`)?.focus();
  $("empty").hidden = shown.length > 0;
  const total = chains.length;
  let count = shown.length === total ? `${numbers.format(total)} chains` :
    `${numbers.format(shown.length)} of ${numbers.format(total)} chains`;
  if (shown.length > MAX_ROWS) {
    count += `, the first ${numbers.format(MAX_ROWS)} shown: filter for the others`;
  }
  $("count").replaceChildren(count);
}

function setSort(key, ascending) {
  const fromHeading = document.activeElement?.classList.contains("sort");
  sortKey = key;
  sortAscending = ascending;
  renderHead();
  renderChains();
  if (fromHeading) $("chains-head").querySelector(`button[data-sort="${key}"]`).focus();
}

async function pollChains() {
  chains = JSON.parse(await api("/jwt")).data;
  renderChains();
}

// Revoking ----------------------------------------------------------------------------------------

let revoking = null;

function askRevoke(row) {
  revoking = row;
  $("revoke-text").replaceChildren("Revoke the chain of ", el("strong", {}, row.sub), " (",
    el("code", {}, rowId(row)), ")?");
  $("revoke-error").replaceChildren();
  $("revoke-dialog").showModal();
  $("revoke-cancel").focus();
}

async function confirmRevoke() {
  const row = revoking;
  const button = $("revoke-confirm");
  button.disabled = true;
  try {
    await api("/jwt/revoke", { jti: row.jti }); // a jti names its chain, before chains and after
    $("revoke-dialog").close();
    say(`Revoked the chain of ${row.sub}.`);
    await refresh();
  } catch (error) {
    $("revoke-error").replaceChildren(error.message);
  } finally {
    button.disabled = false;
  }
}

// Minting -----------------------------------------------------------------------------------------

const LISTS = ["paths", "models", "origins"];
const WHOLE_NUMBERS = ["rpm", "max_tokens_total", "delegate"];
const DURATIONS = ["ttl", "renew_ttl"];

// The form's filled-in fields as a /jwt/generate body. Empty fields are left out: a server that
// does not know a field (renew_ttl and delegate are newer) refuses it, even empty.
function grantFrom(form) {
  const grant = {};
  for (const [name, raw] of new FormData(form)) {
    const value = raw.trim();
    if (!value) continue;
    if (LISTS.includes(name)) grant[name] = value.split(/[\s,]+/).filter(Boolean);
    else if (WHOLE_NUMBERS.includes(name)) {
      if (!/^\d{1,15}$/.test(value)) throw new Error(`${name} must be a whole number.`);
      grant[name] = Number(value);
    } else if (DURATIONS.includes(name)) {
      grant[name] = /^\d{1,15}$/.test(value) ? Number(value) : value;
    } else grant[name] = value;
  }
  return grant;
}

async function mint(event) {
  event.preventDefault();
  const form = $("mint-form");
  const button = $("mint-submit");
  $("mint-error").replaceChildren();
  if (!form.elements.key.value.trim()) {
    $("mint-error").replaceChildren("The OpenAI key is required.");
    form.elements.key.focus();
    return;
  }
  button.disabled = true;
  try {
    const { data } = JSON.parse(await api("/jwt/generate", grantFrom(form)));
    form.reset(); // the key leaves the page with the form
    $("mint-dialog").close();
    showToken(data);
    await refresh();
  } catch (error) {
    $("mint-error").replaceChildren(error.message);
  } finally {
    button.disabled = false;
  }
}

function showToken(data) {
  $("token-value").value = data.jwt;
  $("token-facts").replaceChildren(`Token ${data.jti}, expires ${dateFormat.format(
    new Date(data.expires_at * 1000))}.`);
  $("token-copy").replaceChildren("Copy");
  $("token-dialog").showModal();
  $("token-value").select();
  $("token-copy").focus();
}

async function copyToken() {
  const field = $("token-value");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    field.select();
    document.execCommand("copy"); // older browsers, or a page without clipboard permission
  }
  $("token-copy").replaceChildren("Copied ✓");
}

// Wiring ------------------------------------------------------------------------------------------

let statusTimer = null;

// A message in the top bar; a success gives way to the "updated" time after a few seconds.
function say(text, isError = false) {
  const node = $("live-status");
  node.replaceChildren(text);
  node.classList.toggle("error", isError);
  clearTimeout(statusTimer);
  statusTimer = isError ? null : setTimeout(() => {
    statusTimer = null;
    showUpdated();
  }, 4000);
}

let updatedAt = null;

function showUpdated() {
  if (updatedAt) {
    $("live-status").replaceChildren(`Live · updated ${updatedAt.toLocaleTimeString()}`);
  }
}

let refreshing = null;

async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    try {
      await Promise.all([pollChains(), pollMetrics()]);
      updatedAt = new Date();
      if (!statusTimer) {
        $("live-status").classList.remove("error");
        showUpdated();
      }
    } catch (error) {
      say(error.message, true);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

function wire() {
  for (const [key, label] of SORTABLE) $("sort-key").append(el("option", { value: key }, label));
  $("sort-key").addEventListener("change", (e) => {
    setSort(e.target.value, e.target.value === "sub");
  });
  $("sort-dir").addEventListener("click", () => setSort(sortKey, !sortAscending));
  $("filter-text").addEventListener("input", renderChains);
  $("filter-status").addEventListener("change", renderChains);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("mint-open").addEventListener("click", () => {
    $("mint-error").replaceChildren();
    $("mint-dialog").showModal();
    $("mint-form").elements.key.focus();
  });
  $("mint-cancel").addEventListener("click", () => {
    $("mint-form").reset();
    $("mint-dialog").close();
  });
  $("mint-dialog").addEventListener("close", () => $("mint-form").reset());
  $("mint-form").addEventListener("submit", mint);
  $("token-copy").addEventListener("click", copyToken);
  const forgetToken = () => { $("token-value").value = ""; };
  $("token-done").addEventListener("click", () => {
    forgetToken();
    $("token-dialog").close();
  });
  $("token-dialog").addEventListener("close", forgetToken); // Escape closes it too
  $("revoke-cancel").addEventListener("click", () => $("revoke-dialog").close());
  $("revoke-confirm").addEventListener("click", confirmRevoke);
  renderHead();
  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
}

window.soakpConsole = { refresh }; // for tests and the curious: refresh now instead of in 5 s
wire();
"""

CONSOLE_ICON = r"""<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<rect width="32" height="32" rx="7" fill="#0b6e69"/>
<circle cx="11" cy="16" r="5" fill="none" stroke="#fff" stroke-width="3"/>
<path d="M16 16h11M23 16v5M27 16v4" fill="none" stroke="#fff" stroke-width="3"/>
</svg>
"""

CONSOLE_ASSETS = {
    "/admin": ("text/html; charset=utf-8", CONSOLE_HTML.encode("utf-8")),
    CONSOLE_PATH: ("text/html; charset=utf-8", CONSOLE_HTML.encode("utf-8")),
    "/admin/console.css": ("text/css; charset=utf-8", CONSOLE_CSS.encode("utf-8")),
    "/admin/console.js": ("text/javascript; charset=utf-8", CONSOLE_JS.encode("utf-8")),
    "/admin/icon.svg": ("image/svg+xml", CONSOLE_ICON.encode("utf-8")),
}


# 9. CLI: argv in, an exit code out.


def configure_logging(level: str) -> None:
    """Plain lines for events on stderr (the access log, one JSON object per line,
    is AccessLog's)."""
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )


def run_event_loop(main_coro: Any) -> int:
    """asyncio.run(), on uvloop when it is installed: optional and faster, never required."""
    try:
        import uvloop  # noqa: PLC0415 - an optional accelerator, looked for only here
    except ImportError:
        uvloop = None
    if uvloop is None:  # outside the except block, so no traceback says "No module named 'uvloop'"
        return asyncio.run(main_coro)
    log.debug("using uvloop %s", uvloop.__version__)
    return uvloop.run(main_coro)


def split_list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


STDIN_KEY = "-"  # `--key -`, `--key-file -`: the key comes from standard input, never the text "-"


def read_api_key(args: argparse.Namespace, environ: Mapping[str, str], stdin: Any) -> str:
    """The OpenAI key for `soakp mint`: --key, else --key-file, else OPENAI_API_KEY (`-`: stdin).

    Only the first line counts and surrounding whitespace goes (a file or pipe ends in a newline).
    Raises ConfigError with one line that never repeats the key.
    """
    if args.api_key is not None and args.api_key != STDIN_KEY:
        key, source = args.api_key, "--key"
    elif args.api_key == STDIN_KEY or args.key_file == STDIN_KEY:
        source = "--key -" if args.api_key == STDIN_KEY else "--key-file -"
        key = (stdin.readline() if stdin is not None else "").strip()
        if not key:
            raise ConfigError(
                f"{source}: nothing on standard input; pipe the key in, "
                f'e.g. printf %s "$OPENAI_API_KEY" | soakp mint {source} ...'
            )
    elif args.key_file is not None:
        source = "--key-file"
        try:
            lines = Path(args.key_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--key-file: cannot read {args.key_file}: {describe_error(exc)}"
            ) from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--key-file: {args.key_file} is empty; put the OpenAI key in it")
    else:
        key, source = environ.get("OPENAI_API_KEY", "").strip(), "OPENAI_API_KEY"
    if key == STDIN_KEY:
        raise ConfigError(
            f"{source}: the OpenAI key cannot be '-'; `--key -` reads it from standard input"
        )
    return key


def cli_message(exc: ApiError) -> str:
    """A mint refusal in the CLI's words: the JSON fields parse_grant names become their flags."""
    message = exc.message
    for name in GRANT_FIELDS:
        message = message.replace(f"'{name}'", f"--{name.replace('_', '-')}")
    message = message.replace("--key ", "the OpenAI key (--key, --key-file or OPENAI_API_KEY) ", 1)
    if exc.code == "ttl_too_long":
        message += (
            ": ask for a shorter --ttl, or raise --max-token-ttl "
            "(SOAKP_MAX_TOKEN_TTL, default 365d)"
        )
    return message


def run_mint(
    config: Config, args: argparse.Namespace, environ: Mapping[str, str], stdin: Any
) -> int:
    """`soakp mint`: print a new token as the last line of stdout and register it in the db."""
    api_key = read_api_key(args, environ, stdin)
    fields: dict[str, Any] = {
        "key": api_key,
        "org": args.org,
        "project": args.project,
        "ttl": args.ttl,
        "renew_ttl": args.renew_ttl,
        "sub": args.sub,
        "paths": split_list(args.paths),
        "models": split_list(args.models),
        "origins": split_list(args.origins),
    }
    for name in ("rpm", "max_tokens_total", "delegate"):
        value = getattr(args, name)
        if value is not None:
            if not value.isdigit():
                flag = f"--{name.replace('_', '-')}"
                print(f"soakp: {flag} must be a whole number, e.g. 20", file=sys.stderr)
                return 2
            fields[name] = int(value)
    try:
        grant = parse_grant(
            {k: v for k, v in fields.items() if v is not None},
            config.token_ttl_s,
            config.max_token_ttl_s,
        )
    except ApiError as exc:
        print(f"soakp: {cli_message(exc)}", file=sys.stderr)
        return 2
    keys = derive_keys(config.secret)
    now = int(time.time())
    minted = new_token(keys, grant, now)
    registry = TokenRegistry(config.db)
    try:
        registry.register(minted, grant.sub, keys.kid, now, chain_limits(grant))
    finally:
        registry.close()
    expires = datetime.datetime.fromtimestamp(minted.expires_at, datetime.timezone.utc).isoformat()
    print(
        f"# jti={minted.jti} cid={minted.cid} sub={grant.sub} kid={keys.kid} "
        f"expires_at={minted.expires_at} "
        f"({expires}) renew_until={minted.renew_until}"
    )
    print(minted.token)
    return 0


def missing_database(
    config: Config, args: argparse.Namespace, environ: Mapping[str, str]
) -> str | None:
    """Why `revoke`/`tokens` must not run: a database file that does not exist (opening it would
    create an empty one, so a revocation would land where no server looks). None when it exists."""
    if config.db == ":memory:" or os.path.exists(config.db):
        return None
    source = option_source(args, environ, "db")
    named = "" if source == "the default" else f" (from {source})"
    return (
        f"no token database at {config.db}{named}: give the server's database with "
        "--db FILE or SOAKP_DB (`make run` uses var/soakp.db)"
    )


async def shared_command(config: Config, command: str, token_id: str) -> tuple[int, list[Any]]:
    """`soakp tokens --redis URL` (every instance's chains) and `soakp revoke --redis URL ID` (the
    chain revoked on every instance). Returns (exit code, lines to print)."""
    store = await open_shared_store(config)
    try:
        if command == "tokens":
            return 0, [json.dumps(row) for row in await store.list()]
        chain = await store.chain_of(token_id)
        if chain is None:
            return 1, []
        await store.run(REVOKE, REVOCATION_KEYS, [f"c:{chain[0]}", chain[1]])
        await store.command("PUBLISH", REVOCATIONS_CHANNEL, f"c:{chain[0]} {chain[1]}")
        await store.command("HSETNX", chain_key(chain[0], "meta"), "revoked_at", int(time.time()))
        return 0, [json.dumps({"cid": chain[0], "revoked_at": int(time.time())})]
    except StoreDown:
        return 1, ["Redis did not answer"]
    finally:
        await store.close()


def run_registry_command(
    config: Config, args: argparse.Namespace, environ: Mapping[str, str]
) -> int:
    """`soakp revoke JTI` and `soakp tokens`, on the same database a server uses (or its Redis)."""
    if config.redis_url:
        token_id = getattr(args, "jti", "")
        if args.command == "revoke" and not TOKEN_ID_RE.match(token_id):
            print("soakp: that is not a token id (a jti or cid)", file=sys.stderr)
            return 2
        code, lines = asyncio.run(shared_command(config, args.command, token_id))
        if code:
            why = lines[0] if lines else f"no token or chain {token_id} in Redis"
            print(f"soakp: {why}", file=sys.stderr)
            return code
        for line in lines:
            print(line)
        return 0
    problem = missing_database(config, args, environ)
    if problem:
        print(f"soakp: {problem}", file=sys.stderr)
        return 1
    registry = TokenRegistry(config.db)
    try:
        if args.command == "revoke":
            if not TOKEN_ID_RE.match(args.jti):
                print(
                    "soakp: that is not a token id (a jti or cid): `soakp tokens` lists them",
                    file=sys.stderr,
                )
                return 2
            chain = registry.chain_of(args.jti)
            if chain is None:
                print(
                    f"soakp: no token or chain {args.jti} in {config.db}; nothing was revoked "
                    "(is --db / SOAKP_DB the server's database?)",
                    file=sys.stderr,
                )
                return 1
            revoked_at = registry.revoke_chain(*chain, int(time.time()))
            print(json.dumps({"cid": chain[0], "revoked_at": revoked_at}))
        else:
            for row in registry.list():
                print(json.dumps(row))
    finally:
        registry.close()
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of `soakp`, `python soakp.py` and `python -m soakp`. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        try:
            config, args = load_config(argv, environ)
        except SystemExit as exc:  # --help and --version print and stop here
            return exc.code if isinstance(exc.code, int) else 0
        if args.command == "selfsigned":
            try:
                write_selfsigned(args.dir, args.host, datetime.datetime.now(datetime.timezone.utc))
            except OSError as exc:
                raise ConfigError(
                    f"--dir: cannot write {args.dir}: {describe_error(exc)}"
                ) from None
            print(f"wrote {args.dir}/fullchain.pem and {args.dir}/privkey.pem for {args.host}")
            return 0
        configure_logging(config.log_level)
        if args.command == "mint":
            return run_mint(config, args, environ, sys.stdin)
        if args.command in ("revoke", "tokens"):
            return run_registry_command(config, args, environ)
        return run_event_loop(serve(config))
    except ConfigError as exc:
        print(f"soakp: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        filename = getattr(exc, "filename", None)
        where = f" ({filename})" if filename else ""
        print(f"soakp: {describe_error(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
