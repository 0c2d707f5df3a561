"""What sharing state through Redis (`--redis`, issue 13) costs a request, for bench/run.py (its
last table) or on its own:

    python bench/shared_state.py [--requests 3000] [--python PY] [--markdown FILE]

One SOAKP without --redis and one with a private redis-server on loopback, side by side against
the fake upstream. For a token with `rpm` and a budget (`max_tokens_total`): latency at c=1 (one
keep-alive connection to each, sequential chat completions) and CPU per request of each SOAKP
process, the two taking turns in ROUNDS rounds so that a change in the machine's load (other work
on a shared machine) falls on both columns alike, not on one of them. For a
token with neither: Redis's own `INFO commandstats` over the same number of requests, less what the
background tasks send meanwhile (measured over an idle stretch as long), which shows that such a
token costs no round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "tests"))
from proc_helpers import stop_process  # noqa: E402 - tests/ helpers, path set above
from redis_servers import RedisServer, redis_cli  # noqa: E402

START_TIMEOUT_S = 15.0
REQUESTS = 3000
ROUNDS = 10  # turns of the two SOAKPs in the latency comparison
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":20}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Client:
    """One keep-alive HTTP/1.1 connection sending the same chat completion again and again."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (token.encode(), len(BODY), BODY)
        )
        self.buffer = b""

    def once(self) -> int:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
        while len(rest) < length:
            rest += self.recv()
        self.buffer = rest[length:]
        return int(head.split(b" ", 2)[1])

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        return data

    def close(self) -> None:
        self.sock.close()


