"""A fake OpenAI API and a raw HTTP/1.1 client, for SOAKP's black-box tests.

FakeUpstream is a real HTTP/1.1 server over TLS on 127.0.0.1, port 0, running its own asyncio loop in a
background thread. It records every request it receives (method, raw target, headers in order, a
streaming SHA-256 of the body, when each body piece arrived, which TCP connection carried it) and
answers the way the OpenAI API does, closely enough for the official SDK to parse. A test can script
another behaviour for a path, or for requests that carry `X-Fake-Script: NAME`.

 1 Certificates    CertAuthority: a throwaway CA that issues leaf certificates (cryptography)
 2 Records         RecordedRequest, Part: what the upstream saw
 3 Behaviours      Responder, Gate, rst(); json_reply(), openai_error(), sse_reply(), stall(),
                   die_mid_body(), download(), echo()
 4 Default routes  the OpenAI endpoints the tests use
 5 Server          FakeUpstream
 6 Raw client      RawConnection, RawResponse, parse_response(): a bounded HTTP/1.1 client
 7 Process mode    `python tests/fake_upstream.py --profile bench|reliability`: a lean server with
                   route tables, run as a process of its own by bench/ and tools/

Nothing here talks to anything but 127.0.0.1, and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import gc
import hashlib
import ipaddress
import itertools
import json
import os
import select
import signal
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# 1. Certificates: a CA in memory, PEM files out. #############################################################


class CertAuthority:
    """A throwaway certificate authority whose certificate lives at `ca_path`.

    Leaf certificates carry the SAN entries and extensions a strict verifier (Python 3.13's
    VERIFY_X509_STRICT) wants: key usage, extended key usage, subject and authority key identifiers.
    """

    def __init__(self, directory: Path, common_name: str = "SOAKP Test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        public_key = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str = "leaf",
        hosts: Sequence[str] = (LOOPBACK, "localhost"),
        directory: Path | None = None,
        valid_days: int = 2,
    ) -> tuple[Path, Path]:
        """Issue a server certificate for `hosts` (IP addresses or DNS names).

        Returns (certificate chain PEM path, private key PEM path); the chain is leaf then CA, the
        layout of Certbot's fullchain.pem.
        """
        directory = directory or self.directory
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}-key.pem"
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + self.certificate.public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """Return a client SSL context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_path))


# 2. Records: what the upstream saw. Mutated only by the server thread, read by tests. ###################

