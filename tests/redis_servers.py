"""Private Redis servers (single or Cluster) and an nginx balancer on loopback, for
test_shared_state.py.

Each is a real process started here and stopped by its own PID; ports are picked free on 127.0.0.1.
Debian's redis-server and nginx are installed by `make test` (TEST_PACKAGES in the Makefile).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from proc_helpers import stop_process

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_cli(port: int, *args: str, timeout_s: float = 5.0, how: tuple[str, ...] = ()) -> str:
    where = how or ("-h", "127.0.0.1", "-p", str(port))
    result = subprocess.run(
        ["redis-cli", *where, *args], capture_output=True, text=True, timeout=timeout_s
    )
    return result.stdout.strip()


class RedisServer:
    """One redis-server on 127.0.0.1:port, without persistence (so a restart comes back empty)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        cluster: bool = False,
        extra: tuple[str, ...] = (),
        cli: tuple[str, ...] = (),
    ) -> None:
        """`extra`: more redis-server arguments (TLS, a socket, a password); `cli`: how redis-cli
        then reaches it, instead of -h 127.0.0.1 -p PORT."""
        self.workdir = workdir
        self.port = port or free_port()
        self.cluster = cluster
        self.extra, self.cli = extra, cli
        self.popen: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            *self.extra,
        ]
        if self.cluster:
            for name in (self.workdir / "nodes.conf", self.workdir / "dump.rdb"):
                name.unlink(missing_ok=True)
            # The bus port defaults to port + 10000, which may be taken or past 65535: pick one
            # free.
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(free_port()),
            ]
        with open(self.workdir / "redis.log", "ab") as log:
            self.popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while redis_cli(self.port, "PING", how=self.cli) != "PONG":
            if time.monotonic() > deadline or self.popen.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on {self.port}")
            time.sleep(0.05)
        return self

    def pause(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGCONT)
            stop_process(self.popen)
        self.popen = None


def start_cluster(workdir: Path, nodes: int = 3) -> list[RedisServer]:
    """Three masters, no replicas: every slot covered, so each chain's keys live on one of them."""
    servers: list[RedisServer] = []
    try:
        for i in range(nodes):
            servers.append(RedisServer(workdir / f"node{i}", cluster=True).start())
    except RuntimeError:
        for server in servers:  # none is left running when one fails to start
            server.stop()
        raise
    result = subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{s.port}" for s in servers),
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode:
        for server in servers:
            server.stop()
        raise RuntimeError(
            f"redis-cli --cluster create failed: {result.stdout[-500:]} {result.stderr[-500:]}"
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while any("cluster_state:ok" not in redis_cli(s.port, "CLUSTER", "INFO") for s in servers):
        if time.monotonic() > deadline:
            for server in servers:
                server.stop()
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return servers


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream soakp {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://soakp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_next_upstream off;
            proxy_buffering off;
        }}
    }}
}}
"""


class Balancer:
    """nginx in front of several SOAKP instances: round robin, no retry on another instance."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=0;" for port in ports)
        conf = workdir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(user + NGINX_CONF.format(dir=workdir, servers=servers, port=self.port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.popen = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(workdir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"nginx did not start: {(workdir / 'error.log').read_text()[-500:]}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.popen)