class Run:
    def __init__(self, python: str, soakp: Path) -> None:
        self.python, self.soakp = python, soakp
        self.dir = Path(tempfile.mkdtemp(prefix="soakp-bench-shared-"))
        self.children: list[subprocess.Popen[bytes]] = []
        self.redis_servers: list[RedisServer] = []
        self.api_key = "sk-bench-" + secrets.token_urlsafe(18)
        (self.dir / "secret").write_text(secrets.token_urlsafe(48))
        from fake_upstream import CertAuthority  # noqa: PLC0415 - tests/ helper

        self.ca = CertAuthority(self.dir / "ca", common_name="SOAKP Bench CA")
        cert, key = self.ca.issue("upstream", hosts=("127.0.0.1", "localhost"))
        upstream = self.spawn(
            "upstream",
            [
                sys.executable,
                str(BENCH_DIR.parent / "tests" / "fake_upstream.py"),
                "--profile",
                "bench",
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--api-key",
                self.api_key,
            ],
            pipe=True,
        )
        assert upstream.stdout is not None
        self.upstream_port = int(upstream.stdout.readline().split()[1])

    def spawn(self, name: str, argv: Sequence[str], pipe: bool = False) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{name}.log", "ab") as log:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                cwd=self.dir,
            )
        self.children.append(child)
        return child

    def mint(self, *flags: str) -> str:
        done = subprocess.run(
            [
                self.python,
                str(self.soakp),
                "mint",
                "--secret-file",
                str(self.dir / "secret"),
                "--db",
                str(self.dir / "mint.db"),
                "--key",
                self.api_key,
                "--ttl",
                "1d",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
        )
        return done.stdout.strip().splitlines()[-1]

    def redis(self) -> int:
        server = RedisServer(self.dir / "redis").start()
        self.redis_servers.append(server)
        return server.port

    def commands(self, port: int, scripts: bool = False) -> int:
        """Commands Redis ran (those inside scripts included), or (`scripts`) scripts: round
        trips."""
        stats = redis_cli(port, "INFO", "commandstats")
        pattern = (
            r"^cmdstat_(evalsha|eval):calls=(\d+)"
            if scripts
            else r"^cmdstat_(?!info)(\w+):calls=(\d+)"
        )
        return sum(int(n) for _, n in re.findall(pattern, stats, re.MULTILINE))

    def script_usec(self, port: int) -> int:
        """Microseconds Redis spent running scripts, by its own count (part of each round trip)."""
        stats = redis_cli(port, "INFO", "commandstats")
        pattern = r"^cmdstat_(?:evalsha|eval):calls=\d+,usec=(\d+)"
        return sum(int(n) for n in re.findall(pattern, stats, re.MULTILINE))

    def soakp_serve(self, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        child = self.spawn(
            f"soakp-{port}",
            [
                self.python,
                str(self.soakp),
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--secret-file",
                str(self.dir / "secret"),
                "--db",
                str(self.dir / f"soakp-{port}.db"),
                "--upstream",
                f"https://127.0.0.1:{self.upstream_port}",
                "--upstream-ca",
                str(self.ca.ca_path),
                "--log-level",
                "warning",
                *flags,
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return child, port
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError(
                        f"soakp did not start: {(self.dir / f'soakp-{port}.log').read_text()}"
                    )
                time.sleep(0.05)

    def close(self) -> None:
        for server in self.redis_servers:
            server.stop()
        for child in reversed(self.children):
            stop_process(child, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def summary(latencies: list[float], cpu: float) -> dict[str, float]:
    latencies = sorted(latencies)
    n = len(latencies)
    return {
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, n * 99 // 100)] * 1000,
        "cpu_ms": cpu / n * 1000,
        "wall_s": sum(latencies),
    }


def timed_turns(targets: Sequence[tuple[int, int]], token: str, n: int) -> list[dict[str, float]]:
    """n requests to each (port, pid), one keep-alive connection each, in ROUNDS turns that
    alternate which goes first."""
    clients = [Client(port, token) for port, _ in targets]
    try:
        for client in clients:
            for _ in range(min(200, n)):  # warm up: TLS to the upstream, caches, script loading
                assert client.once() == 200
        latencies: list[list[float]] = [[] for _ in targets]
        cpu = [0.0 for _ in targets]
        rounds = min(ROUNDS, n)
        for turn in range(rounds):
            count = n // rounds + (turn < n % rounds)
            order = list(range(len(targets)))
            for i in order if turn % 2 == 0 else order[::-1]:
                pid, client, seen = targets[i][1], clients[i], latencies[i]
                cpu_before = cpu_s(pid)
                for _ in range(count):
                    started = time.perf_counter()
                    status = client.once()
                    seen.append(time.perf_counter() - started)
                    assert status == 200, status
                cpu[i] += cpu_s(pid) - cpu_before
    finally:
        for client in clients:
            client.close()
    return [summary(seen, spent) for seen, spent in zip(latencies, cpu)]


def timed_requests(port: int, token: str, pid: int, n: int) -> dict[str, float]:
    return timed_turns([(port, pid)], token, n)[0]


def measure(python: str, soakp: Path, n: int) -> dict[str, float]:
    run = Run(python, soakp)
    try:
        limited = run.mint(
            "--rpm", "1000000", "--max-tokens-total", "1000000000", "--sub", "limited"
        )
        plain = run.mint("--sub", "plain")
        alone, alone_port = run.soakp_serve()
        redis_port = run.redis()
        child, port = run.soakp_serve("--redis", f"redis://127.0.0.1:{redis_port}")
        without, with_redis = timed_turns([(alone_port, alone.pid), (port, child.pid)], limited, n)
        alone.terminate()
        alone.wait(10)
        before, usec_before = run.commands(redis_port, scripts=True), run.script_usec(redis_port)
        timed_requests(port, limited, child.pid, n)
        time.sleep(0.5)  # the last settlements
        limited_calls = run.commands(redis_port, scripts=True) - before
        script_usec = run.script_usec(redis_port) - usec_before
        before = run.commands(redis_port)
        plain_run = timed_requests(port, plain, child.pid, n)
        busy_calls = run.commands(redis_port) - before
        before = run.commands(redis_port)
        time.sleep(plain_run["wall_s"])
        idle_calls = run.commands(redis_port) - before
        return {
            "requests": n,
            "p50_without_ms": without["p50_ms"],
            "p50_with_ms": with_redis["p50_ms"],
            "p99_without_ms": without["p99_ms"],
            "p99_with_ms": with_redis["p99_ms"],
            "cpu_without_ms": without["cpu_ms"],
            "cpu_with_ms": with_redis["cpu_ms"],
            "calls_per_limited_request": limited_calls / (n + min(200, n)),
            "redis_us_per_limited_request": script_usec / (n + min(200, n)),
            "calls_plain_busy": busy_calls,
            "calls_plain_idle": idle_calls,
            "calls_per_plain_request": max(0, busy_calls - idle_calls) / (n + min(200, n)),
        }
    finally:
        run.close()


def render(r: dict[str, float], markdown: bool = False) -> str:
    rows = [
        (
            "c=1 latency, p50 (ms), token with rpm + budget",
            f"{r['p50_without_ms']:.3f}",
            f"{r['p50_with_ms']:.3f}",
            f"+{r['p50_with_ms'] - r['p50_without_ms']:.3f}",
        ),
        (
            "c=1 latency, p99 (ms)",
            f"{r['p99_without_ms']:.3f}",
            f"{r['p99_with_ms']:.3f}",
            f"+{r['p99_with_ms'] - r['p99_without_ms']:.3f}",
        ),
        (
            "SOAKP CPU per request (ms)",
            f"{r['cpu_without_ms']:.3f}",
            f"{r['cpu_with_ms']:.3f}",
            f"+{r['cpu_with_ms'] - r['cpu_without_ms']:.3f}",
        ),
        (
            "Redis scripts (round trips) per request, token with rpm + budget",
            "—",
            f"{r['calls_per_limited_request']:.2f}",
            "rpm + reservation in one, settlement after the answer",
        ),
        (
            "Redis's own time in scripts per request (µs), token with rpm + budget",
            "—",
            f"{r['redis_us_per_limited_request']:.1f}",
            "INFO commandstats: part of the c=1 latency, not of SOAKP's CPU",
        ),
        (
            "Redis commands per request (scripts' included), token with neither",
            "—",
            f"{r['calls_per_plain_request']:.3f}",
            f"{r['calls_plain_busy']} during {r['requests']} requests, "
            f"{r['calls_plain_idle']} idle as long",
        ),
    ]
    header = ("metric", "without --redis", "with --redis", "difference")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in (header, *rows)
    )


def available(python: str) -> str | None:
    """Why the shared-state rows cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if subprocess.run([python, "-c", "import redis"], capture_output=True).returncode:
        return f"{python} has no redis package (pip install 'soakp[redis]')"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--soakp", type=Path, default=ROOT / "soakp.py")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    why = available(args.python)
    if why:
        print(f"bench/shared_state.py: {why}", file=sys.stderr)
        return 1
    result = measure(args.python, args.soakp, args.requests)
    print(render(result))
    if args.markdown:
        args.markdown.write_text(render(result, True) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    ssl.create_default_context()  # fail early on a Python without ssl
    raise SystemExit(main())