KEEP_BODY_BYTES = 64 * 1024 * 1024  # bodies up to this size are kept whole; larger ones only hashed
MAX_CHUNK_TIMES = 100_000  # arrival times kept per request (200 MB in 64 KiB reads is ~3,200)


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class HeaderLookup:
    """Case-insensitive lookups over `self.headers`, a list of (name, value) in arrival order."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Return every value of header `name` (case-insensitive), in arrival order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def header_names(self) -> list[str]:
        return [key.lower() for key, _ in self.headers]


@dataclass(eq=False)
class RecordedRequest(HeaderLookup):
    """One request as the upstream received it, recorded from its head on; `complete` once the body ended.

    `headers` is every header line in arrival order, names as sent. `body` is None when the body was
    larger than KEEP_BODY_BYTES; `body_sha256` and `body_length` always cover all of it.
    `chunk_times` holds (time.monotonic(), byte count) for each body piece read off the wire.
    """

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    connection_id: int
    raw_head: bytes
    started_at: float = field(default_factory=time.monotonic)
    body_length: int = 0
    body: bytes | None = b""
    chunk_times: list[tuple[float, int]] = field(default_factory=list)
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False
    body_error: str | None = None
    _hasher: Any = field(default_factory=hashlib.sha256, repr=False)
    _buffer: bytearray | None = field(default_factory=bytearray, repr=False)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def body_sha256(self) -> str:
        return self._hasher.copy().hexdigest()

    def json(self) -> Any:
        if self.body is None:
            raise ValueError("body too large to keep")
        return json.loads(self.body or b"null")

    def multipart(self) -> dict[str, Part]:
        """Parse a multipart/form-data body into its parts, by field name."""
        if self.body is None:
            raise ValueError("body too large to keep")
        return parse_multipart(self.body, self.header("content-type") or "")

    def _add_body(self, data: bytes) -> None:
        self.body_length += len(data)
        self._hasher.update(data)
        if len(self.chunk_times) < MAX_CHUNK_TIMES:
            self.chunk_times.append((time.monotonic(), len(data)))
        if self._buffer is not None:
            if len(self._buffer) + len(data) > KEEP_BODY_BYTES:
                self._buffer = None
            else:
                self._buffer += data

    def _finish(self, error: str | None = None) -> None:
        self.body = bytes(self._buffer) if self._buffer is not None else None
        self._buffer = None
        self.body_error = error
        self.complete = error is None


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """Split a multipart/form-data body (RFC 7578) into parts, by field name.

    Raises ValueError on a body that is not well-formed multipart.
    """
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"').encode("latin-1")
    if not boundary:
        raise ValueError(f"no boundary in content-type {content_type!r}")
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise ValueError("body does not start with the boundary")
    parts: dict[str, Part] = {}
    for chunk in body.split(b"\r\n" + delimiter):
        if chunk.startswith(delimiter):
            chunk = chunk[len(delimiter) :]
        if chunk.startswith(b"--"):
            break  # the close delimiter
        if not chunk.startswith(b"\r\n"):
            raise ValueError("malformed part delimiter")
        head, sep, data = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a blank line after its headers")
        name = filename = ctype = None
        for line in head.decode("utf-8").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for param in value.split(";")[1:]:
                    pkey, _, pvalue = param.strip().partition("=")
                    if pkey == "name":
                        name = pvalue.strip('"')
                    elif pkey == "filename":
                        filename = pvalue.strip('"')
            elif key.strip().lower() == "content-type":
                ctype = value.strip()
        if name is None:
            raise ValueError("part without a name")
        parts[name] = Part(name, filename, ctype, data)
    return parts


# 3. Behaviours: a request in, bytes written to the client. ##################################################

Behaviour = Callable[[RecordedRequest, "Responder"], Awaitable[None]]


class Gate:
    """A door a behaviour waits at until the test opens it; thread-safe.

    `reached` is set once the behaviour has flushed everything before the door and is waiting.
    """

    def __init__(self) -> None:
        self._opened = threading.Event()
        self.reached = threading.Event()

    def open(self) -> None:
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait, without blocking the loop, until the gate opens. Returns whether it opened in time."""
        deadline = time.monotonic() + timeout_s
        while not self._opened.is_set():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def rst(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset, whatever is still buffered."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Responder:
    """Writes one HTTP/1.1 response; a behaviour drives it.

    The framing follows the headers the behaviour chose: with `Transfer-Encoding: chunked`, each
    `send()` is one chunk and `end()` writes the last chunk; otherwise bytes go out as given.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: RecordedRequest):
        self.reader = reader
        self.writer = writer
        self.request = request
        self.keep_alive = True
        self.head_sent = False
        self._chunked = False

    async def send_head(self, status: int, headers: Iterable[tuple[str, str]] = (), reason: str | None = None) -> None:
        headers = list(headers)
        if reason is None:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = "Whatever"
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lowered = name.lower()
            if lowered == "transfer-encoding" and "chunked" in value.lower():
                self._chunked = True
            if lowered == "connection" and "close" in value.lower():
                self.keep_alive = False
            lines.append(f"{name}: {value}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.head_sent = True
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        """Write a body piece: one chunk when chunked, as-is otherwise."""
        if not data:
            return
        if self._chunked:
            self.writer.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.writer.write(data)
        await self.writer.drain()

    async def end(self) -> None:
        """Finish the body (the last chunk when chunked)."""
        if self._chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()

    async def reply(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Send a whole response with a Content-Length."""
        await self.send_head(status, [*headers, ("Content-Length", str(len(body)))])
        await self.send(body)

    async def reply_json(self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        body = json.dumps(obj).encode()
        await self.reply(status, body, [("Content-Type", "application/json"), *headers])

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until asyncio has handed every written byte to the kernel."""
        await self.writer.drain()
        deadline = time.monotonic() + timeout_s
        while self.writer.transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for _ in range(3):  # let the TLS layer pass its last record to the socket transport
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Close the connection cleanly (TLS close_notify, then FIN) after the bytes written so far."""
        self.keep_alive = False
        await self.flush()
        self.writer.close()

    async def abort(self) -> None:
        """Drop the connection with a TCP reset after the bytes written so far."""
        self.keep_alive = False
        await self.flush()
        rst(self.writer)

    async def wait_peer_close(self, timeout_s: float) -> bool:
        """Wait until the client closes its side (or timeout_s). Returns whether it closed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError):
                return True
            if not data:
                return True
        return False


def _fake_headers() -> list[tuple[str, str]]:
    """Headers OpenAI sends on every answer (a subset)."""
    return [("x-request-id", f"req_fake_{next(_ids)}"), ("openai-processing-ms", "7")]


_ids = itertools.count(1)


def json_reply(body: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Behaviour:
    """Answer with `body` as JSON (Content-Length framing) and extra `headers`."""
    headers = list(headers)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.reply_json(status, body, headers)

    return behaviour


def openai_error(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> Behaviour:
    """Answer with an OpenAI-shaped error body."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return json_reply(body, status, headers)


def sse_reply(
    events: Sequence[Any],
    gate: Gate | None = None,
    hold_before: int = 1,
    done: bool = True,
    headers: Iterable[tuple[str, str]] = (),
    gate_timeout_s: float = 30.0,
) -> Behaviour:
    """Answer with a chunked text/event-stream, one `data:` event per chunk.

    Events that are not str are JSON-encoded; `data: [DONE]` follows unless done=False. With a
    `gate`, event number `hold_before` (0-based) is withheld until the test opens the gate.
    """
    headers = list(headers)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.send_head(
            200,
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-cache"),
                ("Transfer-Encoding", "chunked"),
                *_fake_headers(),
                *headers,
            ],
        )
        payloads = [event if isinstance(event, str) else json.dumps(event) for event in events]
        if done:
            payloads.append("[DONE]")
        for index, payload in enumerate(payloads):
            if gate is not None and index == hold_before:
                await responder.flush()
                gate.reached.set()
                if not await gate.wait(gate_timeout_s):
                    await responder.abort()
                    return
            await responder.send(f"data: {payload}\n\n".encode())
        await responder.end()

    return behaviour


def stall(max_s: float = 30.0) -> Behaviour:
    """Never answer: wait (at most max_s) for the client to give up, then drop the connection."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.wait_peer_close(max_s)
        await responder.abort()

    return behaviour


def die_mid_body(
    sent: bytes = b'{"partial": ',
    declared_length: int | None = None,
    how: str = "close",
    stall_max_s: float = 30.0,
    headers: Iterable[tuple[str, str]] = (),
) -> Behaviour:
    """Send a response head and part of the body, then fail.

    declared_length=None frames the body chunked (`sent` is one chunk, the last chunk never comes);
    otherwise Content-Length says declared_length and only `sent` follows. `how` is "close" (clean
    TLS close), "reset" (TCP RST) or "stall" (go silent until the client leaves, at most stall_max_s).
    """
    headers = list(headers)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        framing = (
            [("Transfer-Encoding", "chunked")]
            if declared_length is None
            else [("Content-Length", str(declared_length))]
        )
        await responder.send_head(200, [("Content-Type", "application/json"), *framing, *headers])
        await responder.send(sent)
        if how == "reset":
            await responder.abort()
        elif how == "stall":
            await responder.flush()
            await responder.wait_peer_close(stall_max_s)
            await responder.abort()
        else:
            await responder.close()

    return behaviour


DOWNLOAD_BLOCK = bytes(range(256)) * 256  # 64 KiB of a repeating pattern


def download_bytes(n_bytes: int) -> Iterable[bytes]:
    """Yield the `n_bytes`-long pattern that download() sends, in 64 KiB blocks."""
    whole, rest = divmod(n_bytes, len(DOWNLOAD_BLOCK))
    for _ in range(whole):
        yield DOWNLOAD_BLOCK
    if rest:
        yield DOWNLOAD_BLOCK[:rest]


def download_sha256(n_bytes: int) -> str:
    hasher = hashlib.sha256()
    for block in download_bytes(n_bytes):
        hasher.update(block)
    return hasher.hexdigest()


def download(n_bytes: int, chunked: bool = True, headers: Iterable[tuple[str, str]] = ()) -> Behaviour:
    """Stream `n_bytes` of a fixed pattern, generated on the fly (see download_sha256())."""
    headers = list(headers)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(n_bytes))]
        await responder.send_head(200, [("Content-Type", "application/octet-stream"), *framing, *headers])
        for block in download_bytes(n_bytes):
            await responder.send(block)
        await responder.end()

    return behaviour


def echo(status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Behaviour:
    """Answer with JSON describing the request: method, target, headers, body length and SHA-256."""
    headers = list(headers)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.reply_json(
            status,
            {
                "method": request.method,
                "target": request.target,
                "headers": request.headers,
                "body_length": request.body_length,
                "body_sha256": request.body_sha256,
            },
            [*_fake_headers(), *headers],
        )

    return behaviour


# 4. Default routes: enough of the OpenAI API for the official SDK. ###########################################


def _now() -> int:
    return int(time.time())


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


async def route_chat_completions(request: RecordedRequest, responder: Responder) -> None:
    body = request.json()
    model = body.get("model", "gpt-fake")
    text = "echo: " + _last_user_text(body)
    ident = f"chatcmpl-fake{next(_ids)}"
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    if not body.get("stream"):
        await responder.reply_json(
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": _now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "system_fingerprint": "fp_fake",
            },
            _fake_headers(),
        )
        return

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": _now(),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    third = max(1, len(text) // 3)
    pieces = [text[:third], text[third : 2 * third], text[2 * third :]]
    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk({}), "choices": [], "usage": usage})
    await sse_reply(events)(request, responder)


async def route_embeddings(request: RecordedRequest, responder: Responder) -> None:
    body = request.json()
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, _ in enumerate(inputs):
        vector = [0.25, 0.5, float(index)]
        if body.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    await responder.reply_json(
        200,
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-fake"),
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        },
        _fake_headers(),
    )


FAKE_MODELS = ["gpt-fake-1", "gpt-fake-2"]


async def route_models(request: RecordedRequest, responder: Responder) -> None:
    data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"} for name in FAKE_MODELS]
    await responder.reply_json(200, {"object": "list", "data": data}, _fake_headers())


async def route_files(request: RecordedRequest, responder: Responder) -> None:
    parts = request.multipart()
    upload = parts["file"]
    purpose = parts["purpose"].data.decode() if "purpose" in parts else "user_data"
    await responder.reply_json(
        200,
        {
            "id": f"file-fake{next(_ids)}",
            "object": "file",
            "bytes": len(upload.data),
            "created_at": _now(),
            "filename": upload.filename or "upload",
            "purpose": purpose,
            "status": "processed",
        },
        _fake_headers(),
    )


async def route_transcriptions(request: RecordedRequest, responder: Responder) -> None:
    parts = request.multipart()
    upload = parts["file"]
    text = f"fake transcript of {upload.filename} ({len(upload.data)} bytes)"
    await responder.reply_json(200, {"text": text}, _fake_headers())


async def route_responses(request: RecordedRequest, responder: Responder) -> None:
    body = request.json()
    given = body.get("input")
    text = "echo: " + (given if isinstance(given, str) else json.dumps(given))
    await responder.reply_json(
        200,
        {
            "id": f"resp_fake{next(_ids)}",
            "object": "response",
            "created_at": _now(),
            "status": "completed",
            "model": body.get("model", "gpt-fake"),
            "output": [
                {
                    "type": "message",
                    "id": f"msg_fake{next(_ids)}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "usage": {
                "input_tokens": 5,
                "output_tokens": 3,
                "total_tokens": 8,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        },
        _fake_headers(),
    )


async def route_not_found(request: RecordedRequest, responder: Responder) -> None:
    await openai_error(404, f"Invalid URL ({request.method} {request.path})")(request, responder)


DEFAULT_ROUTES: dict[tuple[str, str], Behaviour] = {
    ("POST", "/v1/chat/completions"): route_chat_completions,
    ("POST", "/v1/embeddings"): route_embeddings,
    ("GET", "/v1/models"): route_models,
    ("POST", "/v1/files"): route_files,
    ("POST", "/v1/audio/transcriptions"): route_transcriptions,
    ("POST", "/v1/responses"): route_responses,
}
ECHO_PREFIX = "/v1/fake/echo"  # any method: answered by echo()


# 5. Server: an asyncio TLS server in a thread of its own. ###################################################

HEAD_LIMIT_BYTES = 1024 * 1024  # StreamReader limit: the longest head the fake accepts
IDLE_TIMEOUT_S = 300.0  # long, so that SOAKP never meets a pooled connection the fake closed mid-suite
BODY_READ_TIMEOUT_S = 60.0
MAX_REQUESTS_PER_CONNECTION = 10_000
READ_PIECE_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The client sent something that is not HTTP/1.1 as the fake understands it."""


@dataclass
class _Script:
    behaviour: Behaviour
    times: int | None


class FakeUpstream:
    """A fake OpenAI server over TLS on 127.0.0.1 (see the module docstring).

    Use: `start()`, then `url`, `requests`, `script()`, `wait_for_request()`, `reset()`, `stop()`.
    """

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(str(cert_path), str(key_path))
        self._ssl.set_alpn_protocols(["http/1.1"])
        self.port = 0
        self.connections_accepted = 0
        self.errors: list[str] = []  # faults inside the fake (bugs in a behaviour, bad framing from SOAKP)
        self._records: list[RecordedRequest] = []
        self._scripts: dict[str, _Script] = {}
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # Lifecycle

    def start(self, timeout_s: float = 10.0) -> FakeUpstream:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("fake upstream did not start")
        if self._start_error is not None:
            raise RuntimeError("fake upstream failed to start") from self._start_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(timeout_s)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    # What tests use

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request recorded since the last reset(), in arrival order (a copy of the list)."""
        with self._changed:
            return list(self._records)

    def script(self, key: str, behaviour: Behaviour, times: int | None = None) -> None:
        """Answer requests matching `key` with `behaviour` (for `times` requests, or until reset()).

        `key` is a path (`/v1/models`), a path prefix ending in `*` (`/v1/fake/*`), or a name that
        requests select with the header `X-Fake-Script: NAME`. Query strings do not take part.
        """
        with self._changed:
            self._scripts[key] = _Script(behaviour, times)

    def reset(self) -> None:
        """Forget recorded requests, scripts and errors (connections stay open and counted)."""
        with self._changed:
            self._records.clear()
            self._scripts.clear()
            self.errors.clear()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Wait until predicate() (re-checked whenever the fake records something). Returns its last value."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.1))
            return True

    def wait_for_request(
        self,
        path: str | None = None,
        predicate: Callable[[RecordedRequest], bool] | None = None,
        complete: bool = True,
        timeout_s: float = 10.0,
    ) -> RecordedRequest:
        """Return the first recorded request for `path` (and predicate); raise AssertionError on timeout.

        With complete=True the request's body must have ended too.
        """

        def find() -> RecordedRequest | None:
            for record in self._records:
                if path is not None and record.path != path:
                    continue
                if predicate is not None and not predicate(record):
                    continue
                if complete and not (record.complete or record.body_error):
                    continue
                return record
            return None

        found: list[RecordedRequest] = []

        def check() -> bool:
            record = find()
            if record is not None:
                found.append(record)
            return record is not None

        if not self.wait_until(check, timeout_s):
            seen = [(r.method, r.target) for r in self.requests]
            raise AssertionError(f"upstream got no request for {path!r} in {timeout_s}s; it saw {seen}")
        return found[0]

    # Server internals (run on the fake's own loop)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve_connection, LOOPBACK, 0, ssl=self._ssl, limit=HEAD_LIMIT_BYTES)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported to start() in the test thread
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # _shutdown() aborted every connection: let their handlers see it and return.
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._loop.stop()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _pick(self, record: RecordedRequest) -> Behaviour:
        with self._changed:
            keys = [record.header("x-fake-script"), record.path]
            chosen = next((key for key in keys if key and key in self._scripts), None)
            if chosen is None:
                prefixes = [k for k in self._scripts if k.endswith("*") and record.path.startswith(k[:-1])]
                chosen = max(prefixes, key=len) if prefixes else None
            if chosen is not None:
                entry = self._scripts[chosen]
                if entry.times is not None:
                    entry.times -= 1
                    if entry.times <= 0:
                        del self._scripts[chosen]
                return entry.behaviour
        if record.path.startswith(ECHO_PREFIX):
            return echo()
        return DEFAULT_ROUTES.get((record.method, record.path), route_not_found)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._changed:
            self.connections_accepted += 1
            connection_id = self.connections_accepted
        self._writers.add(writer)
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    return
                except asyncio.LimitOverrunError:
                    self.errors.append(f"connection {connection_id}: request head over {HEAD_LIMIT_BYTES} bytes")
                    return
                try:
                    record = parse_request_head(head, connection_id)
                except ProtocolError as exc:
                    self.errors.append(f"connection {connection_id}: {exc}")
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                with self._changed:
                    self._records.append(record)
                    self._changed.notify_all()
                if (record.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    await self._read_body(reader, record)
                except (ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as exc:
                    record._finish(error=f"{type(exc).__name__}: {exc} after {record.body_length} bytes")
                    self._notify()
                    return
                record._finish()
                self._notify()
                responder = Responder(reader, writer, record)
                await self._pick(record)(record, responder)
                if writer.is_closing() or not responder.keep_alive:
                    return
                connection = (record.header("connection") or "").lower()
                if "close" in connection or record.version == "HTTP/1.0":
                    return
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            return
        except Exception as exc:  # a bug in the fake: keep it for the test to see
            self.errors.append(f"connection {connection_id}: {type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()
            self._notify()

    async def _read_body(self, reader: asyncio.StreamReader, record: RecordedRequest) -> None:
        te = [v.strip().lower() for value in record.header_all("transfer-encoding") for v in value.split(",")]
        lengths = set(v.strip() for v in record.header_all("content-length"))
        if te and lengths:
            raise ProtocolError("both Transfer-Encoding and Content-Length (RFC 9112 6.1: smuggling)")
        if te:
            if te[-1] != "chunked":
                raise ProtocolError(f"unsupported transfer-encoding {te}")
            record.chunked = True
            await self._read_chunked(reader, record)
            return
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise ProtocolError(f"bad content-length {lengths}")
        remaining = int(next(iter(lengths))) if lengths else 0
        while remaining:
            data = await asyncio.wait_for(reader.read(min(READ_PIECE_BYTES, remaining)), BODY_READ_TIMEOUT_S)
            if not data:
                raise ProtocolError("connection closed in the middle of the body")
            remaining -= len(data)
            record._add_body(data)
            self._notify()

    async def _read_chunked(self, reader: asyncio.StreamReader, record: RecordedRequest) -> None:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), BODY_READ_TIMEOUT_S)
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                for _ in range(1000):
                    trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"), BODY_READ_TIMEOUT_S)
                    if trailer == b"\r\n":
                        return
                    name, _, value = trailer.decode("latin-1").partition(":")
                    record.trailers.append((name.strip(), value.strip()))
                raise ProtocolError("too many trailers")
            remaining = size
            while remaining:
                data = await asyncio.wait_for(reader.read(min(READ_PIECE_BYTES, remaining)), BODY_READ_TIMEOUT_S)
                if not data:
                    raise ProtocolError("connection closed in the middle of a chunk")
                remaining -= len(data)
                record._add_body(data)
                self._notify()
            if await asyncio.wait_for(reader.readexactly(2), BODY_READ_TIMEOUT_S) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")


def parse_request_head(head: bytes, connection_id: int) -> RecordedRequest:
    """Parse a request head (through its blank line) into a RecordedRequest with no body yet.

    Raises ProtocolError on anything malformed.
    """
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad request line {lines[0][:80]!r}")
    method, target, version = (part.decode("latin-1") for part in parts)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return RecordedRequest(method, target, version, headers, connection_id, raw_head=head)


# 6. Raw client: bytes out, RawResponse in, every read bounded. ##############################################


@dataclass
class RawResponse(HeaderLookup):
    """One HTTP/1.1 response as read off the wire.

    `complete` is False when the connection ended before the framing said the body was over (a
    chunked body without its last chunk, fewer bytes than Content-Length).
    """

    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool
    chunked: bool
    raw_head: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(buffer: bytes, eof: bool, method: str = "GET") -> tuple[RawResponse, int] | None:
    """Parse the first response in `buffer`; interim 1xx responses are skipped.

    Returns (response, bytes consumed), or None when more bytes are needed. With eof=True a response
    whose body was cut short comes back with complete=False instead of None.
    Raises ValueError when the bytes are not an HTTP response.
    """
    offset = 0
    while True:
        end = buffer.find(b"\r\n\r\n", offset)
        if end < 0:
            if eof and buffer[offset:]:
                raise ValueError(f"connection closed inside a response head: {buffer[offset:offset + 200]!r}")
            return None
        raw_head = buffer[offset : end + 4]
        lines = raw_head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not status_text.isdigit():
            raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
        status = int(status_text)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        body_start = end + 4
        if 100 <= status < 200 and status != 101:
            offset = body_start
            continue
        break

    def make(body: bytes, complete: bool, chunked: bool) -> RawResponse:
        return RawResponse(
            status, reason.decode("latin-1"), version.decode(), headers, body, complete, chunked, raw_head
        )

    lowered = {name.lower(): value for name, value in headers}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return make(b"", True, False), body_start
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = bytearray()
        pos = body_start
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return (make(bytes(body), False, True), len(buffer)) if eof else None
            size = int(buffer[pos:line_end].split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers follow, up to an empty line.
                pos = line_end + 2
                while True:
                    nxt = buffer.find(b"\r\n", pos)
                    if nxt < 0:
                        return (make(bytes(body), False, True), len(buffer)) if eof else None
                    if nxt == pos:
                        return make(bytes(body), True, True), nxt + 2
                    pos = nxt + 2
            data_start = line_end + 2
            if len(buffer) < data_start + size + 2:
                if eof:
                    body += buffer[data_start : data_start + size]
                    return make(bytes(body), False, True), len(buffer)
                return None
            body += buffer[data_start : data_start + size]
            pos = data_start + size + 2
    if "content-length" in lowered:
        length = int(lowered["content-length"])
        if len(buffer) - body_start >= length:
            return make(buffer[body_start : body_start + length], True, False), body_start + length
        return (make(buffer[body_start:], False, False), len(buffer)) if eof else None
    # No framing: the body runs to the end of the connection.
    return (make(buffer[body_start:], True, False), len(buffer)) if eof else None


def build_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    """Build a request head (plus body): Host first, Content-Length added when a body is given."""
    headers = list(headers)
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class RawConnection:
    """A client TCP (or TLS) connection driven byte by byte, for wire-level tests.

    Every read is bounded by a deadline; a peer reset counts as the end of the stream (`reset` says so).
    """

    def __init__(
        self, port: int, host: str = LOOPBACK, timeout_s: float = 15.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.timeout_s = timeout_s
        sock = socket.create_connection((host, port), timeout=timeout_s)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.is_tls = ssl_context is not None
        self.buffer = bytearray()
        self.eof = False
        self.reset = False
        self.send_error: BaseException | None = None
        self._sender: threading.Thread | None = None

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self._sender is not None:
                self._sender.join(5)

    def send(self, data: bytes) -> None:
        """Send all of `data` now (blocking, bounded by the socket timeout)."""
        self.sock.sendall(data)

    def send_in_background(self, data: bytes | Iterable[bytes]) -> None:
        """Send `data` from another thread, so that an early answer can be read meanwhile.

        Send errors (the server closing early) are kept in `send_error`, not raised. Plain TCP only:
        an SSL socket must not be written and read from two threads at once.
        """
        if self.is_tls:
            raise ValueError("send_in_background needs a plain TCP connection")
        pieces = [data] if isinstance(data, (bytes, bytearray)) else data

        def run() -> None:
            try:
                for piece in pieces:
                    self.sock.sendall(piece)
            except OSError as exc:
                self.send_error = exc

        self._sender = threading.Thread(target=run, name="raw-sender", daemon=True)
        self._sender.start()

    def _recv_once(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete answer in {self.timeout_s}s; got {bytes(self.buffer[:300])!r}")
        if not (self.is_tls and self.sock.pending()):
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                raise TimeoutError(f"no complete answer in time; got {bytes(self.buffer[:300])!r}")
        try:
            data = self.sock.recv(256 * 1024)
        except ConnectionResetError:
            self.eof = self.reset = True
            return
        except ssl.SSLError as exc:
            self.eof = True
            self.reset = "UNEXPECTED_EOF" in str(exc) or self.reset
            return
        if not data:
            self.eof = True
        self.buffer += data

    def read_until(self, predicate: Callable[[bytes], bool], timeout_s: float | None = None) -> bytes:
        """Read until predicate(everything received so far) holds or the peer closes; return the bytes."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while not predicate(bytes(self.buffer)) and not self.eof:
            self._recv_once(deadline)
        return bytes(self.buffer)

    def read_response(self, method: str = "GET", timeout_s: float | None = None) -> RawResponse:
        """Read one response (bounded); consume it from the buffer.

        Raises TimeoutError, or AssertionError when the peer closed before a response head.
        """
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            parsed = parse_response(bytes(self.buffer), self.eof, method)
            if parsed is not None:
                response, used = parsed
                del self.buffer[:used]
                return response
            if self.eof:
                raise AssertionError(
                    f"connection {'reset' if self.reset else 'closed'} before a response; got {bytes(self.buffer[:300])!r}"
                )
            self._recv_once(deadline)

    def wait_closed(self, timeout_s: float = 10.0) -> bool:
        """Read and keep bytes until the peer closes (or timeout_s). Returns whether it closed."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.eof:
                self._recv_once(deadline)
        except TimeoutError:
            return False
        return True


def exchange(
    port: int,
    data: bytes,
    method: str | None = None,
    timeout_s: float = 15.0,
    ssl_context: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send `data` on a new connection and return the first response (read while sending, on plain TCP)."""
    if method is None:
        method = data.split(b" ", 1)[0].decode("latin-1")
    with RawConnection(port, timeout_s=timeout_s, ssl_context=ssl_context) as conn:
        if ssl_context is None:
            conn.send_in_background(data)
        else:
            conn.send(data)
        return conn.read_response(method)



# 7. Process mode: a lean server with route tables, for bench/ and tools/. #########################
#
#   python tests/fake_upstream.py --profile bench|reliability --cert CHAIN.pem --key KEY.pem
#          (--api-key sk-... | --api-key-env NAME) [--port 0] [--no-usage]
#
# Prints `READY <tls_port> <control_port>` once both sockets listen, then serves until SIGTERM. No
# recording and no scripts: a request costs a head split, a dict lookup and one write, so that the
# upstream is never what a benchmark measures. Both profiles share:
#   TLS, HTTP/1.1 keep-alive; a request whose Authorization is not `Bearer <key>` gets 401 (counted
#   in "unauthorised"), so a proxy that forgot to swap the key shows up as errors, never as speed.
#   The control port (plain HTTP on 127.0.0.1, never counted as traffic):
#     GET /stats       {"accepts", "requests", "open", "by_path", "hold_closed", "unauthorised"}
#     POST /release    every held stream sends [DONE] and ends; streams opened later are held again
#     POST /close-idle closes every connection between requests (a load balancer's idle timeout)
# Profile `bench` (bench/run.py, bench/observability_cost.py), plain asyncio, never uvloop:
#   POST /v1/chat/completions  BENCH_CHAT_COMPLETION (fixed bytes, the same nginx serves;
#     --no-usage: a padding field of the same length instead of `usage`), or with "stream": true
#     `bench.chunks` events (default 20) `bench.interval_ms` apart (default 10), each stamped
#     `"bench_ns": time.monotonic_ns()` just before its write (CLOCK_MONOTONIC is one clock for
#     every process), then [DONE]; with `"bench": {"hold": true}` an event every interval until
#     /release or HOLD_MAX_S.
# Profile `reliability` (tools/reliability.py); answers carry x-request-id = the request's x-rel-id:
#   POST /v1/chat/completions  a chat completion (JSON), or with "stream":true a 3-event SSE stream;
#     with "max_completion_tokens" (SOAKP's budget cap) an answer using all of it, slowly, usage
#     last
#   GET  /v1/models            a model list
#   /v1/rel/echo/..., /v1/rel/smuggled   JSON naming the target, Host and body SHA-256 received
#   /v1/rel/sse?events=N&interval_ms=I   N events, then [DONE]
#   /v1/rel/hold?interval_ms=I an event now and every I ms until /release or the client leaves (when
#                              it noticed goes into "hold_closed")
#   /v1/rel/<fault>            reset-before, close-before, reset-mid, stall-head, stall-body,
#                              garbage, huge-head, bad-chunk, overflow (see rel_fault())

PROCESS_HEAD_LIMIT_BYTES = 1024 * 1024
PROCESS_MAX_BODY_BYTES = 16 * 1024 * 1024
PROCESS_MAX_CHUNKS = 100_000
PROCESS_IDLE_TIMEOUT_S = 600.0
HOLD_MAX_S = 900.0  # a held stream ends by itself after this, whatever happens to the control port
READ_BYTES = 64 * 1024
SSE_DONE = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def sse_chunk(data: bytes) -> bytes:
    """`data: <data>` as one SSE event in one HTTP chunk."""
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class ProcessState:
    """Counters and controls shared by a process-mode upstream's connections and control port."""

    def __init__(self, expected_auth: bytes | None) -> None:
        self.expected_auth = expected_auth  # None: every request is let in (observability_cost.py)
        self.accepts = 0
        self.requests = 0
        self.open = 0
        self.unauthorised = 0
        self.by_path: dict[bytes, int] = {}
        # time.monotonic() when a held stream noticed that its client left
        self.hold_closed: list[float] = []
        self.idle: set[asyncio.StreamWriter] = set()
        # /release bumps the generation and wakes every held stream; a stream started in an older
        # generation ends. A fresh Event per generation, so later held streams wait again.
        self.generation = 0
        self.release = asyncio.Event()

    def release_held(self) -> None:
        self.generation += 1
        released, self.release = self.release, asyncio.Event()
        released.set()

    def stats(self) -> dict[str, Any]:
        return {"accepts": self.accepts, "requests": self.requests, "open": self.open,
                "by_path": {path.decode("latin-1"): n for path, n in self.by_path.items()},
                "hold_closed": self.hold_closed, "unauthorised": self.unauthorised}


@dataclass(slots=True)
class Call:
    """One request in process mode: its head split into bytes, its body read whole."""

    state: ProcessState
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    method: bytes
    target: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes

    async def client_left(self, within_s: float) -> bool:
        """Whether the client closed its side within `within_s` (bytes it sends are dropped)."""
        try:
            return await asyncio.wait_for(self.reader.read(READ_BYTES), within_s) == b""
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True


Route = Callable[[Call], Awaitable[bool]]  # returns whether the connection may carry another one


@dataclass(frozen=True)
class Profile:
    """A route table: exact paths first, then prefixes in order, then `fallback`."""

    routes: dict[bytes, Route]
    prefixes: tuple[tuple[bytes, Route], ...]
    fallback: Route


async def read_process_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    """The whole body by Content-Length or chunked framing, bounded in size and chunk count."""
    length = headers.get(b"content-length")
    if length is not None:
        size = int(length)
        if size > PROCESS_MAX_BODY_BYTES:
            raise ValueError("body too large")
        return await reader.readexactly(size) if size else b""
    if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
        return b""
    parts = []
    total = 0
    for _ in range(PROCESS_MAX_CHUNKS):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > PROCESS_MAX_BODY_BYTES:
            raise ValueError("body too large")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    raise ValueError("too many chunks")


UNAUTHORIZED_BODY = (
    b'{"error":{"message":"fake upstream: wrong key","type":"invalid_request_error",'
    b'"param":null,"code":"invalid_api_key"}}'
)
UNAUTHORIZED = (
    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(UNAUTHORIZED_BODY) + UNAUTHORIZED_BODY
)


async def serve_process_connection(
    profile: Profile,
    state: ProcessState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    state.accepts += 1
    state.open += 1
    routes, by_path, expected_auth = profile.routes, state.by_path, state.expected_auth
    try:
        while True:
            state.idle.add(writer)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROCESS_IDLE_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ConnectionError, ssl.SSLError):
                return
            state.idle.discard(writer)
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
            body = await read_process_body(reader, headers)
            state.requests += 1
            path = target.split(b"?", 1)[0]
            by_path[path] = by_path.get(path, 0) + 1
            if expected_auth is not None and headers.get(b"authorization") != expected_auth:
                state.unauthorised += 1
                writer.write(UNAUTHORIZED)
            else:
                route = routes.get(path)
                if route is None:
                    route = next((r for prefix, r in profile.prefixes if path.startswith(prefix)),
                                 profile.fallback)
                call = Call(state, reader, writer, method, target, path, headers, body)
                if not await route(call):
                    return
            await writer.drain()
            if headers.get(b"connection", b"").lower() == b"close":
                return
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
            ConnectionError, ssl.SSLError, ValueError):
        return
    finally:
        state.idle.discard(writer)
        state.open -= 1
        if writer.transport.is_closing():
            writer.transport.abort()
        else:
            writer.close()


