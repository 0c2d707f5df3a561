"""Load and stream clients for bench/run.py, each run as its own process so it never shares a loop with
what it measures. Plain asyncio; stdlib only. Every loop is bounded in count and in time.

    python bench/clients.py load --url URL --connections C --duration-s D [--ca CA]
        keep-alive POSTs of a chat completion; the fallback when wrk is not installed. Prints one line
        `BENCH requests=.. errors=.. non2xx=.. duration_us=.. p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=..`,
        the same line bench/wrk.lua prints.
    python bench/clients.py sse --url URL --streams K --chunks M --interval-ms I [--ca CA]
                                [--connections C] [--cpu-pids PID,...]
        K streamed chat completions one after another on each of C connections (default 1), after
        one warm-up stream on each; prints one JSON line: time to first event and, per event,
        arrival minus the upstream's stamp. With C > 1 the connections run at once, their measured
        streams started I/C ms apart (independent users, not one burst every I ms). With
        --cpu-pids, also the CPU those processes used (all threads, /proc/PID/task/*/schedstat, ns)
        from the end of the last warm-up to the end of the last measured stream ("cpu_ns").
    python bench/clients.py hold --url URL --streams N --interval-ms I [--chunks M] [--ca CA]
        opens N streams at once and holds them; prints `OPEN ok=.. failed=..` once every stream has
        its first event, then waits for the streams to end and prints `DONE ok=.. errors=..
        events=..` and a JSON line of the first errors. Without --chunks the streams end at the
        upstream's /release; with --chunks M each ends by itself after M events I ms apart, and one
        that got fewer counts as an error.
The token goes in the BENCH_AUTH environment variable (`Bearer ...`), never on the command line.
The request body of `load` (and of wrk, which bench/run.py hands it) is CHAT_BODY: 231 bytes, the
size of the chat completion request issue #17 measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import ssl
import sys
import time
import urllib.parse

CHAT_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant. '
    b'Answer briefly."},{"role":"user","content":"Say hello, and name one thing you can help me '
    b'with today."}],"max_tokens":64,"temperature":0.7}'
)
MAX_HEAD_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
STAMP_RE = re.compile(rb'"bench_ns":(\d+)')
REQUEST_TIMEOUT_S = 10.0
MAX_EVENTS_PER_STREAM = 1_000_000


class Target:
    """Where requests go: plain http:// (a proxy) or https:// (the upstream, verified with --ca)."""

    def __init__(self, url: str, ca: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path or "/v1/chat/completions"
        self.context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.context = ssl.create_default_context(cafile=ca)
            self.context.check_hostname = False  # the bench CA's leaf names localhost and 127.0.0.1 anyway
        self.auth = os.environ.get("BENCH_AUTH", "").encode()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.context, limit=MAX_HEAD_BYTES), REQUEST_TIMEOUT_S)

    def request(self, body: bytes) -> bytes:
        return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (self.path.encode(), self.host.encode(), self.port, self.auth,
                                                   len(body), body))


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


