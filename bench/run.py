"""SOAKP's benchmark harness (issues #6 and #17): SOAKP against calling the upstream directly and
against nginx.

    python bench/run.py [--quick] [--python PATH] [--json FILE] [--markdown FILE]
    python bench/run.py --profile [auto|cprofile|py-spy] [--python PATH]  (or bench/profile.sh)
    python bench/run.py --soakp OTHER/soakp.py ...                        (compare another version)

One run starts, on 127.0.0.1 only:
  * the upstreams: nginx serving a fixed chat completion over TLS for the request-rate scenarios
    (when nginx is installed; else the Python one does it), and tests/fake_upstream.py `--profile
    bench` (plain asyncio, one process) for the streaming scenarios: it stamps every SSE event with
    CLOCK_MONOTONIC when it writes it. Both answer 401 unless the request carries the real key,
    so a proxy that did not swap it shows up as errors;
  * SOAKP, `PYTHON soakp.py serve --log-level info` (an access-log line per request) with a test CA
    as --upstream-ca and a token from `soakp.py mint`;
  * nginx as a plain key-swapping reverse proxy (one worker, verified TLS upstream, keep-alive pool,
    proxy_buffering off, access log on) when nginx is installed;
and measures each of direct / SOAKP / nginx:
  start      process start to the first proxied 200 (min/median of a few starts; also dist/soakp.pyz)
  idle       RSS after that first answer
  c=1/16/64  wrk (bench/wrk.lua; bench/clients.py `load` when wrk is missing) POSTing a chat
             completion of 231 bytes, the size issue #17 measured (bench/clients.py CHAT_BODY; wrk
             gets it in BENCH_BODY): requests/s, latency percentiles, and the proxy's CPU per request
             from /proc/PID/stat (utime+stime over the window / requests answered); new TLS
             connections the upstream accepted
  sse        bench/clients.py `sse`, streams one after another on one connection: time to first
             event, per event arrival minus the upstream's stamp, events that arrived together
  sse 32x50  the same client, 32 connections at once (issue #17): time to first event, relay delay
             per chunk, and the proxy's CPU per chunk relayed
  hold       N slow streams held at once (1,000; 20 with --quick) until released: errors, peak RSS
  hold 1000x30s  1,000 streams of 30 chunks 1 s apart, each to its end (issue #17): errors, and
             peak RSS
and prints one table with the targets and the ratios SOAKP/direct and SOAKP/nginx. "other load" is the
machine's busy CPU (/proc/stat) that the processes under test did not use, as a share of all CPUs,
the most seen while measuring any path of a row: above a few percent, something else was running and
that row's figures are noisy. Each run copies soakp.py into its work directory first and runs the copy.

Issue #17 ("Performance, round 2") asked for the workload of an independent harness, with targets
relative to nginx in the same run; how each part of it is here:
  * POST of a ~230-byte chat completion (application/json), ~600 bytes back, plain HTTP in,
    verified TLS out, access logs on: the c=1/16/64 runs already POSTed a chat completion this way
    (150 bytes), so they send the issue's body instead of running twice; the answer is the one the
    upstreams already gave (475 bytes of JSON, 597 with the Python upstream's head). Their rows
    are unchanged; the issue's targets (CPU per request at c=1 and c=16 within 5x nginx) are two
    rows of their own ("against nginx"), since issue #6's absolute targets stay where they were.
  * SSE, 32 streams at once of 50 chunks 20 ms apart: a scenario of its own ("sse 32x50"), because
    the one-connection "sse" rows measure a relay without contention and stay comparable with
    earlier runs. Each connection runs a warm-up stream (it opens the proxy's upstream connection),
    then 3 measured ones; the connections start their measured streams 20/32 ms apart, as
    independent users would. CPU per chunk is every thread's schedstat time (ns) over the measured
    streams / chunks received, read by the client itself at the start and end of that span.
  * 1,000 streams held 30 s (30 chunks 1 s apart): a scenario of its own ("hold 1000x30s", streams
    that end by themselves, each counted an error unless it got all 30 chunks and its end), next to
    the older "hold" (held until released, target an absolute RSS). Each runs a fresh proxy.
  * idle RSS: the "idle" row; its target is the issue's 35 MiB (issue #6's was 30).
--quick shrinks each of these to seconds (4 streams x 5 chunks; 20 held streams of 3 chunks).

Nothing here asserts on speed: the "ok" column only compares with the issue's targets. Every process it
starts is stopped on the way out (and gets SIGTERM if this one dies); every load has a count and a
deadline.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SOAKP_PY = ROOT / "soakp.py"
SOAKP_PYZ = ROOT / "dist" / "soakp.pyz"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH_DIR))

from clients import CHAT_BODY  # noqa: E402
from fake_upstream import BENCH_CHAT_COMPLETION as CHAT_COMPLETION  # noqa: E402
from proc_helpers import memory_kib  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# The issue's targets (#6). Ratios from one run on one machine, never asserted.
TARGET_CPU_US = 150.0
TARGET_CPU_UVLOOP_US = 100.0
TARGET_ADDED_P50_MS = 0.25
TARGET_ADDED_P99_MS = 0.5
TARGET_SSE_DELAY_OVER_NGINX_MS = 0.15
TARGET_TTFC_OVER_DIRECT_MS = 0.5
TARGET_HOLD_RSS_MIB = 80.0
TARGET_IDLE_RSS_MIB = 35.0  # issue #17's (#6 had 30)
TARGET_IDLE_RSS_MIB_6 = 30.0
TARGET_C64_OVER_C16 = 0.95
TARGET_START_S = 0.3
# Issue #17's targets: against nginx measured in the same run, so that they hold on any machine.
TARGET_CPU_X_NGINX = 5.0  # proxy CPU per request at c=1 and at c=16
TARGET_SSE_TTFE_OVER_NGINX_MS = 0.5
TARGET_SSE_DELAY_P50_OVER_NGINX_MS = 0.15
TARGET_SSE_DELAY_P99_OVER_NGINX_MS = 0.5
TARGET_SSE_CPU_X_NGINX = 2.0  # proxy CPU per relayed chunk
TARGET_HELD_RSS_X_NGINX = 1.5  # peak RSS over the held streams
POOL_SIZE_RE = re.compile(r"^POOL_MAX_IDLE = (\d+)", re.MULTILINE)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0
LOAD_GRACE_S = 30.0  # how long past its own duration a load generator may take before it is killed


@dataclass(frozen=True)
class Plan:
    """How long and how big each scenario is."""

    name: str
    rate_s: int  # each wrk run
    warmup_s: int  # before each wrk run (0: none)
    concurrencies: tuple[int, ...]
    startup_trials: int
    sse_streams: int
    sse_chunks: int
    sse_interval_ms: float
    hold_streams: int
    hold_s: float  # how long the streams stay open once all are
    hold_interval_ms: float
    profile_s: int
    # Issue #17's shapes. SSE: this many streams at once, on each connection a warm-up stream and
    # then sse_many_rounds measured ones; held: streams that end by themselves after held_chunks.
    sse_many_connections: int
    sse_many_chunks: int
    sse_many_interval_ms: float
    sse_many_rounds: int
    held_streams: int
    held_chunks: int
    held_interval_ms: float


FULL = Plan("full", rate_s=10, warmup_s=2, concurrencies=(1, 16, 64), startup_trials=5,
            sse_streams=20, sse_chunks=20, sse_interval_ms=10.0, hold_streams=1000, hold_s=5.0,
            hold_interval_ms=1000.0, profile_s=10, sse_many_connections=32, sse_many_chunks=50,
            sse_many_interval_ms=20.0, sse_many_rounds=3, held_streams=1000, held_chunks=30,
            held_interval_ms=1000.0)
QUICK = Plan("quick", rate_s=1, warmup_s=0, concurrencies=(1, 16, 64), startup_trials=2,
             sse_streams=3, sse_chunks=10, sse_interval_ms=10.0, hold_streams=20, hold_s=1.0,
             hold_interval_ms=200.0, profile_s=2, sse_many_connections=4, sse_many_chunks=5,
             sse_many_interval_ms=20.0, sse_many_rounds=2, held_streams=20, held_chunks=3,
             held_interval_ms=200.0)


# /proc: CPU and memory of processes and of the machine ######################################################

def proc_cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process (all its threads), in clock ticks; zeros once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0, 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm field


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    return sum(proc_cpu_split(pid))


def thread_cpu_ticks(pid: int) -> dict[tuple[int, str], int]:
    """utime + stime of each thread of a process, keyed by (thread id, its name in /proc)."""
    ticks = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return ticks
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks[(int(tid), stat[stat.index("(") + 1:stat.rindex(")")])] = int(fields[11]) + int(fields[12])
    return ticks


def run_queue_wait_ns(pid: int) -> int:
    """Time the process's main thread spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def proc_children(pid: int) -> list[int]:
    """Direct children of a process (nginx's workers), by scanning /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                children.append(int(entry))
    return children


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def reaped_children_ticks() -> float:
    """CPU of every child this process has waited for, and of theirs (getrusage RUSAGE_CHILDREN)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * CLK_TCK