async def serve_control(state: ProcessState, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    try:
        line = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).split(b"\r\n", 1)[0]
        target = line.split(b" ")[1] if line.count(b" ") >= 1 else b""
        if target == b"/release":
            state.release_held()
            body = b'{"released":true}'
        elif target == b"/close-idle":
            closing = list(state.idle)
            for idle_writer in closing:
                idle_writer.close()
            body = json.dumps({"closed": len(closing)}).encode()
        else:
            body = json.dumps(state.stats()).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
            ConnectionError):
        pass
    finally:
        writer.close()


NOT_FOUND_EMPTY = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


async def not_found_empty(call: Call) -> bool:
    call.writer.write(NOT_FOUND_EMPTY)
    return True


# Profile `bench`: fixed bytes, built once.

_BENCH_USAGE = (b'"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18,'
                b'"prompt_tokens_details":{"cached_tokens":0},'
                b'"completion_tokens_details":{"reasoning_tokens":0}}')


def bench_chat_completion(with_usage: bool = True) -> bytes:
    """One chat completion as OpenAI sends it; without usage, a padding field of the same length."""
    usage = _BENCH_USAGE if with_usage else b'"x_pad":"' + b"x" * (len(_BENCH_USAGE) - 10) + b'"'
    return (b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion",'
            b'"created":1730000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"Hello! How can I help you today?",'
            b'"refusal":null},"logprobs":null,"finish_reason":"stop"}],' + usage
            + b',"system_fingerprint":"fp_bench"}')