class ChunkedDecoder:
    """Incremental Transfer-Encoding: chunked decoding: feed() bytes as they arrive, get body bytes back."""

    def __init__(self) -> None:
        self.buffer = b""
        self.data_left = 0  # body bytes left in the current chunk
        self.crlf_left = 0  # bytes left of the CRLF that ends it
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = []
        while not self.done:
            if self.data_left:
                piece = self.buffer[:self.data_left]
                self.buffer = self.buffer[len(piece):]
                self.data_left -= len(piece)
                out.append(piece)
                if self.data_left:
                    break
                self.crlf_left = 2
            if self.crlf_left:
                skipped = min(self.crlf_left, len(self.buffer))
                self.buffer = self.buffer[skipped:]
                self.crlf_left -= skipped
                if self.crlf_left:
                    break
            end = self.buffer.find(b"\r\n")
            if end == -1:
                break
            size = int(self.buffer[:end].split(b";")[0], 16)
            self.buffer = self.buffer[end + 2:]
            if size == 0:
                self.done = True  # these servers send no trailers; the final CRLF may still follow
                break
            self.data_left = size
        return b"".join(out)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole response (Content-Length or chunked). Returns (status, body)."""
    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        decoder = ChunkedDecoder()
        body = []
        for _ in range(MAX_EVENTS_PER_STREAM):
            data = await reader.read(READ_BYTES)
            if not data:
                raise ConnectionError("closed inside a chunked body")
            body.append(decoder.feed(data))
            if decoder.done:
                return status, b"".join(body)
        raise ConnectionError("chunked body too long")
    return status, b""


def percentile(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


# load ######################################################################################################

async def load(args: argparse.Namespace) -> None:
    target = Target(args.url, args.ca)
    request = target.request(CHAT_BODY)
    latencies: list[int] = []
    counts = {"errors": 0, "non2xx": 0}
    started = time.monotonic()
    deadline = started + args.duration_s

    async def one_connection() -> None:
        reader = writer = None
        while time.monotonic() < deadline:
            try:
                if writer is None:
                    reader, writer = await target.connect()
                sent = time.perf_counter_ns()
                writer.write(request)
                status, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
                latencies.append((time.perf_counter_ns() - sent) // 1000)
                if not 200 <= status < 300:
                    counts["non2xx"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ValueError, IndexError):
                counts["errors"] += 1
                if writer is not None:
                    writer.transport.abort()
                reader = writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.transport.abort()

    await asyncio.gather(*(one_connection() for _ in range(args.connections)))
    elapsed_us = int((time.monotonic() - started) * 1e6)
    latencies.sort()
    print("BENCH requests=%d errors=%d non2xx=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d"
          % (len(latencies), counts["errors"], counts["non2xx"], elapsed_us, percentile(latencies, 50),
             percentile(latencies, 90), percentile(latencies, 99), percentile(latencies, 99.9),
             latencies[-1] if latencies else 0), flush=True)


# sse #######################################################################################################

async def one_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                     on_event: object | None = None) -> dict:
    """Send one streaming request and read its events. Returns times in ns and the events' stamps."""
    sent_ns = time.monotonic_ns()
    writer.write(request)
    status, headers = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S))
    if status != 200:
        raise ValueError(f"status {status}")
    chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
    decoder = ChunkedDecoder()
    pending = b""
    first_ns = 0
    delays_ns: list[int] = []
    coalesced = 0
    done = False
    for _ in range(MAX_EVENTS_PER_STREAM):
        data = await asyncio.wait_for(reader.read(READ_BYTES), REQUEST_TIMEOUT_S)
        now_ns = time.monotonic_ns()
        if not data:
            raise ConnectionError("stream closed before [DONE]")
        pending += decoder.feed(data) if chunked else data
        events, _, pending = pending.rpartition(b"\n\n")
        stamps = STAMP_RE.findall(events)
        if len(stamps) > 1:
            coalesced += len(stamps) - 1  # events that reached the client in one read: held back somewhere
        for stamp in stamps:
            if not first_ns:
                first_ns = now_ns
            delays_ns.append(now_ns - int(stamp))
            if on_event is not None:
                on_event()
        if b"data: [DONE]" in events:
            done = True
        if done and (decoder.done or not chunked):
            break
    else:
        raise ValueError("too many events")
    return {"ttfc_ns": first_ns - sent_ns, "delays_ns": delays_ns, "coalesced": coalesced}


STREAM_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                 asyncio.TimeoutError, ValueError)
HAVE_SCHEDSTAT = os.path.exists("/proc/self/schedstat")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ns(pids: list[int]) -> int:
    """CPU time every thread of these processes has used so far, in ns: the first field of each
    /proc/PID/task/TID/schedstat (ns resolution, where /proc/PID/stat counts 10 ms ticks); ticks
    only when the kernel has no schedstat. A thread that exits takes its time with it."""
    total = 0
    for pid in pids:
        if not HAVE_SCHEDSTAT:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK
            except (OSError, ValueError, IndexError):
                pass
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


