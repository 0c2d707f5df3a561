"""What SOAKP's access log and usage accounting cost, in SOAKP's CPU time per request (issue #7).

    python bench/observability_cost.py [--requests N] [--connections C] [--rounds R] [--python PATH]
    python bench/observability_cost.py micro      (the same costs in-process, one piece at a time)

On 127.0.0.1 only, it starts:
  * two upstreams (tests/fake_upstream.py `--profile bench`, no key check): plain asyncio over TLS
    (a test CA from the same module), HTTP/1.1 keep-alive, each answering every chat completion
    with the same fixed bytes, one with its `usage` object and one without it (`--no-usage`:
    padded to the same length, so both relay the same number of bytes);
  * for each measurement a fresh SOAKP (`soakp.py serve`, stderr to a file, as under a service manager),
    and a load client (this script, `client` mode): C keep-alive connections, N requests in all.
Four variants: `--log-level warning` (no access log) or `info` (the default), times an answer with usage
(SOAKP reads it and counts it per token and per sub) or without. For each, SOAKP's utime + stime from
/proc/PID/stat are read around N requests, after a warm-up, and divided by N. Variants
are interleaved round by round, so drift hits each alike; the table gives the median of R rounds, the
median of the per-round differences from the first variant, and "other load": the CPU that processes other than these used meanwhile
(from /proc/stat), which says how far to trust a run. Nothing here asserts on speed. Every process started
is stopped.

On a shared machine the end-to-end figures move by several microseconds from round to round; `micro`
times the pieces themselves (best of 5 timeit repeats, no sockets): reading the usage from an answer,
recording it (per token and in the metrics), and building and writing an access log line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_upstream import CertAuthority, bench_chat_completion  # noqa: E402
from proc_helpers import listening_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 15.0
CLIENT_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
CHAT_BODY = (b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
             b'{"role":"user","content":"Say hello."}],"max_tokens":32}')
# client mode ################################################################################################

async def run_client(port: int, requests: int, connections: int) -> None:
    auth = os.environ["BENCH_AUTH"].encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (port, auth, len(CHAT_BODY))
               + CHAT_BODY)
    left = [requests]
    counts = {"ok": 0, "errors": 0}

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_HEAD_BYTES)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
                length = next(int(line[15:]) for line in head.split(b"\r\n")
                              if line[:15].lower() == b"content-length:")
                await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT_S)
                counts["ok" if head.startswith(b"HTTP/1.1 200 ") else "errors"] += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    print(f"DONE ok={counts['ok']} errors={counts['errors']} seconds={time.monotonic() - started:.3f} "
          f"cpu_s={time.process_time():.3f}", flush=True)


# main mode: start everything, measure ######################################################################

def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (fields 14 and 15 of proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SOAKP_", "OPENAI_"))}


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def start_upstream(work: Path, cert: Path, key: Path, with_usage: bool) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--profile", "bench",
            "--cert", str(cert), "--key", str(key), *([] if with_usage else ["--no-usage"])]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline() if child.stdout else ""
    if not line.startswith("READY "):
        stop(child)
        raise RuntimeError(f"upstream did not start: {line!r}")
    return child, int(line.split()[1])


def start_soakp(args: argparse.Namespace, work: Path, upstream_port: int, log_level: str,
                name: str) -> tuple[subprocess.Popen, int]:
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed once the child has its copy
    with log:
        child = subprocess.Popen(
            [args.python, str(ROOT / "soakp.py"), "serve", "--listen", "127.0.0.1:0", "--secret-file",
             str(work / "secret"), "--db", ":memory:", "--upstream", f"https://127.0.0.1:{upstream_port}",
             "--upstream-ca", str(work / "ca" / "ca.pem"), "--log-level", log_level, "--shutdown-grace", "1s"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=work)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and child.poll() is None:
        port = listening_port(child.pid)
        if port is not None:
            return child, port
        time.sleep(0.02)
    stop(child)
    raise RuntimeError(f"soakp did not listen: {(work / f'{name}.log').read_text()[-2000:]}")


def load(port: int, token: str, requests: int, connections: int) -> tuple[int, int, float, float]:
    """Run the client to completion. Returns (ok, errors, seconds, the client's own CPU seconds)."""
    done = subprocess.run([sys.executable, __file__, "client", "--port", str(port), "--requests", str(requests),
                           "--connections", str(connections)], capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, env={**os.environ, "BENCH_AUTH": "Bearer " + token}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr[-2000:]}")
    figures = dict(item.split("=") for item in done.stdout.split()[1:])
    return int(figures["ok"]), int(figures["errors"]), float(figures["seconds"]), float(figures["cpu_s"])


def measure_once(args: argparse.Namespace, work: Path, token: str, upstream: tuple[subprocess.Popen, int],
                 level: str, name: str) -> tuple[float, float, float]:
    """One fresh SOAKP, a warm-up, then N measured requests.

    Returns (SOAKP CPU us per request, requests/s, % of all CPUs used by other processes meanwhile).
    """
    child, port = start_soakp(args, work, upstream[1], level, name)
    try:
        load(port, token, args.warmup, args.connections)
        soakp_before, upstream_before, machine_before = cpu_ticks(child.pid), cpu_ticks(upstream[0].pid), machine_ticks()
        ok, errors, seconds, client_s = load(port, token, args.requests, args.connections)
        used = cpu_ticks(child.pid) - soakp_before
        busy, total = (after - first for after, first in zip(machine_ticks(), machine_before))
        ours = used + cpu_ticks(upstream[0].pid) - upstream_before + client_s * CLK_TCK
    finally:
        stop(child)
    if errors or ok != args.requests:
        raise RuntimeError(f"{name} at {level}: {ok} ok, {errors} errors of {args.requests}")
    lines = sum(1 for line in (work / f"{name}.log").read_text().splitlines() if line.startswith("{"))
    expected_lines = args.warmup + args.requests if level == "info" else 0
    if lines != expected_lines:
        raise RuntimeError(f"{name} at {level}: {lines} access log lines, expected {expected_lines}")
    return used / CLK_TCK / args.requests * 1e6, args.requests / seconds, max(0.0, (busy - ours) / total * 100)


VARIANTS = [  # (label, --log-level, answer carries usage)
    ("no access log, no usage", "warning", False),
    ("no access log, usage", "warning", True),
    ("access log, no usage", "info", False),
    ("access log, usage (default)", "info", True),
]


def measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="soakp-obs-") as tmp:
        work = Path(tmp)
        cert, key = CertAuthority(work / "ca", common_name="SOAKP Bench CA").issue("upstream")
        (work / "secret").write_text(secrets.token_urlsafe(48) + "\n")
        minted = subprocess.run([args.python, str(ROOT / "soakp.py"), "mint", "--secret-file", str(work / "secret"),
                                 "--db", ":memory:", "--key", "sk-bench-" + secrets.token_hex(8), "--sub", "bench"],
                                capture_output=True, text=True, timeout=60, env=clean_env(), cwd=work, check=False)
        if minted.returncode != 0:
            raise RuntimeError(minted.stderr)
        token = minted.stdout.strip().splitlines()[-1]
        upstreams = {flag: start_upstream(work, cert, key, flag) for flag in (False, True)}
        results: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
        rates: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
        other: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
        try:
            for round_no in range(args.rounds):
                order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                for label, level, with_usage in order:
                    for attempt in range(1, args.attempts + 1):  # a busy machine spoils a round: redo it
                        figures = measure_once(args, work, token, upstreams[with_usage], level, f"soakp-{round_no}")
                        if figures[2] <= args.max_other_load or attempt == args.attempts:
                            break
                        print(f"round {round_no + 1} {label}: other load {figures[2]:.0f}%, measuring again",
                              flush=True)
                    for store, value in zip((results, rates, other), figures):
                        store[label].append(value)
                    print(f"round {round_no + 1}/{args.rounds} {label:30s} {figures[0]:7.1f} us/request "
                          f"({figures[1]:.0f} requests/s, other load {figures[2]:.0f}%)", flush=True)
        finally:
            for child, _ in upstreams.values():
                stop(child)

    medians = {label: statistics.median(values) for label, values in results.items()}
    base_label = VARIANTS[0][0]
    print()
    print(f"SOAKP CPU per request: {args.requests} requests x {args.rounds} rounds, {args.connections} keep-alive "
          f"connections, {args.python} (uvloop: {uvloop_version(args.python) or 'no'}), {os.cpu_count()} CPUs")
    print(f"| variant | CPU us/request (median) | rounds | over \"{base_label}\" (median of per-round differences) "
          "| requests/s (median) | other load |")
    print("|---|---:|---|---:|---:|---:|")
    for label, _, _ in VARIANTS:
        shown = ", ".join(f"{v:.1f}" for v in results[label])
        paired = statistics.median(v - b for v, b in zip(results[label], results[base_label]))
        print(f"| {label} | {medians[label]:.1f} | {shown} | {paired:+.1f} ({paired / medians[base_label] * 100:+.1f}%) "
              f"| {statistics.median(rates[label]):.0f} | {max(other[label]):.0f}% |")
    print("other load: the largest share of all CPUs, in any round, busy with processes other than SOAKP, the "
          "upstream and the client; above a few percent the figures are noisy.")
    if args.json:
        Path(args.json).write_text(json.dumps({"results_us": results, "rates": rates, "other_load_pct": other,
                                               "requests": args.requests,
                                               "connections": args.connections}, indent=2))
    return 0