class Window:
    """A measurement window: CPU of the processes under test, and of the whole machine.

    What ran for the harness is this process, the `pids` still alive at the end, and every child reaped
    during the window (load generators, clients, stopped proxies): a reaped child's whole life comes in
    through RUSAGE_CHILDREN, and the part before the window is taken back out through its `pids` delta,
    which is negative once /proc has forgotten it."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.started = time.monotonic()
        self.cpu0 = {pid: proc_cpu_ticks(pid) for pid in self.pids}
        self.self0 = proc_cpu_ticks(os.getpid())
        self.reaped0 = reaped_children_ticks()
        self.machine0 = machine_ticks()

    def close(self) -> dict[str, Any]:
        """Returns seconds, per-pid CPU ticks, and "other load": busy CPU not used by anything the harness
        ran, as a percentage of all CPUs."""
        busy1, total1 = machine_ticks()
        cpu = {pid: proc_cpu_ticks(pid) - self.cpu0[pid] for pid in self.pids}
        known = (sum(cpu.values()) + proc_cpu_ticks(os.getpid()) - self.self0
                 + reaped_children_ticks() - self.reaped0)
        busy, total = busy1 - self.machine0[0], total1 - self.machine0[1]
        other = max(0.0, (busy - known) / total * 100) if total > 0 else 0.0
        return {"seconds": time.monotonic() - self.started, "cpu_ticks": cpu, "other_pct": other}


# Child processes ############################################################################################

def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this harness dies, so nothing outlives a killed run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def nofile_limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _raise_nofile() -> None:
    _die_with_parent()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Child:
    """One process this harness started. Only ever signalled by its own pid."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    stdout_buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """The process and its direct children (nginx's master and workers)."""
        return [self.pid, *proc_children(self.pid)]

    def memory_kib(self) -> dict[str, int]:
        total = {"VmRSS": 0, "VmHWM": 0}
        for pid in self.pids():
            for name, value in memory_kib(pid, missing_ok=True).items():
                total[name] += value
        return total

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def read_line(self, timeout_s: float) -> str | None:
        """The next line of the child's stdout (a pipe), or None at EOF or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        fd = self.popen.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.stdout_buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                data = os.read(fd, 65536)
                if not data:
                    return None
                self.stdout_buffer += data
        line, _, self.stdout_buffer = self.stdout_buffer.partition(b"\n")
        return line.decode(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        if self.popen.stdout:
            self.popen.stdout.close()


class Harness:
    """The run's temporary directory, the processes it started and how to reach them."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.dir = Path(tempfile.mkdtemp(prefix="soakp-bench-"))
        self.children: list[Child] = []
        self.api_key = "sk-bench-" + secrets.token_urlsafe(18)
        self.wrk = None if "wrk" in args.without else shutil.which("wrk")
        self.nginx = None if "nginx" in args.without else shutil.which("nginx") or \
            next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None)
        self.status_queries = 0
        self.spawned = 0
        self.token = ""
        # Every SOAKP of the run runs this copy, so an edit to soakp.py mid-run cannot mix two versions.
        self.soakp = self.dir / "soakp.py"
        shutil.copyfile(args.soakp, self.soakp)
        self.soakp_version = source_version(args.soakp, self.soakp)

    def spawn(self, name: str, argv: Sequence[str], pipe_stdout: bool = False, env: dict[str, str] | None = None,
              stop_signal: int = signal.SIGTERM, keep_nofile: bool = False) -> Child:
        """Start a child. Its soft RLIMIT_NOFILE is raised to the hard limit (`ulimit -n`) unless keep_nofile:
        SOAKP keeps the limit it inherits, as it would when run by hand, so a too-low limit shows as errors."""
        self.spawned += 1
        log_path = self.dir / f"{self.spawned:02d}-{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log, cwd=self.dir, env=env, preexec_fn=_die_with_parent if keep_nofile else _raise_nofile)
        child = Child(name, popen, log_path, stop_signal)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def reap(self, child: Child, timeout_s: float) -> None:
        """Wait for a child to exit by itself; stop it after timeout_s."""
        try:
            child.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.stop(child)

    def close(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except OSError:
                pass
        self.children.clear()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def source_version(original: Path, copy: Path) -> str:
    """Which soakp.py ran: its path, the git commit when it is this repository's, whether it differs from
    that commit, and the start of its SHA-256."""
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()[:12]
    described = f"{original} sha256 {digest}"
    if original.resolve() == SOAKP_PY:
        try:
            head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "soakp.py"],
                                   timeout=10).returncode != 0
        except (OSError, subprocess.SubprocessError):
            return described
        if head:
            described += f", git {head}" + (" + uncommitted changes" if dirty else "")
    return described


