"""A fake OpenAI upstream over TLS for bench/run.py: plain asyncio (never uvloop), one process.

    python bench/upstream.py --cert CHAIN.pem --key KEY.pem --api-key sk-... [--port 0]

Prints `READY <tls_port> <control_port>` on stdout once both sockets listen, then serves until SIGTERM.

TLS port, HTTP/1.1 keep-alive; a request whose Authorization is not `Bearer <--api-key>` gets 401, so a
proxy that forgot to swap the key shows up as errors, never as speed:
  POST /v1/chat/completions, body without `"stream": true`  -> CHAT_COMPLETION (fixed JSON, Content-Length)
  ... with `"stream": true`                                 -> SSE, chunked like OpenAI's:
        `bench.chunks` events (default 20) `bench.interval_ms` apart (default 10), then `data: [DONE]`.
        Each event carries `"bench_ns": time.monotonic_ns()` read just before it is written. Linux's
        CLOCK_MONOTONIC is one clock for every process, so a client subtracts it from its own reading.
  ... with `"bench": {"hold": true}`                        -> one event every interval until a release
        (below) or HOLD_MAX_S, then [DONE]: the slow streams of the memory scenario.
Control port (plain HTTP on 127.0.0.1, never counted as traffic):
  GET /stats    -> {"accepts": TLS connections accepted, "requests": n, "open": connections now open}
  POST /release -> every held stream sends [DONE] and ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time

# One chat completion as OpenAI sends it; run.py serves the same bytes from nginx.
CHAT_COMPLETION = json.dumps({
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1730000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
    "system_fingerprint": "fp_bench",
}, separators=(",", ":")).encode()
RESPONSE_HEADERS = b"Content-Type: application/json\r\nx-request-id: req_bench\r\nopenai-processing-ms: 1\r\n"
JSON_REPLY = (b"HTTP/1.1 200 OK\r\n" + RESPONSE_HEADERS
              + b"Content-Length: %d\r\n\r\n" % len(CHAT_COMPLETION) + CHAT_COMPLETION)
UNAUTHORIZED_BODY = (b'{"error":{"message":"bench upstream: wrong key","type":"invalid_request_error",'
                     b'"code":"invalid_api_key"}}')
UNAUTHORIZED = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(UNAUTHORIZED_BODY) + UNAUTHORIZED_BODY)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
            b"x-request-id: req_bench_sse\r\nTransfer-Encoding: chunked\r\n\r\n")
SSE_DONE = b"data: [DONE]\n\n"
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CHUNKS = 100_000
HOLD_MAX_S = 300.0  # a held stream ends by itself after this, whatever happens to the control port
IDLE_TIMEOUT_S = 120.0


class Stats:
    def __init__(self) -> None:
        self.accepts = 0
        self.requests = 0
        self.open = 0
        # POST /release bumps the generation and wakes every held stream; a stream started in an older
        # generation ends. A fresh Event per generation, so later held streams wait again.
        self.generation = 0
        self.release = asyncio.Event()

    def release_held(self) -> None:
        self.generation += 1
        released, self.release = self.release, asyncio.Event()
        released.set()


def sse_event(n: int) -> bytes:
    """One chat.completion.chunk event, stamped with the monotonic clock now, as one HTTP chunk."""
    event = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1730000000,'
             b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok%d"},"finish_reason":null}],'
             b'"bench_ns":%d}\n\n' % (n, time.monotonic_ns()))
    return b"%x\r\n%s\r\n" % (len(event), event)


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    length = headers.get(b"content-length")
    if length is not None:
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return await reader.readexactly(size) if size else b""
    if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
        return b""
    parts = []
    total = 0
    for _ in range(MAX_CHUNKS):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY_BYTES:
            raise ValueError("body too large")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    raise ValueError("too many chunks")


async def stream_events(writer: asyncio.StreamWriter, stats: Stats, bench: dict) -> None:
    """Write SSE events paced by the loop's clock; each one stamped just before its write."""
    interval_s = max(0.0, float(bench.get("interval_ms", 10))) / 1000
    hold = bool(bench.get("hold"))
    chunks = 10**9 if hold else max(1, min(int(bench.get("chunks", 20)), MAX_CHUNKS))
    writer.write(SSE_HEAD + sse_event(0))
    await writer.drain()
    deadline = time.monotonic() + HOLD_MAX_S
    generation = stats.generation
    for n in range(1, chunks):
        if hold:
            try:
                await asyncio.wait_for(stats.release.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
            if stats.generation != generation or time.monotonic() > deadline:
                break
        else:
            await asyncio.sleep(interval_s)
        writer.write(sse_event(n))
        await writer.drain()
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE_DONE), SSE_DONE))
    await writer.drain()


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Stats,
                           expected_auth: bytes) -> None:
    stats.accepts += 1
    stats.open += 1
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ConnectionError, ssl.SSLError):
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
            body = await read_body(reader, headers)
            stats.requests += 1
            if headers.get(b"authorization") != expected_auth:
                writer.write(UNAUTHORIZED)
            elif method == b"POST" and target.split(b"?")[0] == b"/v1/chat/completions":
                document = json.loads(body) if b'"stream"' in body else {}
                if document.get("stream") is True:
                    await stream_events(writer, stats, document.get("bench") or {})
                else:
                    writer.write(JSON_REPLY)
            else:
                writer.write(NOT_FOUND)
            await writer.drain()
            if headers.get(b"connection", b"").lower() == b"close":
                return
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        stats.open -= 1
        writer.transport.abort()


async def serve_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Stats) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if head.startswith(b"POST /release"):
            stats.release_held()
            body = b'{"released":true}'
        else:
            body = json.dumps({"accepts": stats.accepts, "requests": stats.requests, "open": stats.open}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    stats = Stats()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    expected_auth = b"Bearer " + args.api_key.encode()
    server = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, stats, expected_auth), "127.0.0.1", args.port, ssl=context,
        limit=MAX_HEAD_BYTES, backlog=4096)
    control = await asyncio.start_server(lambda r, w: serve_control(r, w, stats), "127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]} {control.sockets[0].getsockname()[1]}", flush=True)
    async with server, control:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