BENCH_CHAT_COMPLETION = bench_chat_completion()  # bench/run.py has nginx serve the same bytes
BENCH_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                  b"Cache-Control: no-cache\r\nx-request-id: req_bench_sse\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")


def bench_json_reply(completion: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_bench\r\n"
            b"openai-processing-ms: 1\r\nContent-Length: %d\r\n\r\n" % len(completion) + completion)


def bench_sse_event(n: int) -> bytes:
    """One chat.completion.chunk event, stamped with the monotonic clock now, as one HTTP chunk."""
    event = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1730000000,'
             b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok%d"},'
             b'"finish_reason":null}],"bench_ns":%d}\n\n' % (n, time.monotonic_ns()))
    return b"%x\r\n%s\r\n" % (len(event), event)


async def bench_stream(call: Call, bench: dict[str, Any]) -> None:
    """Write SSE events paced by the loop's clock; each one stamped just before its write."""
    writer, state = call.writer, call.state
    interval_s = max(0.0, float(bench.get("interval_ms", 10))) / 1000
    hold = bool(bench.get("hold"))
    chunks = 10**9 if hold else max(1, min(int(bench.get("chunks", 20)), PROCESS_MAX_CHUNKS))
    writer.write(BENCH_SSE_HEAD + bench_sse_event(0))
    await writer.drain()
    deadline = time.monotonic() + HOLD_MAX_S
    generation = state.generation
    for n in range(1, chunks):
        if hold:
            try:
                await asyncio.wait_for(state.release.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
            if state.generation != generation or time.monotonic() > deadline:
                break
        else:
            await asyncio.sleep(interval_s)
        writer.write(bench_sse_event(n))
        await writer.drain()
    writer.write(b"%x\r\n%s\r\n" % (len(SSE_DONE), SSE_DONE) + LAST_CHUNK)


def bench_profile(with_usage: bool = True) -> Profile:
    json_reply_bytes = bench_json_reply(bench_chat_completion(with_usage))

    async def chat(call: Call) -> bool:
        if call.method != b"POST":
            call.writer.write(NOT_FOUND_EMPTY)
        elif b'"stream"' in call.body and (document := json.loads(call.body)).get("stream") is True:
            await bench_stream(call, document.get("bench") or {})
        else:
            call.writer.write(json_reply_bytes)
        return True

    return Profile({b"/v1/chat/completions": chat}, (), not_found_empty)


# Profile `reliability`: answers and faults, each answer named by the request's x-rel-id.

REL_CHAT_COMPLETION = json.dumps({
    "id": "chatcmpl-rel", "object": "chat.completion", "created": 1730000000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}, separators=(",", ":")).encode()
REL_SMUGGLED_PATH = b"/v1/rel/smuggled"


def rel_id(call: Call) -> bytes:
    # So that a client can tell its answer from another's.
    return call.headers.get(b"x-rel-id", b"req_rel")


def rel_send(call: Call, status: int, data: bytes, ctype: bytes = b"application/json") -> None:
    call.writer.write(
        b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\nx-request-id: %s\r\n\r\n"
        % (status, ctype, len(data), rel_id(call)) + data
    )


def rel_sse_head(call: Call) -> None:
    call.writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"x-request-id: %s\r\n\r\n" % rel_id(call)
    )