def micro(number: int) -> int:
    """Time each piece of observability work per request, in-process, with and without usage."""
    sys.path.insert(0, str(ROOT))
    import soakp  # only this mode uses soakp's internals

    config, _ = soakp.load_config(["serve", "--secret", "s" * 40, "--db", ":memory:"], {})
    state = soakp.build_state(config)
    head = soakp.parse_request_head(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soakp\r\nContent-Length: "
                                    b"%d\r\n\r\n" % len(CHAT_BODY))
    claims = soakp.TokenClaims(jti="j" * 22, kid="k" * 16, sub="bench", iat=0, exp=2**31, key="sk-bench")
    # Fields without a default (a per-request watchdog, say) are not used by what is timed here.
    required = {f.name: None for f in dataclasses.fields(soakp.Exchange) if f.name != "started"
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    def exchange(usage: tuple[int, int] | None) -> object:
        return soakp.Exchange(started=time.monotonic(), **required, status=200, route="/v1/chat", claims=claims,
                              metered=True, usage=usage, model="gpt-4o-mini", request_id="req_bench",
                              upstream_started=1.0, upstream_s=0.001, first_byte_s=0.001, bytes_in=len(CHAT_BODY),
                              bytes_out=600)

    def best_us(run: object) -> float:
        return min(timeit.repeat(run, number=number, repeat=5)) / number * 1e6

    rows = []
    with tempfile.TemporaryFile("w") as sink:
        for with_usage in (False, True):
            body = bench_chat_completion(with_usage)
            resp = soakp.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                             b"Content-Length: %d\r\n\r\n" % len(body), "POST")
            done = exchange((9, 9) if with_usage else None)

            def meter(resp: object = resp, body: bytes = body) -> object:
                reader = soakp.UsageMeter.for_response(resp)
                reader.feed(body)
                return reader.usage()

            def account(done: object = done) -> None:
                soakp.record_outcome(state, done)
                state.metrics.record(done, 0.002)

            line = soakp.access_log_line(state, done, "127.0.0.1", head, 0.002)
            batch = "\n".join([line] * 256) + "\n"  # SOAKP writes the access log in batches of up to 256

            def write(batch: str = batch) -> None:
                sink.write(batch)
                sink.flush()

            rows.append((with_usage, best_us(meter), best_us(account),
                         best_us(lambda done=done: soakp.access_log_line(state, done, "127.0.0.1", head, 0.002)),
                         min(timeit.repeat(write, number=max(1, number // 256), repeat=5)) / max(1, number // 256)
                         / 256 * 1e6))
    state.registry.close()
    print(f"Per request, in microseconds (best of 5 x {number}), {sys.executable}:")
    print("| answer | read usage (UsageMeter) | record it (token + metrics) | build access log line | "
          "write it (batched) |")
    print("|---|---:|---:|---:|---:|")
    for with_usage, *figures in rows:
        print(f"| {'with usage' if with_usage else 'without usage'} | " + " | ".join(f"{f:.2f}" for f in figures)
              + " |")
    return 0


def uvloop_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import uvloop; print(uvloop.__version__)"], capture_output=True, text=True,
                         timeout=30, check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description="SOAKP's CPU cost of access logging and usage accounting.")
    sub = parser.add_subparsers(dest="mode")
    pieces = sub.add_parser("micro")
    pieces.add_argument("--number", type=int, default=20000, help="calls per timeit repeat")
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--requests", type=int, required=True)
    client.add_argument("--connections", type=int, required=True)
    parser.add_argument("--requests", type=int, default=20000, help="measured requests per variant and round")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before each measurement")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive client connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs soakp.py")
    parser.add_argument("--max-other-load", type=float, default=10.0,
                        help="measure a variant again when other processes used more than this %% of all CPUs")
    parser.add_argument("--attempts", type=int, default=3, help="at most this many measurements per variant and round")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.mode == "micro":
        return micro(args.number)
    if args.mode == "client":
        asyncio.run(run_client(args.port, args.requests, args.connections))
        return 0
    return measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