async def sse(args: argparse.Namespace) -> None:
    target = Target(args.url, args.ca)
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "Hi"}],
                       "bench": {"chunks": args.chunks, "interval_ms": args.interval_ms}}).encode()
    request = target.request(body)
    pids = [int(pid) for pid in args.cpu_pids.split(",") if pid] if args.cpu_pids else []
    result = {"ttfc_us": [], "delay_us": [], "coalesced": 0, "events": 0, "errors": 0, "error": "",
              "connections": args.connections, "cpu_ns": None}
    warming = [args.connections]
    go = asyncio.Event()
    cpu0 = 0

    def warmed() -> None:
        nonlocal cpu0
        warming[0] -= 1
        if warming[0] == 0:
            cpu0 = cpu_ns(pids) if pids else 0
            go.set()

    async def one_connection(index: int) -> None:
        conn: list = [None, None]  # reader, writer; None after an error, until the next stream

        async def stream() -> dict | None:
            try:
                if conn[1] is None:
                    conn[:] = await target.connect()
                return await one_stream(conn[0], conn[1], request)
            except STREAM_ERRORS as exc:
                result["errors"] += 1
                result["error"] = f"{exc.__class__.__name__}: {exc}"
                if conn[1] is not None:
                    conn[1].transport.abort()
                conn[:] = [None, None]
                return None

        try:
            await stream()  # warm-up: the first stream also opens the proxy's upstream connection
            warmed()
            await go.wait()
            if args.connections > 1:
                await asyncio.sleep(index * args.interval_ms / 1000 / args.connections)
            for _ in range(args.streams):
                got = await stream()
                if got is None:
                    continue
                result["ttfc_us"].append(got["ttfc_ns"] / 1000)
                result["delay_us"].extend(d / 1000 for d in got["delays_ns"])
                result["coalesced"] += got["coalesced"]
                result["events"] += len(got["delays_ns"])
        finally:
            if conn[1] is not None:
                conn[1].transport.abort()

    await asyncio.gather(*(one_connection(i) for i in range(args.connections)))
    if pids:
        result["cpu_ns"] = cpu_ns(pids) - cpu0
    print(json.dumps(result), flush=True)


# hold ######################################################################################################

async def hold(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    target = Target(args.url, args.ca)
    shape = ({"chunks": args.chunks, "interval_ms": args.interval_ms} if args.chunks else
             {"hold": True, "interval_ms": args.interval_ms})
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "Hi"}], "bench": shape}).encode()
    request = target.request(body)
    opening = asyncio.Semaphore(args.open_concurrency)  # under the listen backlog
    opened = {"ok": 0, "failed": 0}
    all_open = asyncio.Event()
    results = {"ok": 0, "errors": 0, "events": 0, "first_errors": []}

    def settled() -> None:
        if opened["ok"] + opened["failed"] == args.streams:
            all_open.set()

    async def one() -> None:
        first = True
        writer = None
        events = 0

        def on_event() -> None:
            nonlocal first, events
            events += 1
            if first:
                first = False
                opened["ok"] += 1
                settled()
                opening.release()

        await opening.acquire()
        try:
            reader, writer = await target.connect()
            await one_stream(reader, writer, request, on_event)
            if args.chunks and events != args.chunks:
                raise ValueError(f"short stream: {events} of {args.chunks} events")
            results["ok"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError) as exc:
            results["errors"] += 1
            if len(results["first_errors"]) < 5:
                results["first_errors"].append(f"{exc.__class__.__name__}: {exc}")
            if first:
                first = False
                opened["failed"] += 1
                settled()
                opening.release()
        finally:
            results["events"] += events
            if writer is not None:
                writer.transport.abort()

    tasks = [asyncio.create_task(one()) for _ in range(args.streams)]
    try:
        await asyncio.wait_for(all_open.wait(), args.open_timeout_s)
    except asyncio.TimeoutError:
        pass
    print(f"OPEN ok={opened['ok']} failed={opened['failed']}", flush=True)
    await asyncio.wait(tasks, timeout=args.hold_timeout_s)
    for task in tasks:
        if not task.done():
            task.cancel()
            results["errors"] += 1
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"DONE ok={results['ok']} errors={results['errors']} events={results['events']}", flush=True)
    print(json.dumps({"first_errors": results["first_errors"]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("load", "sse", "hold"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--connections", type=int, default=1, help="load, sse: how many at once")
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=None,
                        help="events per stream (sse: default 20; hold: none, held until /release)")
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--cpu-pids", default="", help="sse: pids whose CPU to measure (a,b,..)")
    parser.add_argument("--open-concurrency", type=int, default=64)
    parser.add_argument("--open-timeout-s", type=float, default=60.0)
    parser.add_argument("--hold-timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if args.mode == "sse" and args.chunks is None:
        args.chunks = 20
    asyncio.run({"load": load, "sse": sse, "hold": hold}[args.mode](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