def rel_params(call: Call) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(call.target.decode("latin-1").partition("?")[2]))


async def rel_chat(call: Call) -> bool:
    writer = call.writer
    if b'"max_completion_tokens"' in call.body:
        # A budgeted request (SOAKP set its cap): the worst case, an answer that uses its whole cap,
        # slowly, with the usage OpenAI reports last.
        request = json.loads(call.body)
        usage = {"prompt_tokens": 10, "completion_tokens": request["max_completion_tokens"]}
        if request.get("stream"):
            rel_sse_head(call)
            for n in range(5):
                delta = b'{"choices":[{"delta":{"content":"%d"}}],"usage":null}' % n
                writer.write(sse_chunk(delta))
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(sse_chunk(json.dumps({"choices": [], "usage": usage}).encode()))
            writer.write(sse_chunk(b"[DONE]") + LAST_CHUNK)
        else:
            await asyncio.sleep(0.2)
            rel_send(call, 200, json.dumps({"choices": [], "usage": usage}).encode())
    elif b'"stream":true' in call.body.replace(b" ", b""):
        rel_sse_head(call)
        for n in range(3):
            writer.write(sse_chunk(b'{"choices":[{"delta":{"content":"%d"}}]}' % n))
        writer.write(sse_chunk(b"[DONE]") + LAST_CHUNK)
    else:
        rel_send(call, 200, REL_CHAT_COMPLETION)
    return True