def free_port() -> int:
    """A port free right now, for nginx and SOAKP, which must be told theirs (the start-up probe polls it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soakp_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SOAKP_", "OPENAI_"))}


# Talking HTTP from here (probes and control requests only; load comes from wrk or clients.py) ##############

def chat_request(host_port: str, auth: str) -> bytes:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (host_port.encode(), auth.encode(), len(body), body))


def http_exchange(port: int, request: bytes, context: ssl.SSLContext | None = None,
                  timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, bytes]:
    """Send one request on a new connection and read until the server closes it. Returns (status, body).
    Raises OSError (ConnectionRefusedError while nothing listens yet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw:
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(data) < 1024 * 1024:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        raise ConnectionResetError("no HTTP answer") from None


def wait_proxied_answer(port: int, auth: str, child: Child, deadline: float) -> None:
    """Poll until a proxied chat completion answers 200. Raises RuntimeError."""
    request = chat_request(f"127.0.0.1:{port}", auth)
    last = ""
    for _ in range(100_000):
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            break
        try:
            status, body = http_exchange(port, request)
        except OSError as exc:
            last = f"{exc.__class__.__name__}"
            time.sleep(0.002)
            continue
        if status == 200:
            return
        last = f"status {status}: {body[:200]!r}"
        time.sleep(0.01)
    raise RuntimeError(f"{child.name} gave no 200 in time ({last}):\n{child.log_tail()}")


# The processes under test ###################################################################################

@dataclass
class Upstream:
    """One fake upstream: its TLS port, and how to count the TLS connections it accepted."""

    child: Child
    port: int
    accepts: Callable[[], int]
    control_port: int = 0  # the Python upstream's: /stats and /release


def start_python_upstream(h: Harness, cert: Path, key: Path) -> Upstream:
    child = h.spawn("py-upstream", [sys.executable, str(ROOT / "tests" / "fake_upstream.py"),
                                     "--profile", "bench", "--cert", str(cert), "--key", str(key),
                                     "--api-key", h.api_key], pipe_stdout=True)
    line = child.read_line(START_TIMEOUT_S)
    if not line or not line.startswith("READY "):
        raise RuntimeError(f"tests/fake_upstream.py did not start: {line!r}\n{child.log_tail()}")
    port, control_port = (int(p) for p in line.split()[1:3])

    def accepts() -> int:
        status, body = http_exchange(control_port, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        return json.loads(body)["accepts"]

    return Upstream(child, port, accepts, control_port)


def nginx_common(h: Harness, prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers read nothing outside the private prefix
    temps = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nworker_rlimit_nofile 65536;\n"
            f"events {{ worker_connections 16384; }}\n") + "http {\n" + temps + (
        "    keepalive_requests 1000000;\n    keepalive_timeout 120s;\n")


def start_nginx(h: Harness, name: str, conf: str, prefix: Path) -> Child:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    return h.spawn(name, [h.nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                          str(prefix / "error.log"), "-g", "daemon off;"], stop_signal=signal.SIGQUIT)


def start_nginx_upstream(h: Harness, cert: Path, key: Path) -> Upstream:
    """nginx answering the fixed chat completion over TLS: fast enough not to dominate the rate scenarios."""
    prefix = h.dir / "nginx-upstream"
    port, status_port = free_port(), free_port()
    unauthorized = '{"error":{"message":"bench upstream: wrong key","type":"invalid_request_error"}}'
    conf = nginx_common(h, prefix) + f"""    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            default_type application/json;
            if ($http_authorization != "Bearer {h.api_key}") {{ return 401 '{unauthorized}'; }}
            add_header x-request-id req_bench;
            add_header openai-processing-ms 1;
            return 200 '{CHAT_COMPLETION.decode()}';
        }}
    }}
    server {{
        listen 127.0.0.1:{status_port};
        location / {{ stub_status; }}
    }}
}}
"""
    child = start_nginx(h, "nginx-upstream", conf, prefix)

    def accepts() -> int:
        # stub_status counts every connection, its own queries too: take those back out.
        h.status_queries += 1
        _, body = http_exchange(status_port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return int(body.split(b"\n")[2].split()[0]) - h.status_queries

    deadline = time.monotonic() + START_TIMEOUT_S
    context = ssl.create_default_context(cafile=str(h.dir / "ca" / "ca.pem"))
    for _ in range(10_000):
        try:
            status, _ = http_exchange(port, chat_request(f"127.0.0.1:{port}", "Bearer " + h.api_key), context)
            if status == 200:
                break
        except OSError:
            pass
        if child.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx upstream did not start:\n{(prefix / 'error.log').read_text()}")
        time.sleep(0.01)
    return Upstream(child, port, accepts)


@dataclass
class Proxy:
    """A proxy under test, ready: its port, process and the Authorization its clients send."""

    name: str
    child: Child
    port: int
    auth: str
    started_s: float = 0.0


# `python -m cProfile` times with the wall clock, which charges a function for the time its process sat
# preempted; this charges the event loop thread's CPU time only. soakp's SIGTERM handling returns from
# main(), so the stats are written on a normal stop.
CPROFILE_WRAPPER = """\
import cProfile, runpy, sys, time
out, sys.argv = sys.argv[1], sys.argv[2:]
profiler = cProfile.Profile(time.thread_time)
try:
    profiler.runcall(runpy.run_path, sys.argv[0], run_name="__main__")
except SystemExit:
    pass
finally:
    profiler.dump_stats(out)
"""


def spawn_soakp(h: Harness, upstream_port: int, entry: Path | None, port: int, name: str = "soakp") -> Child:
    argv = [h.args.python, str(entry or h.soakp), "serve", "--listen", f"127.0.0.1:{port}",
            "--secret-file", str(h.dir / "secret"), "--db", str(h.dir / "soakp.db"),
            "--upstream", f"https://127.0.0.1:{upstream_port}", "--upstream-ca", str(h.dir / "ca" / "ca.pem"),
            "--log-level", h.args.soakp_log_level, "--shutdown-grace", "1s"]
    if h.args.profile == "cprofile" and name == "soakp-profiled":
        argv[1:1] = ["-c", CPROFILE_WRAPPER, str(h.dir / "soakp.prof")]
    return h.spawn(name, argv, env=soakp_env(), keep_nofile=True)


def start_soakp(h: Harness, upstream_port: int, entry: Path | None = None, name: str = "soakp") -> Proxy:
    port = free_port()
    started = time.monotonic()
    child = spawn_soakp(h, upstream_port, entry, port, name)
    wait_proxied_answer(port, "Bearer " + h.token, child, started + START_TIMEOUT_S)
    return Proxy(name, child, port, "Bearer " + h.token, time.monotonic() - started)


def start_nginx_proxy(h: Harness, upstream_port: int, name: str = "nginx") -> Proxy:
    """nginx as a plain key-swapping reverse proxy: the comparison the issue measured against."""
    prefix = h.dir / f"{name}-{h.spawned + 1:02d}"
    port = free_port()
    conf = nginx_common(h, prefix) + f"""    access_log {prefix}/access.log;  # SOAKP logs every request too
    upstream openai {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 50s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 512m;
        location / {{
            proxy_pass https://openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header Authorization "Bearer {h.api_key}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {h.dir}/ca/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
    started = time.monotonic()
    child = start_nginx(h, name, conf, prefix)
    wait_proxied_answer(port, "Bearer " + h.token, child, started + START_TIMEOUT_S)
    return Proxy(name, child, port, "Bearer " + h.token, time.monotonic() - started)


# Scenarios ##################################################################################################

LOAD_LINE_RE = re.compile(r"^BENCH (.*)$", re.MULTILINE)


def run_load(h: Harness, url: str, auth: str, connections: int, duration_s: int) -> dict[str, int]:
    """One wrk run (or clients.py `load`). Returns its BENCH figures."""
    env = {**os.environ, "BENCH_AUTH": auth, "BENCH_BODY": CHAT_BODY.decode()}
    if h.wrk:
        argv = [h.wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
                "-s", str(BENCH_DIR / "wrk.lua"), url]
    else:
        argv = [sys.executable, str(BENCH_DIR / "clients.py"), "load", "--url", url, "--connections",
                str(connections), "--duration-s", str(duration_s), "--ca", str(h.dir / "ca" / "ca.pem")]
    child = h.spawn("load", argv, env=env)
    h.reap(child, duration_s + LOAD_GRACE_S)
    found = LOAD_LINE_RE.search(child.log_path.read_text(errors="replace"))
    if child.popen.returncode != 0 or not found:
        raise RuntimeError(f"load generator failed ({child.popen.returncode}):\n{child.log_tail()}")
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split())}


@dataclass
class Route:
    """One way to reach the upstream: direct (TLS) or through a proxy (plain HTTP), and the processes that
    serve it (whose CPU is accounted for) of which `proxy_pids` are the proxy's."""

    name: str  # "direct", "soakp" or "nginx"
    url: str
    auth: str
    pids: Callable[[], list[int]]
    proxy_pids: Callable[[], list[int]] = field(default=lambda: [])


def rate_scenario(h: Harness, route: Route, upstream: Upstream, connections: int) -> dict[str, Any]:
    """Warm up, then measure one concurrency on one path."""
    accepts0 = upstream.accepts()
    if h.plan.warmup_s:
        run_load(h, route.url, route.auth, connections, h.plan.warmup_s)
    window = Window(route.pids())
    figures = run_load(h, route.url, route.auth, connections, h.plan.rate_s)
    measured = window.close()
    new_conns = upstream.accepts() - accepts0
    proxy_ticks = sum(measured["cpu_ticks"].get(pid, 0) for pid in route.proxy_pids())
    requests = figures["requests"]
    seconds = figures["duration_us"] / 1e6
    return {
        "requests": requests,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "p999_ms": figures["p999_us"] / 1000,
        "errors": figures["errors"] + figures["non2xx"],
        "cpu_us": proxy_ticks / CLK_TCK * 1e6 / requests if requests and route.proxy_pids() else None,
        "other_pct": measured["other_pct"],
        "new_conns": new_conns,
    }


def run_sse_client(h: Harness, route: Route, extra: Sequence[str], budget_s: float
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """bench/clients.py `sse` against one route. Returns its JSON result and the measured Window."""
    window = Window(route.pids())
    child = h.spawn("sse", [sys.executable, str(BENCH_DIR / "clients.py"), "sse", "--url", route.url,
                            "--ca", str(h.dir / "ca" / "ca.pem"), *extra],
                    pipe_stdout=True, env={**os.environ, "BENCH_AUTH": route.auth})
    line = child.read_line(budget_s)
    h.reap(child, 10)
    measured = window.close()
    if not line:
        raise RuntimeError(f"SSE client gave no result:\n{child.log_tail()}")
    return json.loads(line), measured


def sse_figures(result: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    ttfc = sorted(result["ttfc_us"])
    delays = sorted(result["delay_us"])
    return {
        "ttfc_ms": quantile(ttfc, 50) / 1000 if ttfc else None,
        "delay_p50_ms": quantile(delays, 50) / 1000 if delays else None,
        "delay_p99_ms": quantile(delays, 99) / 1000 if delays else None,
        "coalesced": result["coalesced"],
        "events": result["events"],
        "errors": result["errors"],
        "error": result["error"],
        "other_pct": measured["other_pct"],
    }


def sse_scenario(h: Harness, route: Route) -> dict[str, Any]:
    """Issue #6's shape: streams one after another on one connection."""
    plan = h.plan
    budget_s = (plan.sse_streams + 1) * (plan.sse_chunks * plan.sse_interval_ms / 1000 + 10) + 10
    result, measured = run_sse_client(h, route, [
        "--streams", str(plan.sse_streams), "--chunks", str(plan.sse_chunks),
        "--interval-ms", str(plan.sse_interval_ms)], budget_s)
    return sse_figures(result, measured)


def sse_many_scenario(h: Harness, route: Route) -> dict[str, Any]:
    """Issue #17's shape: sse_many_connections streams at once, and the proxy's CPU per chunk
    relayed (every thread of the proxy's processes, measured by the client from the end of the
    warm-up to the end of the last stream, in ns: a run's chunks are too few for 10 ms ticks)."""
    plan = h.plan
    proxy_pids = route.proxy_pids()
    budget_s = (plan.sse_many_rounds + 1) * (plan.sse_many_chunks * plan.sse_many_interval_ms / 1000
                                             + 10) + 10
    result, measured = run_sse_client(h, route, [
        "--connections", str(plan.sse_many_connections), "--streams", str(plan.sse_many_rounds),
        "--chunks", str(plan.sse_many_chunks), "--interval-ms", str(plan.sse_many_interval_ms),
        *(["--cpu-pids", ",".join(map(str, proxy_pids))] if proxy_pids else [])], budget_s)
    figures = sse_figures(result, measured)
    cpu_ns = result.get("cpu_ns")
    figures["expected_events"] = (plan.sse_many_connections * plan.sse_many_rounds
                                  * plan.sse_many_chunks)
    measured_cpu = bool(proxy_pids) and cpu_ns is not None and result["events"] > 0
    figures["cpu_us_per_chunk"] = cpu_ns / 1000 / result["events"] if measured_cpu else None
    return figures


def hold_scenario(h: Harness, proxy: Proxy, upstream: Upstream, streams: int, interval_ms: float,
                  hold_s: float, chunks: int = 0) -> dict[str, Any]:
    """Hold `streams` slow streams open through a fresh proxy; peak RSS is VmHWM (nothing else ran
    in it). chunks=0 (issue #6): the streams stay open hold_s after the last one opened, then the
    upstream's /release ends them; else (issue #17) each ends by itself after `chunks` events
    interval_ms apart, and one that got fewer is an error."""
    stream_s = chunks * interval_ms / 1000 if chunks else hold_s
    argv = [sys.executable, str(BENCH_DIR / "clients.py"), "hold",
            "--url", f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
            "--streams", str(streams), "--interval-ms", str(interval_ms),
            "--open-timeout-s", "60", "--hold-timeout-s", str(stream_s + 90)]
    if chunks:
        argv += ["--chunks", str(chunks)]
    window = Window([*proxy.child.pids(), upstream.child.pid])
    client = h.spawn("hold", argv, pipe_stdout=True, env={**os.environ, "BENCH_AUTH": proxy.auth})
    peak_kib = 0
    opened = None
    started = time.monotonic()
    deadline = started + 70
    while opened is None and time.monotonic() < deadline:
        peak_kib = max(peak_kib, proxy.child.memory_kib()["VmRSS"])
        opened = client.read_line(0.1)
        if opened is None and client.popen.poll() is not None:
            break
    open_s = time.monotonic() - started
    if chunks:
        held_kib = proxy.child.memory_kib()  # all open: the streams' ends are still to come
        done = None
        deadline = time.monotonic() + stream_s + 100
        while done is None and time.monotonic() < deadline:
            peak_kib = max(peak_kib, proxy.child.memory_kib()["VmRSS"])
            done = client.read_line(0.25)
            if done is None and client.popen.poll() is not None:
                break
        peak_kib = max(peak_kib, proxy.child.memory_kib()["VmHWM"])
    else:
        held_until = time.monotonic() + hold_s
        for _ in range(100_000):
            if time.monotonic() >= held_until:
                break
            peak_kib = max(peak_kib, proxy.child.memory_kib()["VmRSS"])
            time.sleep(0.1)
        held_kib = proxy.child.memory_kib()
        http_exchange(upstream.control_port,
                      b"POST /release HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        done = client.read_line(hold_s + 100)
    errors_line = client.read_line(5)
    h.reap(client, 10)
    measured = window.close()
    failed_open = int(re.search(r"failed=(-?\d+)", opened or "failed=-1").group(1))
    ok = int(re.search(r"ok=(\d+)", done or "ok=0").group(1))
    errors = int(re.search(r"errors=(\d+)", done or f"errors={streams}").group(1))
    events = int(re.search(r"events=(\d+)", done or "events=0").group(1))
    return {
        "opened": opened,
        "open_s": open_s,
        "errors": max(errors, streams - ok),
        "failed_open": failed_open,
        "events": events,
        "first_errors": json.loads(errors_line)["first_errors"] if errors_line else [],
        "peak_mib": max(peak_kib, held_kib["VmHWM"]) / 1024,
        "rss_held_mib": held_kib["VmRSS"] / 1024,
        "other_pct": measured["other_pct"],
    }


def startup_scenario(h: Harness, start: Callable[[], Proxy], trials: int, upstream: Upstream) -> dict[str, Any]:
    """Process start to first proxied answer, `trials` times; RSS a moment after the first answer."""
    window = Window(upstream.child.pids())
    times, idle = [], []
    for _ in range(trials):
        proxy = start()
        times.append(proxy.started_s)
        time.sleep(0.3)
        idle.append(proxy.child.memory_kib()["VmRSS"] / 1024)
        h.stop(proxy.child)
    return {"min_s": min(times), "median_s": statistics.median(times), "idle_mib": statistics.median(idle),
            "all_s": times, "other_pct": window.close()["other_pct"]}


def quantile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


# The table ##################################################################################################

@dataclass
class Row:
    id: str
    scenario: str
    metric: str
    soakp: Any = None
    direct: Any = None
    nginx: Any = None
    target: str = ""
    ok: bool | None = None
    ratio_direct: float | None = None
    ratio_nginx: float | None = None
    other_pct: float | None = None


ROW_IDS = ("start_src", "start_pyz", "idle_rss", "c1_p50", "c1_p99", "c1_added_p50",
           "c1_added_p99", "c1_cpu", "c1_cpu_vs_nginx", "c16_rps", "c16_cpu", "c16_cpu_vs_nginx",
           "c64_rps", "c64_cpu", "c64_vs_c16", "upstream_conns", "sse_ttfc", "sse_delay_p50",
           "sse_delay_p99", "sse_coalesced", "sse_many_ttfc", "sse_many_delay_p50",
           "sse_many_delay_p99", "sse_many_cpu", "hold_errors", "hold_peak_rss", "held_errors",
           "held_peak_rss")


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def render_table(rows: Sequence[Row], markdown: bool = False) -> str:
    headers = ["scenario", "metric", "SOAKP", "direct", "nginx", "target", "ok", "SOAKP/direct", "SOAKP/nginx",
               "other load"]
    cells = [[r.scenario, r.metric, fmt(r.soakp), fmt(r.direct), fmt(r.nginx), r.target,
              "—" if r.ok is None else ("yes" if r.ok else "NO"),
              "—" if r.ratio_direct is None else f"{r.ratio_direct:.2f}x",
              "—" if r.ratio_nginx is None else f"{r.ratio_nginx:.2f}x",
              "—" if r.other_pct is None else f"{r.other_pct:.0f} %"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    numeric = set(range(2, len(headers)))
    out = []
    for row in [headers, ["-" * w for w in widths], *cells]:
        out.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(out)


def build_rows(r: dict[str, Any], uvloop: str | None, pool_size: int | None) -> list[Row]:
    """Turn the measurements into rows: every id in ROW_IDS, in that order, whatever failed."""
    nginx_missing = r.get("nginx_missing")
    rows: dict[str, Row] = {}

    def value(scenario: str, path: str, key: str) -> Any:
        if path == "nginx" and nginx_missing:
            return nginx_missing
        got = r.get(scenario, {}).get(path)
        if isinstance(got, str):  # an error message or "not installed"
            return got
        if got is None:
            return None
        return got.get(key)

    def num(x: Any) -> float | None:
        return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    def add(id_: str, scenario: str, metric: str, soakp: Any, direct: Any, nginx: Any, target: str = "",
            ok: bool | None = None, ratios: bool = True, other: float | None = None) -> None:
        rows[id_] = Row(id_, scenario, metric, soakp, direct, nginx, target, ok,
                        ratio(soakp, direct) if ratios else None, ratio(soakp, nginx) if ratios else None, other)

    start = r.get("start", {})

    def start_text(path: str) -> Any:
        got = start.get(path)
        if isinstance(got, dict):
            return f"{got['min_s']:.3f}/{got['median_s']:.3f}"
        return got

    def start_ok(path: str) -> bool | None:
        got = start.get(path)
        return got["median_s"] <= TARGET_START_S if isinstance(got, dict) else None

    nginx_start = nginx_missing or start_text("nginx")
    ratio_start = ratio(*(start.get(p, {}).get("median_s") if isinstance(start.get(p), dict) else None
                          for p in ("soakp", "nginx")))
    add("start_src", "start", "start → first proxied answer, min/median (s)", start_text("soakp"), None,
        nginx_start, f"≤ {TARGET_START_S}", start_ok("soakp"), ratios=False)
    rows["start_src"].ratio_nginx = ratio_start
    add("start_pyz", "start", "same from dist/soakp.pyz, min/median (s)", start_text("pyz"), None, None,
        f"≤ {TARGET_START_S}", start_ok("pyz"), ratios=False)
    idle = {p: (start.get(p)["idle_mib"] if isinstance(start.get(p), dict) else start.get(p))
            for p in ("soakp", "nginx")}
    add("idle_rss", "idle", "RSS after the first answer (MiB)", idle["soakp"], None,
        nginx_missing or idle["nginx"],
        f"≤ {TARGET_IDLE_RSS_MIB:.0f} (#6: {TARGET_IDLE_RSS_MIB_6:.0f})",
        idle["soakp"] <= TARGET_IDLE_RSS_MIB if num(idle["soakp"]) is not None else None)

    def times_nginx(id_: str, scenario: str, metric: str, soakp: Any, direct: Any, nginx: Any,
                    limit: float, other: float | None) -> None:
        """A row of issue #17: SOAKP within `limit` times nginx's figure of the same run."""
        both = num(soakp) is not None and num(nginx) is not None
        add(id_, scenario, metric, soakp, direct, nginx, f"≤ {limit:g}× nginx",
            soakp <= limit * nginx if both else None, other=other)

    def plus_nginx(id_: str, scenario: str, metric: str, soakp: Any, direct: Any, nginx: Any,
                   limit_ms: float, other: float | None) -> None:
        """A row of issue #17: SOAKP within `limit_ms` of nginx's figure of the same run."""
        both = num(soakp) is not None and num(nginx) is not None
        add(id_, scenario, metric, soakp, direct, nginx, f"≤ nginx + {limit_ms:g}",
            soakp <= nginx + limit_ms if both else None, other=other)

    def other_load(scenario: str) -> float | None:
        """The largest "other load" seen while measuring any path of a scenario: every ratio depends on all."""
        seen = [num(value(scenario, p, "other_pct")) for p in ("soakp", "direct", "nginx")]
        return max((x for x in seen if x is not None), default=None)

    rows["start_src"].other_pct = rows["idle_rss"].other_pct = other_load("start")
    rows["start_pyz"].other_pct = num(value("start", "pyz", "other_pct"))

    cpu_target = TARGET_CPU_UVLOOP_US if uvloop else TARGET_CPU_US
    for c in (1, 16, 64):
        key = f"c{c}"
        other = other_load(key)
        if c == 1:
            p50 = {p: value(key, p, "p50_ms") for p in ("soakp", "direct", "nginx")}
            p99 = {p: value(key, p, "p99_ms") for p in ("soakp", "direct", "nginx")}
            add("c1_p50", "c=1", "latency p50 (ms)", p50["soakp"], p50["direct"], p50["nginx"], other=other)
            add("c1_p99", "c=1", "latency p99 (ms)", p99["soakp"], p99["direct"], p99["nginx"], other=other)
            for pct, table, limit in (("p50", p50, TARGET_ADDED_P50_MS), ("p99", p99, TARGET_ADDED_P99_MS)):
                added = {p: (num(table[p]) - table["direct"]) if num(table[p]) is not None and
                         num(table["direct"]) is not None else table[p] for p in ("soakp", "nginx")}
                add(f"c1_added_{pct}", "c=1", f"latency added over direct, {pct} (ms)", added["soakp"], 0.0,
                    added["nginx"], f"≤ {limit}", added["soakp"] <= limit if num(added["soakp"]) is not None
                    else None, ratios=False, other=other)
                rows[f"c1_added_{pct}"].ratio_nginx = ratio(num(added["soakp"]), num(added["nginx"]))
        else:
            rps = {p: value(key, p, "rps") for p in ("soakp", "direct", "nginx")}
            add(f"c{c}_rps", f"c={c}", "requests/s", rps["soakp"], rps["direct"], rps["nginx"], other=other)
        cpu = {p: value(key, p, "cpu_us") for p in ("soakp", "nginx")}
        add(f"c{c}_cpu", f"c={c}", "proxy CPU per request (µs)", cpu["soakp"], None, cpu["nginx"],
            f"≤ {cpu_target:.0f}" + (" (uvloop)" if uvloop else ""),
            cpu["soakp"] <= cpu_target if num(cpu["soakp"]) is not None else None, other=other)
        if c in (1, 16):
            times_nginx(f"c{c}_cpu_vs_nginx", f"c={c}", "proxy CPU per request, against nginx (µs)",
                        cpu["soakp"], None, cpu["nginx"], TARGET_CPU_X_NGINX, other)

    scaling_other = max((x for x in (other_load("c16"), other_load("c64")) if x is not None), default=None)
    scaling = {p: ratio(num(value("c64", p, "rps")), num(value("c16", p, "rps"))) for p in ("soakp", "direct", "nginx")}
    add("c64_vs_c16", "c=64", "requests/s at c=64 over c=16", scaling["soakp"], scaling["direct"],
        nginx_missing or scaling["nginx"], f"≥ {TARGET_C64_OVER_C16:.2f}",
        scaling["soakp"] >= TARGET_C64_OVER_C16 if scaling["soakp"] is not None else None, ratios=False,
        other=scaling_other)
    conns = r.get("conns", {})
    soakp_conns = conns.get("soakp")
    add("upstream_conns", "c=1..64", "new upstream TLS connections, all rate runs", soakp_conns,
        conns.get("direct"), nginx_missing or conns.get("nginx"),
        f"≤ pool ({pool_size})" if pool_size else "≤ pool size",
        soakp_conns <= pool_size if isinstance(soakp_conns, int) and pool_size else None, ratios=False)

    sse_other = other_load("sse")
    ttfc = {p: value("sse", p, "ttfc_ms") for p in ("soakp", "direct", "nginx")}
    add("sse_ttfc", "sse", "time to first event, p50 (ms)", ttfc["soakp"], ttfc["direct"], ttfc["nginx"],
        f"≤ direct + {TARGET_TTFC_OVER_DIRECT_MS}",
        ttfc["soakp"] <= ttfc["direct"] + TARGET_TTFC_OVER_DIRECT_MS
        if num(ttfc["soakp"]) is not None and num(ttfc["direct"]) is not None else None, other=sse_other)
    delay = {p: value("sse", p, "delay_p50_ms") for p in ("soakp", "direct", "nginx")}
    add("sse_delay_p50", "sse", "relay delay per event, p50 (ms)", delay["soakp"], delay["direct"], delay["nginx"],
        f"≤ nginx + {TARGET_SSE_DELAY_OVER_NGINX_MS}",
        delay["soakp"] <= delay["nginx"] + TARGET_SSE_DELAY_OVER_NGINX_MS
        if num(delay["soakp"]) is not None and num(delay["nginx"]) is not None else None, other=sse_other)
    delay99 = {p: value("sse", p, "delay_p99_ms") for p in ("soakp", "direct", "nginx")}
    add("sse_delay_p99", "sse", "relay delay per event, p99 (ms)", delay99["soakp"], delay99["direct"],
        delay99["nginx"], other=sse_other)
    coalesced = {p: value("sse", p, "coalesced") for p in ("soakp", "direct", "nginx")}
    add("sse_coalesced", "sse", "events that arrived together with another", coalesced["soakp"],
        coalesced["direct"], coalesced["nginx"], "0", coalesced["soakp"] == 0 if num(coalesced["soakp"]) is not None
        else None, ratios=False, other=sse_other)

    many = r.get("sse_many_shape")
    many_other = other_load("sse_many")
    ttfe = {p: value("sse_many", p, "ttfc_ms") for p in ("soakp", "direct", "nginx")}
    plus_nginx("sse_many_ttfc", f"sse {many}", "time to first event, p50 (ms)", ttfe["soakp"],
               ttfe["direct"], ttfe["nginx"], TARGET_SSE_TTFE_OVER_NGINX_MS, many_other)
    for pct, limit in (("p50", TARGET_SSE_DELAY_P50_OVER_NGINX_MS),
                       ("p99", TARGET_SSE_DELAY_P99_OVER_NGINX_MS)):
        got = {p: value("sse_many", p, f"delay_{pct}_ms") for p in ("soakp", "direct", "nginx")}
        plus_nginx(f"sse_many_delay_{pct}", f"sse {many}", f"relay delay per chunk, {pct} (ms)",
                   got["soakp"], got["direct"], got["nginx"], limit, many_other)
    chunk_cpu = {p: value("sse_many", p, "cpu_us_per_chunk") for p in ("soakp", "nginx")}
    times_nginx("sse_many_cpu", f"sse {many}", "proxy CPU per SSE chunk (µs)", chunk_cpu["soakp"],
                None, chunk_cpu["nginx"], TARGET_SSE_CPU_X_NGINX, many_other)

    streams = r.get("hold_streams")
    hold_other = other_load("hold")
    errors = {p: value("hold", p, "errors") for p in ("soakp", "nginx")}
    add("hold_errors", f"hold {streams}", f"errors over {streams} held streams", errors["soakp"], None,
        errors["nginx"], "0", errors["soakp"] == 0 if num(errors["soakp"]) is not None else None, ratios=False,
        other=hold_other)
    peak = {p: value("hold", p, "peak_mib") for p in ("soakp", "nginx")}
    add("hold_peak_rss", f"hold {streams}", "peak RSS while holding them (MiB)", peak["soakp"], None, peak["nginx"],
        f"≤ {TARGET_HOLD_RSS_MIB:.0f}", peak["soakp"] <= TARGET_HOLD_RSS_MIB if num(peak["soakp"]) is not None
        else None, other=hold_other)

    held = r.get("held_shape")
    held_other = other_load("held")
    errors = {p: value("held", p, "errors") for p in ("soakp", "nginx")}
    add("held_errors", f"hold {held}", f"errors over {r.get('held_streams')} streams to their end",
        errors["soakp"], None, errors["nginx"], "0",
        errors["soakp"] == 0 if num(errors["soakp"]) is not None else None, ratios=False,
        other=held_other)
    peak = {p: value("held", p, "peak_mib") for p in ("soakp", "nginx")}
    times_nginx("held_peak_rss", f"hold {held}", "peak RSS over those streams, VmHWM (MiB)",
                peak["soakp"], None, peak["nginx"], TARGET_HELD_RSS_X_NGINX, held_other)
    return [rows[i] for i in ROW_IDS]


# Running it all #############################################################################################

def make_certificates(h: Harness) -> tuple[Path, Path]:
    from fake_upstream import CertAuthority  # noqa: PLC0415 - tests/ helper, only needed here

    ca = CertAuthority(h.dir / "ca", common_name="SOAKP Bench CA")
    return ca.issue("upstream", hosts=("127.0.0.1", "localhost"))


def mint_token(h: Harness) -> str:
    secret = h.dir / "secret"
    secret.write_text(secrets.token_urlsafe(48) + "\n")
    secret.chmod(0o600)
    done = subprocess.run(
        [h.args.python, str(h.soakp), "mint", "--secret-file", str(secret), "--db", str(h.dir / "soakp.db"),
         "--key", h.api_key, "--ttl", "1d", "--sub", "bench"],
        capture_output=True, text=True, timeout=60, env=soakp_env(), cwd=h.dir)
    if done.returncode != 0:
        raise RuntimeError(f"soakp.py mint failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


def interpreter_facts(python: str) -> dict[str, str]:
    probe = ("import sys, platform\ntry:\n import uvloop; u = uvloop.__version__\nexcept ImportError:\n u = ''\n"
             "print(platform.python_version()); print(sys.executable); print(u)")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"--python {python} does not run: {out.stderr.strip()[-300:]}")
    version, executable, uvloop = (out.stdout.splitlines() + ["", "", ""])[:3]
    return {"version": version, "executable": executable, "uvloop": uvloop}


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else ""


def machine_facts() -> dict[str, str]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": str(NCPU), "cpu": model, "kernel": os.uname().release,
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def attempt(results: dict[str, Any], scenario: str, path: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure becomes its cell's text, never the end of the run."""
    try:
        got = fn()
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        got = f"error: {exc.__class__.__name__}"
        print(f"[bench] {scenario}/{path} failed: {exc}", file=sys.stderr)
    results.setdefault(scenario, {})[path] = got
    return got


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_bench(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    plan = h.plan
    facts = interpreter_facts(h.args.python)
    results: dict[str, Any] = {
        "hold_streams": plan.hold_streams, "held_streams": plan.held_streams,
        "sse_many_shape": f"{plan.sse_many_connections}x{plan.sse_many_chunks}",
        "held_shape": f"{plan.held_streams}x{plan.held_chunks * plan.held_interval_ms / 1000:g}s",
    }
    if not h.nginx:
        results["nginx_missing"] = "not installed" if "nginx" not in h.args.without else "skipped"
    cert, key = make_certificates(h)
    h.token = mint_token(h)
    log(f"soakp on Python {facts['version']} ({facts['executable']}), loop: "
        f"{'uvloop ' + facts['uvloop'] if facts['uvloop'] else 'asyncio'}; load: {h.wrk or 'bench/clients.py'}; "
        f"nginx: {h.nginx or 'none'}; work dir {h.dir}")
    py_upstream = start_python_upstream(h, cert, key)
    rate_upstream = start_nginx_upstream(h, cert, key) if h.nginx else py_upstream

    log("start-up")
    attempt(results, "start", "soakp",
            lambda: startup_scenario(h, lambda: start_soakp(h, rate_upstream.port), plan.startup_trials,
                                     rate_upstream))
    if SOAKP_PYZ.exists():
        attempt(results, "start", "pyz", lambda: startup_scenario(
            h, lambda: start_soakp(h, rate_upstream.port, SOAKP_PYZ, "soakp-pyz"), plan.startup_trials,
            rate_upstream))
    else:
        results["start"]["pyz"] = "no dist/soakp.pyz"
    if h.nginx:
        attempt(results, "start", "nginx",
                lambda: startup_scenario(h, lambda: start_nginx_proxy(h, rate_upstream.port), plan.startup_trials,
                                         rate_upstream))

    # Request rates: one SOAKP and one nginx for all concurrencies, so the pools carry over as in production.
    upstream_pids = lambda: rate_upstream.child.pids()  # noqa: E731
    routes = [Route("direct", f"https://127.0.0.1:{rate_upstream.port}/v1/chat/completions",
                   "Bearer " + h.api_key, upstream_pids)]
    proxies: dict[str, Proxy] = {}
    accepts0 = rate_upstream.accepts()
    soakp = attempt(results, "rate-start", "soakp", lambda: start_soakp(h, rate_upstream.port))
    results["conns"] = {"direct": 0}
    if isinstance(soakp, Proxy):
        proxies["soakp"] = soakp
        results["conns"]["soakp"] = rate_upstream.accepts() - accepts0
    if h.nginx:
        accepts0 = rate_upstream.accepts()
        nginx = attempt(results, "rate-start", "nginx", lambda: start_nginx_proxy(h, rate_upstream.port))
        if isinstance(nginx, Proxy):
            proxies["nginx"] = nginx
            results["conns"]["nginx"] = rate_upstream.accepts() - accepts0
    for name, proxy in proxies.items():
        routes.append(Route(name, f"http://127.0.0.1:{proxy.port}/v1/chat/completions", proxy.auth,
                           lambda proxy=proxy: [*proxy.child.pids(), *upstream_pids()],
                           lambda proxy=proxy: proxy.child.pids()))
    for c in plan.concurrencies:
        for route in routes:
            log(f"c={c} {route.name}")
            got = attempt(results, f"c{c}", route.name, lambda: rate_scenario(h, route, rate_upstream, c))
            if isinstance(got, dict):
                if got["errors"]:
                    log(f"  {got['errors']} errors or non-2xx answers")
                results["conns"][route.name] = results["conns"].get(route.name, 0) + got["new_conns"]
    for name in ("soakp", "nginx"):
        if name not in proxies and f"c{plan.concurrencies[0]}" in results:
            for c in plan.concurrencies:
                results[f"c{c}"].setdefault(name, results.get("rate-start", {}).get(name))
    for proxy in proxies.values():
        h.stop(proxy.child)

    # SSE through the Python upstream, which stamps each event.
    log("sse")
    sse_routes = [Route("direct", f"https://127.0.0.1:{py_upstream.port}/v1/chat/completions",
                       "Bearer " + h.api_key, lambda: py_upstream.child.pids())]
    sse_proxies = []
    for name, start in (("soakp", start_soakp), ("nginx", start_nginx_proxy)):
        if name == "nginx" and not h.nginx:
            continue
        proxy = attempt(results, "sse-start", name, lambda start=start: start(h, py_upstream.port))
        if isinstance(proxy, Proxy):
            sse_proxies.append(proxy)
            sse_routes.append(Route(
                name, f"http://127.0.0.1:{proxy.port}/v1/chat/completions", proxy.auth,
                lambda proxy=proxy: [*proxy.child.pids(), py_upstream.child.pid],
                lambda proxy=proxy: proxy.child.pids()))
        else:
            results.setdefault("sse", {})[name] = proxy
            results.setdefault("sse_many", {})[name] = proxy
    for route in sse_routes:
        attempt(results, "sse", route.name, lambda: sse_scenario(h, route))
    # Issue #17's SSE shape, through the same (warm) proxies.
    for route in sse_routes:
        log(f"sse {results['sse_many_shape']} {route.name}")
        got = attempt(results, "sse_many", route.name, lambda: sse_many_scenario(h, route))
        if isinstance(got, dict) and (got["errors"] or got["events"] != got["expected_events"]):
            log(f"  {got['errors']} errors ({got['error']}), {got['events']} of "
                f"{got['expected_events']} chunks")
    for proxy in sse_proxies:
        h.stop(proxy.child)

    # Held streams, each proxy fresh so that its VmHWM is this scenario's peak.
    for name, start in (("soakp", start_soakp), ("nginx", start_nginx_proxy)):
        if name == "nginx" and not h.nginx:
            continue
        log(f"hold {plan.hold_streams} streams via {name}")

        def hold(start: Callable[..., Proxy] = start) -> dict[str, Any]:
            proxy = start(h, py_upstream.port)
            try:
                return hold_scenario(h, proxy, py_upstream, plan.hold_streams,
                                     plan.hold_interval_ms, plan.hold_s)
            finally:
                h.stop(proxy.child)

        got = attempt(results, "hold", name, hold)
        if isinstance(got, dict) and got["errors"]:
            log(f"  {got['errors']} errors: {got['first_errors']}")

    # Issue #17's held streams: each ends by itself after held_chunks; again a fresh proxy each.
    for name, start in (("soakp", start_soakp), ("nginx", start_nginx_proxy)):
        if name == "nginx" and not h.nginx:
            continue
        log(f"hold {results['held_shape']} ({plan.held_chunks} chunks "
            f"{plan.held_interval_ms:g} ms apart) via {name}")

        def held(start: Callable[..., Proxy] = start) -> dict[str, Any]:
            proxy = start(h, py_upstream.port)
            try:
                return hold_scenario(h, proxy, py_upstream, plan.held_streams,
                                     plan.held_interval_ms, 0.0, plan.held_chunks)
            finally:
                h.stop(proxy.child)

        got = attempt(results, "held", name, held)
        if isinstance(got, dict) and got["errors"]:
            log(f"  {got['errors']} errors: {got['first_errors']}")

    for scenario in ("rate-start", "sse-start"):
        results[scenario] = {k: v if isinstance(v, str) else "started" for k, v in results.get(scenario, {}).items()}
    pool_match = POOL_SIZE_RE.search(h.soakp.read_text())
    rows = build_rows(results, facts["uvloop"], int(pool_match.group(1)) if pool_match else None)
    meta = {
        "mode": plan.name,
        "machine": machine_facts(),
        "soakp_python": facts,
        "harness_python": sys.version.split()[0],
        "loop": f"uvloop {facts['uvloop']}" if facts["uvloop"] else "asyncio",
        "load_generator": (tool_version([h.wrk, "-v"]).split(" [")[0] if h.wrk else
                           "bench/clients.py (wrk skipped)" if "wrk" in h.args.without else
                           "bench/clients.py (wrk not installed)"),
        "nginx": (tool_version([h.nginx, "-v"]).replace("nginx version: ", "") if h.nginx else
                  results.get("nginx_missing")),
        "soakp_source": h.soakp_version,
        "soakp_log_level": h.args.soakp_log_level,
        "soakp_nofile": nofile_limits()[0],
        "plan": plan.__dict__,
        "max_other_load_pct": max((r.other_pct for r in rows if r.other_pct is not None), default=None),
    }
    return rows, {"meta": meta, "results": results}


def header_text(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    plan = meta["plan"]
    return "\n".join([
        f"SOAKP bench ({meta['mode']}): {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}",
        f"soakp.py: {meta['soakp_source']}",
        f"soakp: Python {meta['soakp_python']['version']} ({meta['soakp_python']['executable']}), loop {meta['loop']},"
        f" --log-level {meta['soakp_log_level']}, ulimit -n {meta['soakp_nofile']}; "
        f"load: {meta['load_generator']}; nginx: {meta['nginx']}",
        f"rate runs {plan['rate_s']} s (+{plan['warmup_s']} s warm-up) per path and concurrency; "
        f"SSE {plan['sse_streams']} streams x {plan['sse_chunks']} events {plan['sse_interval_ms']:g} ms apart; "
        f"hold {plan['hold_streams']} streams for {plan['hold_s']:g} s",
        f"requests POST a {len(CHAT_BODY)}-byte chat completion (application/json) and get "
        f"{len(CHAT_COMPLETION)} bytes of JSON back; issue #17: SSE "
        f"{plan['sse_many_connections']} streams at once x {plan['sse_many_chunks']} chunks "
        f"{plan['sse_many_interval_ms']:g} ms apart "
        f"({plan['sse_many_rounds']} per connection after a warm-up); hold {plan['held_streams']} "
        f"streams of {plan['held_chunks']} chunks {plan['held_interval_ms']:g} ms apart",
    ])


def footer_text(meta: dict[str, Any]) -> str:
    other = meta["max_other_load_pct"]
    return "\n".join([
        "direct = wrk/client to the upstream over TLS; SOAKP and nginx = plain HTTP in, verified TLS out.",
        "CPU per request = the proxy's utime+stime over the measured window / requests answered.",
        "other load = busy CPU (/proc/stat) not used by the proxy, upstream, load generator or harness, as % of "
        f"all CPUs: the most seen while measuring any path of that row; max this run: "
        f"{'—' if other is None else f'{other:.0f} %'}"
        + (" (noisy: re-run on a quiet machine)" if other is not None and other > 5 else ""),
    ])


# Profiling ##################################################################################################

PYSPY_FRAME_RE = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def find_py_spy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("py-spy")


def profile_soakp(h: Harness) -> int:
    """Run SOAKP under cProfile or py-spy during a wrk run at c=16; print the top functions."""
    plan = h.plan
    cert, key = make_certificates(h)
    h.token = mint_token(h)
    upstream = start_nginx_upstream(h, cert, key) if h.nginx else start_python_upstream(h, cert, key)
    proxy = start_soakp(h, upstream.port, name="soakp-profiled")
    pyspy_out = h.dir / "pyspy.txt"
    spy = None
    if h.args.profile == "py-spy":
        py_spy = find_py_spy(h.args.python)
        if not py_spy:
            raise RuntimeError("py-spy not found (pip install py-spy next to --python, or use --profile cprofile)")
        spy = h.spawn("py-spy", [py_spy, "record", "--pid", str(proxy.child.pid), "--format", "raw", "--function",
                                 "--rate", "500", "--duration", str(plan.profile_s + 1), "--output", str(pyspy_out)])
        time.sleep(0.5)  # py-spy attaches
    facts = interpreter_facts(h.args.python)
    print(f"SOAKP ({h.soakp_version}) on Python {facts['version']} ({facts['executable']}), loop "
          f"{'uvloop ' + facts['uvloop'] if facts['uvloop'] else 'asyncio'}, profiler {h.args.profile}; "
          f"load: {'wrk' if h.wrk else 'bench/clients.py'} at c=16 for {plan.profile_s} s")
    log(f"profiling SOAKP ({h.args.profile}) under c=16 for {plan.profile_s} s")
    window = Window(proxy.child.pids())
    threads0 = thread_cpu_ticks(proxy.child.pid)
    user0, system0 = proc_cpu_split(proxy.child.pid)
    waited0 = run_queue_wait_ns(proxy.child.pid)
    figures = run_load(h, f"http://127.0.0.1:{proxy.port}/v1/chat/completions", proxy.auth, 16, plan.profile_s)
    cpu_s = sum(window.close()["cpu_ticks"].values()) / CLK_TCK
    threads1 = thread_cpu_ticks(proxy.child.pid)
    user1, system1 = proc_cpu_split(proxy.child.pid)
    waited_us = (run_queue_wait_ns(proxy.child.pid) - waited0) / 1000 / max(1, figures["requests"])
    requests = max(1, figures["requests"])
    print(f"{figures['requests']:,} requests in {figures['duration_us'] / 1e6:.1f} s "
          f"({figures['errors'] + figures['non2xx']} errors); SOAKP CPU {cpu_s:.2f} s = "
          f"{cpu_s / requests * 1e6:.0f} µs/request under the profiler, of which "
          f"{(user1 - user0) / CLK_TCK * 1e6 / requests:.0f} in user space and "
          f"{(system1 - system0) / CLK_TCK * 1e6 / requests:.0f} in the kernel (syscalls, loopback TCP)")
    print("per thread (/proc/PID/task; the first is the event loop's): " + ", ".join(
        f"{tid} {name} {(ticks - threads0.get((tid, name), 0)) / CLK_TCK * 1e6 / requests:.1f} µs/req"
        for (tid, name), ticks in sorted(threads1.items())))
    print(f"the event loop's thread also waited {waited_us:.0f} µs/req runnable but without a CPU (schedstat)"
          + ("; py-spy samples such waits too, at wherever the thread was preempted (often a send() that woke "
             "the peer on this CPU)" if spy else ""))
    if spy:
        spy.popen.wait(plan.profile_s + 30)
        h.stop(spy)
        h.stop(proxy.child)
        print_pyspy(pyspy_out, requests, cpu_s + waited_us * requests / 1e6)
    else:
        h.stop(proxy.child)
        print_cprofile(h.dir / "soakp.prof", requests)
    return 0


def print_cprofile(path: Path, requests: int) -> None:
    import pstats  # noqa: PLC0415

    if not path.exists():
        raise RuntimeError("cProfile wrote no profile (did soakp exit cleanly on SIGTERM?)")
    stats = pstats.Stats(str(path))
    entries = []
    for (filename, line, name), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).name}:{line}" if line else filename
        entries.append((name, where, nc, tt, ct))
    print_layers(entries, requests)
    for title, index in (("cumulative", 4), ("own time", 3)):
        print(f"\nTop 25 by {title} (cProfile, the event loop thread's CPU time; "
              f"µs/req = seconds x 1e6 / {requests:,} requests; the "
              "profiler inflates small functions; each resumption of a coroutine counts as a call, and "
              "cumulative times of coroutines overlap)")
        print(f"{'calls/req':>9} {'own µs/req':>10} {'cum µs/req':>10}  function")
        for name, where, nc, tt, ct in sorted(entries, key=lambda e: e[index], reverse=True)[:25]:
            print(f"{nc / requests:9.2f} {tt * 1e6 / requests:10.1f} {ct * 1e6 / requests:10.1f}  {name} ({where})")


# Where a function's own time belongs, by the file it is in (or, for C functions, its name): the answer
# to "what would move it" differs per layer.
LAYERS = (
    ("start-up: imports and compiling soakp.py (once, not per request)",
     ("importlib", "<frozen", "marshal", "builtins.compile", "_compiler.py", "_parser.py", "runpy")),
    ("socket and epoll syscalls (kernel time is not in this profile: see 'in the kernel' above)",
     ("_socket.socket", "select.epoll")),
    ("OpenSSL via the ssl module (encrypt, decrypt)", ("_ssl.", "ssl.py")),
    ("asyncio's TLS layer in Python (sslproto.py)", ("sslproto.py",)),
    ("asyncio streams (StreamReader/StreamWriter)", ("streams.py",)),
    ("asyncio event loop, transports, futures, tasks",
     ("base_events.py", "selector_events.py", "events.py", "selectors.py", "futures.py", "tasks.py",
      "_contextvars", "transports.py")),
    ("SOAKP's own code (soakp.py)", ("soakp.py",)),
)


def layer_of(name: str, where: str) -> str:
    text = f"{where} {name}"
    for layer, marks in LAYERS:
        if any(mark in text for mark in marks):
            return layer
    return "other stdlib and builtins (len, dict, bytes methods, json, re, logging, ...)"


def print_layers(entries: Sequence[tuple[str, str, int, float, float]], requests: int) -> None:
    """Own time summed by layer: where the time goes, beyond the top functions."""
    totals: dict[str, float] = {}
    for name, where, _, own, _ in entries:
        layer = layer_of(name, where)
        totals[layer] = totals.get(layer, 0.0) + own
    whole = sum(totals.values()) or 1.0
    print("\nOwn time by layer (cProfile; µs/req as below; the profiler inflates Python code more than C)")
    for layer, seconds in sorted(totals.items(), key=lambda item: item[1], reverse=True):
        print(f"{seconds * 1e6 / requests:10.1f} µs/req {100 * seconds / whole:5.1f} %  {layer}")


def print_pyspy(path: Path, requests: int, active_s: float) -> None:
    """Top functions from py-spy's raw output; µs/req spread the process's CPU time plus its run-queue
    wait (what py-spy samples) over the samples."""
    if not path.exists():
        raise RuntimeError("py-spy wrote nothing (is ptrace allowed here?)")
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            match = PYSPY_FRAME_RE.match(frame)
            if match:
                frames.append(f"{match.group(1)} ({Path(match.group(2)).name})")
        if not frames:
            continue
        if frames[-1] == "_worker (thread.py)":
            # An executor thread blocked in its queue's get(), which py-spy takes for running; the
            # per-thread line above shows what such a thread really used.
            idle += count
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            cumulative[frame] = cumulative.get(frame, 0) + count
    if not total:
        raise RuntimeError("py-spy recorded no samples")
    us_per_sample = active_s * 1e6 / requests / total
    for title, table in (("cumulative", cumulative), ("own time", own)):
        print(f"\nTop 25 by {title} (py-spy, {total:,} samples, {idle:,} of idle executor threads left out; "
              "µs/req = the sample share of SOAKP's CPU + run-queue wait per request)")
        print(f"{'samples %':>9} {'µs/req':>8}  function")
        for frame, count in sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:25]:
            print(f"{count / total * 100:9.1f} {count * us_per_sample:8.1f}  {frame}")


# CLI ########################################################################################################

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SOAKP benchmark harness (issue #6); see the module docstring.")
    parser.add_argument("--quick", action="store_true", help="a second or two per scenario, 20 held streams")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs soakp.py (a venv with uvloop, say); default: this one")
    parser.add_argument("--soakp", type=Path, default=SOAKP_PY,
                        help="the soakp.py to run (another checkout's, to compare); default: this repository's")
    parser.add_argument("--soakp-log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="SOAKP's --log-level (info, the default, writes an access log line per request, "
                             "as nginx does here)")
    parser.add_argument("--without", action="append", default=[], choices=("wrk", "nginx"),
                        help="act as if this tool were not installed (tests the fallbacks)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument("--profile", nargs="?", const="auto", choices=("auto", "cprofile", "py-spy"),
                        help="instead of the bench: SOAKP under a profiler during a c=16 wrk run; auto (the "
                             "default) is py-spy when it is installed next to --python or on PATH, else cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    args.python = shutil.which(args.python) or args.python
    if args.profile == "auto":
        args.profile = "py-spy" if find_py_spy(args.python) else "cprofile"

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    h = Harness(args, QUICK if args.quick else FULL)
    try:
        if args.profile:
            return profile_soakp(h)
        rows, report = run_bench(h)
        meta = report["meta"]
        print(header_text(meta))
        print()
        print(render_table(rows))
        print()
        print(footer_text(meta))
        if args.json:
            args.json.write_text(json.dumps({**report, "rows": [r.__dict__ for r in rows]}, indent=1, default=str))
        shared_md = ""
        if not args.quick:  # what --redis costs (issue 13): bench/shared_state.py, about 15 s
            import shared_state  # noqa: PLC0415 - bench/ helper, only needed here

            why = shared_state.available(args.python)
            if why:
                print(f"\nShared state (--redis): skipped, {why}")
            else:
                shared = shared_state.measure(args.python, args.soakp, shared_state.REQUESTS)
                what = "a token with rpm and a budget through a loopback Redis"
                print(f"\nShared state (--redis): {what}\n")
                print(shared_state.render(shared))
                table = shared_state.render(shared, True)
                shared_md = (f"\n\n### Shared state (--redis)\n\nFor {what}, c=1, "
                             f"{shared['requests']} requests (bench/shared_state.py):\n\n{table}")
        if args.markdown:
            args.markdown.write_text(header_text(meta).replace("\n", "  \n") + "\n\n" + render_table(rows, True)
                                     + "\n\n" + footer_text(meta).replace("\n", "  \n") + shared_md
                                     + "\n")
        return 0
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        h.close()


if __name__ == "__main__":
    raise SystemExit(main())