async def rel_models(call: Call) -> bool:
    rel_send(call, 200, b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model"}]}')
    return True


async def rel_echo(call: Call) -> bool:
    rel_send(call, 200, json.dumps({
        "target": call.target.decode("latin-1"),
        "host": call.headers.get(b"host", b"").decode("latin-1"),
        "body_sha256": hashlib.sha256(call.body).hexdigest()}).encode())
    return True


async def rel_sse(call: Call) -> bool:
    params = rel_params(call)
    rel_sse_head(call)
    interval_s = int(params.get("interval_ms", "0")) / 1000
    for n in range(int(params.get("events", "3"))):
        call.writer.write(sse_chunk(b'{"n":%d}' % n))
        await call.writer.drain()
        if interval_s:
            await asyncio.sleep(interval_s)
    call.writer.write(sse_chunk(b"[DONE]") + LAST_CHUNK)
    return True


async def rel_hold(call: Call) -> bool:
    state, writer = call.state, call.writer
    rel_sse_head(call)
    interval_s = int(rel_params(call).get("interval_ms", "1000")) / 1000
    deadline = time.monotonic() + HOLD_MAX_S
    generation = state.generation
    n = 0
    while state.generation == generation and time.monotonic() < deadline:
        writer.write(sse_chunk(b'{"n":%d}' % n))
        n += 1
        try:
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            state.hold_closed.append(time.monotonic())
            return False
        if await call.client_left(interval_s):
            state.hold_closed.append(time.monotonic())
            return False
    writer.write(sse_chunk(b"[DONE]") + LAST_CHUNK)
    return True


async def rel_fault(call: Call) -> bool:
    """The misbehaviours, by the name after /v1/rel/; each but `overflow` ends the connection."""
    name, writer = call.path[len(b"/v1/rel/"):], call.writer
    if name == b"reset-before":
        rst(writer)
    elif name == b"close-before":
        writer.close()
    elif name == b"reset-mid":
        rel_sse_head(call)
        writer.write(sse_chunk(b'{"n":0}') + sse_chunk(b'{"n":1}'))
        await writer.drain()
        await asyncio.sleep(0.05)
        rst(writer)
    elif name in (b"stall-head", b"stall-body"):
        if name == b"stall-body":
            rel_sse_head(call)
            writer.write(sse_chunk(b'{"n":0}'))
            await writer.drain()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not await call.client_left(0.5):
            pass
        rst(writer)
    elif name == b"garbage":
        writer.write(b"\x00\xff\xfeSSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()
    elif name == b"huge-head":
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
        await writer.drain()
        writer.close()
    elif name == b"overflow":  # a body longer than its Content-Length: a second answer rides along
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
            b'{"injected":true}'
        )
        return True
    elif name == b"bad-chunk":
        rel_sse_head(call)
        writer.write(sse_chunk(b'{"n":0}') + b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        writer.close()
    else:
        writer.write(b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n")
        return True
    return False


async def rel_not_found(call: Call) -> bool:
    rel_send(call, 404, b'{"error":{"message":"no such path","type":"invalid_request_error",'
                        b'"param":null,"code":null}}')
    return True


RELIABILITY_PROFILE = Profile(
    {b"/v1/chat/completions": rel_chat, b"/v1/models": rel_models, REL_SMUGGLED_PATH: rel_echo,
     b"/v1/rel/sse": rel_sse, b"/v1/rel/hold": rel_hold},
    ((b"/v1/rel/echo", rel_echo), (b"/v1/rel/", rel_fault)),
    rel_not_found,
)


async def serve_process(
    profile: Profile, cert: str, key: str, api_key: str | None, port: int = 0
) -> None:
    """Serve `profile` over TLS and the control port until SIGTERM or SIGINT."""
    state = ProcessState(None if api_key is None else b"Bearer " + api_key.encode())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(
        lambda r, w: serve_process_connection(profile, state, r, w), LOOPBACK, port, ssl=context,
        limit=PROCESS_HEAD_LIMIT_BYTES, backlog=4096)
    control = await asyncio.start_server(lambda r, w: serve_control(state, r, w), LOOPBACK, 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gc.freeze()  # what the imports made (cryptography, for the CA) is never garbage: skip it
    print(f"READY {server.sockets[0].getsockname()[1]} {control.sockets[0].getsockname()[1]}",
          flush=True)
    async with server, control:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake OpenAI upstream in a process of its own.")
    parser.add_argument("--profile", choices=("bench", "reliability"), required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="the (test) key requests must carry; none: no check")
    keys.add_argument("--api-key-env", help="the environment variable that holds the key")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-usage", action="store_true", help="bench: answers without `usage`")
    args = parser.parse_args(argv)
    api_key = os.environ[args.api_key_env] if args.api_key_env else args.api_key
    profile = bench_profile(not args.no_usage) if args.profile == "bench" else RELIABILITY_PROFILE
    asyncio.run(serve_process(profile, args.cert, args.key, api_key, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
