"""The Docker image, built and run: `make container-test` (in .ci/run), not `make test`.

The image is built from the repository's Dockerfile with Podman (Debian's, installed by `make
container-deps`) on a debian:bookworm-slim equivalent made with mmdebstrap (deploy/debian-base.sh),
since no image registry can be reached here. Podman runs with a containers.conf of this test's own
(runc, cgroupfs, nofile within the host's hard limit: see the Dockerfile's "What each engine
needs"), so the machine's configuration is left alone.

Containers use slirp4netns with the host's loopback reachable as 10.0.2.2, and publish their ports
on 127.0.0.1 only: the fake upstream and Pebble stay on the host's loopback like in every other
test. Each test removes the containers and volumes it made, by name; the image and its base stay,
tagged, so the next run's build is warm (`make container-clean` removes them)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SecretsRegistry
from deploy_support import ROOT, free_port, require_tools, running_pebble
from fake_upstream import CertAuthority, FakeUpstream, Gate, RawConnection
from slow_stream import StreamWatcher, peer_serial, ticking_sse, wait_until
from test_certbot import client_verifying_as, mint_over, pem_serial, stream_request

pytestmark = pytest.mark.container

ENGINE = os.environ.get("CONTAINER_ENGINE", "podman")
IMAGE = os.environ.get("SOAKP_TEST_IMAGE", "localhost/soakp:test")
BASE = os.environ.get("SOAKP_TEST_BASE", "localhost/soakp-base:bookworm-slim")
BUILD_DIR = ROOT / "build" / "container"
TIMINGS = BUILD_DIR / "timings.txt"
HOST_FROM_CONTAINER = "10.0.2.2"  # slirp4netns: the host's loopback, with allow_host_loopback=true
NETWORK = "slirp4netns:allow_host_loopback=true"
UNPRIVILEGED_PORTS = "net.ipv4.ip_unprivileged_port_start=0"  # Podman 4.3 does not set it
MAX_OVER_BASE_MB = 120
GRACE_S = 30  # SOAKP_SHUTDOWN_GRACE's default
STOP_TIMEOUT_S = 35  # what the Dockerfile and compose.yaml tell the engine
BUILD_TIMEOUT_S = 900
START_S = 60.0
CERT_S = 90.0


def note_time(what: str, value: float, unit: str = "s") -> None:
    """A figure for the summary that make container-test prints (build/container/timings.txt)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(TIMINGS, "a") as out:
        out.write(f"{what}: {value:.1f} {unit}\n")


def engine(
    *args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ENGINE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{ENGINE} {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


# The engine and the image #########################################################################


@pytest.fixture(scope="session")
def containers_conf() -> Iterator[None]:
    """Podman's settings for this session only (CONTAINERS_CONF); podman-compose inherits them."""
    require_tools(
        ENGINE, "mmdebstrap", install_hint="make container-deps installs podman, runc, mmdebstrap"
    )
    if ENGINE != "podman":
        pytest.fail(f"the container test drives Podman only (CONTAINER_ENGINE={ENGINE})")
    import resource

    def within_hard_limit(limit: int, wanted: int) -> int:
        hard = resource.getrlimit(limit)[1]
        return wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)

    # Podman's defaults (1048576 files, 4194304 processes) above the host's hard limits fail every
    # start ("error setting rlimit ... operation not permitted"), and so does anything above what
    # conmon runs with: Podman 4.3 starts it with at most 32768 processes, which runc then cannot
    # raise.
    nofile = within_hard_limit(resource.RLIMIT_NOFILE, 1048576)
    nproc = within_hard_limit(resource.RLIMIT_NPROC, 32768)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    conf = BUILD_DIR / "containers.conf"
    conf.write_text(
        "# Written by tests/test_container.py for its own Podman runs.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'  # crun 1.8 refuses hybrid cgroups
        'cgroup_manager = "cgroupfs"\n'  # no systemd as PID 1 here
        'events_logger = "file"\n'
        "[network]\n"
        'network_backend = "netavark"\n'
    )
    before = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    yield
    if before is None:
        del os.environ["CONTAINERS_CONF"]
    else:
        os.environ["CONTAINERS_CONF"] = before


def build_extra_ca() -> str:
    """The CAs this host trusts beyond Debian's list, for the build's downloads (the Dockerfile's
    EXTRA_CA_CERT): a machine behind a TLS-inspecting proxy keeps the proxy's CA there.
    CONTAINER_BUILD_CA names a PEM file to use instead ("" for none)."""
    chosen = os.environ.get("CONTAINER_BUILD_CA")
    if chosen is not None:
        return Path(chosen).read_text() if chosen else ""
    return "".join(
        p.read_text() for p in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    )


@pytest.fixture(scope="session")
def image(containers_conf: None) -> str:
    """The image, built from the Dockerfile (layer cache kept between runs), on the local base."""
    if engine("image", "exists", BASE, check=False).returncode != 0:
        started = time.monotonic()
        made = subprocess.run(
            [
                str(ROOT / "deploy" / "debian-base.sh"),
                ENGINE,
                BASE,
                str(BUILD_DIR / "base-amd64.tar"),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        note_time("base image (mmdebstrap + import)", time.monotonic() - started)
    started = time.monotonic()
    # --format docker keeps HEALTHCHECK; --network host: the build's apt-get and pip need no bridge.
    args = [
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        "--build-arg",
        f"BASE={BASE}",
        "-t",
        IMAGE,
    ]
    extra_ca = build_extra_ca()
    if extra_ca:
        args += ["--build-arg", f"EXTRA_CA_CERT={extra_ca}"]
    engine(*args, str(ROOT), timeout=BUILD_TIMEOUT_S)
    note_time("image build", time.monotonic() - started)
    return IMAGE


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Containers and volumes a test makes register here by name; all are removed at teardown."""
    made: list[str] = []
    yield made
    for name in made:
        if name.startswith("container:"):
            engine(
                "rm",
                "--force",
                "--volumes",
                "--time",
                "5",
                name.removeprefix("container:"),
                check=False,
                timeout=60,
            )
    for name in made:
        if name.startswith("volume:"):
            engine("volume", "rm", "--force", name.removeprefix("volume:"), check=False, timeout=60)
    for name in made:
        if (
            name.startswith("network:")
            and engine("network", "exists", name[8:], check=False).returncode == 0
        ):
            engine(
                "network", "rm", "--force", name.removeprefix("network:"), check=False, timeout=60
            )


def unique(prefix: str) -> str:
    return f"soakp-test-{prefix}-{secrets.token_hex(3)}"


def volume_path(name: str) -> Path:
    return Path(engine("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())


def container_logs(name: str) -> str:
    result = engine("logs", name, check=False)
    return result.stdout + result.stderr


def wait_for_listening(name: str, timeout_s: float = START_S) -> None:
    """Until SOAKP in the container says it listens; fails with the log if the container stops."""
    deadline = time.monotonic() + timeout_s
    while "listening on https://" not in (logs := container_logs(name)):
        state = engine("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            pytest.fail(f"container {name} is {state}:\n{logs}")
        if time.monotonic() > deadline:
            pytest.fail(f"soakp in {name} was not listening after {timeout_s}s:\n{logs}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def upstream(test_ca: CertAuthority) -> Iterator[FakeUpstream]:
    """The fake upstream on the host's loopback, its certificate for the containers' view of it."""
    cert, key = test_ca.issue("container-upstream", hosts=(HOST_FROM_CONTAINER,))
    server = FakeUpstream(cert, key).start()
    yield server
    server.stop()


@pytest.fixture
def run_files(tmp_path: Path, secret: str, admin: tuple[str, str], test_ca: CertAuthority) -> Path:
    """Files mounted at /run/test: the secrets and CAs, owned by the image's user (uid 10001)."""
    files = tmp_path / "run-test"
    files.mkdir(mode=0o700)
    (files / "secret").write_text(secret + "\n")
    (files / "admin-pass").write_text(admin[1] + "\n")
    shutil.copy(test_ca.ca_path, files / "upstream-ca.pem")
    return files


def own_files(files: Path) -> None:
    for path in [files, *files.iterdir()]:
        os.chown(path, 10001, 10001)
        path.chmod(0o700 if path.is_dir() else 0o400)


def run_args(
    name: str,
    files: Path,
    upstream: FakeUpstream,
    https_port: int,
    admin_user: str,
    volumes: tuple[str, str],
    *more: str,
) -> list[str]:
    """`podman run` arguments as a user would give them, plus the test's files and upstream."""
    return [
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        NETWORK,
        "--sysctl",
        UNPRIVILEGED_PORTS,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--publish",
        f"127.0.0.1:{https_port}:443",
        "--volume",
        f"{volumes[0]}:/etc/letsencrypt",
        "--volume",
        f"{volumes[1]}:/data",
        "--volume",
        f"{files}:/run/test:ro",
        "--env",
        "SOAKP_SECRET_FILE=/run/test/secret",
        "--env",
        f"SOAKP_ADMIN_USER={admin_user}",
        "--env",
        "SOAKP_ADMIN_PASS_FILE=/run/test/admin-pass",
        "--env",
        f"SOAKP_UPSTREAM=https://{HOST_FROM_CONTAINER}:{upstream.port}",
        "--env",
        "SOAKP_UPSTREAM_CA=/run/test/upstream-ca.pem",
        "--env",
        "SOAKP_LOG_LEVEL=debug",
        *more,
    ]


def container_processes(name: str) -> list[tuple[tuple[int, ...], str]]:
    """(real, effective, saved, filesystem uid) and command line of every process in the container,
    read from the host's /proc (the image has no ps): those in the PID namespace of its first
    process."""
    pid = engine("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    namespace = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "pid") != namespace:
                continue
            status = (proc / "status").read_text()
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # ended meanwhile, or not ours to read (not in a container we started)
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        found.append((tuple(int(uid) for uid in uids), command))
    return found


def stop_in_thread(name: str, timings: dict[str, float]) -> threading.Thread:
    def stop() -> None:
        started = time.monotonic()
        engine("stop", "--time", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
        timings["stop_s"] = time.monotonic() - started

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def exit_code(name: str) -> int:
    return int(engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())


# Tests ############################################################################################


def test_image_is_small_keeps_its_healthcheck_and_runs_as_uid_10001(image: str) -> None:
    """The image adds at most 120 MB to its base (measured as README's deployment section says), the
    docker format kept HEALTHCHECK, and the configured user is the numeric 10001."""
    size = int(engine("image", "inspect", "--format", "{{.Size}}", image).stdout)
    base = int(engine("image", "inspect", "--format", "{{.Size}}", BASE).stdout)
    note_time(
        f"image size {size / 1e6:.1f} MB on a base of {base / 1e6:.1f} MB: added",
        (size - base) / 1e6,
        "MB",
    )
    assert size - base <= MAX_OVER_BASE_MB * 1_000_000, engine("history", image).stdout
    inspected = json.loads(engine("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert inspected["Healthcheck"]["Test"][:2] == ["CMD", "python3"]  # where Podman shows it
    assert config["User"] == "soakp"
    passwd = engine(
        "run", "--rm", "--network", "none", "--entrypoint", "id", image, timeout=60
    ).stdout
    assert passwd.startswith("uid=10001(soakp) gid=10001(soakp)"), passwd
    version = engine(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        image,
        "/app/soakp.pyz",
        "--version",
        timeout=60,
    ).stdout
    assert version.startswith("soakp ")
    plugins = engine(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "certbot",
        image,
        "plugins",
        "--config-dir",
        "/tmp/c",
        "--work-dir",
        "/tmp/w",
        "--logs-dir",
        "/tmp/l",
        timeout=60,
    ).stdout
    assert "* dns-rfc2136" in plugins and "* standalone" in plugins  # CERTBOT_DNS_PLUGINS' default


def test_self_signed_start_health_check_uid_and_a_stop_that_lets_streams_finish(
    image: str,
    names: list[str],
    run_files: Path,
    upstream: FakeUpstream,
    admin: tuple[str, str],
    secrets_registry: SecretsRegistry,
) -> None:
    """No SOAKP_DOMAIN: /healthz answers over TLS on the self-signed pair the volume keeps, the
    image's health check passes, every process runs as uid 10001; `stop` during a stream: the stream
    ends whole, the container exits 0 well inside the grace period."""
    name, le, data = unique("selfsigned"), unique("le"), unique("data")
    names.extend([f"container:{name}", f"volume:{le}", f"volume:{data}"])
    own_files(run_files)
    port = free_port()
    started = time.monotonic()
    engine(*run_args(name, run_files, upstream, port, admin[0], (le, data), image))
    wait_for_listening(name)
    note_time("container start to listening (self-signed, first start)", time.monotonic() - started)
    assert "SELF-SIGNED certificate for localhost" in container_logs(name)

    selfsigned = volume_path(data) / "selfsigned" / "fullchain.pem"
    context = client_verifying_as(str(selfsigned), "localhost")
    with RawConnection(port, ssl_context=context) as conn:
        assert peer_serial(conn) == pem_serial(selfsigned)
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert conn.read_response().status == 200

    health = engine("healthcheck", "run", name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    assert (
        engine("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip() == "healthy"
    )

    processes = container_processes(name)
    assert len(processes) >= 2, processes  # the entrypoint and soakp
    assert {uids for uids, _ in processes} == {(10001, 10001, 10001, 10001)}, processes
    assert any("/app/soakp.pyz\0serve" in command for _, command in processes), processes

    token = mint_over(port, context, admin, secrets_registry)
    finish = Gate()
    upstream.script("/v1/chat/completions", ticking_sse(finish))
    stream = StreamWatcher(RawConnection(port, ssl_context=context)).start(stream_request(token))
    timings: dict[str, float] = {}
    try:
        stream.wait_events(3)
        stopper = stop_in_thread(name, timings)
        assert wait_until(lambda: "shutting down" in container_logs(name).lower(), 15), (
            container_logs(name)
        )
        flowing = len(stream.arrivals)
        stream.wait_events(flowing + 10)  # still flowing after SIGTERM reached SOAKP
    finally:
        finish.open()
    response = stream.join()
    assert (
        response.status == 200 and response.complete and response.body.endswith(b"data: [DONE]\n\n")
    )
    stopper.join(STOP_TIMEOUT_S + 40)
    assert "stop_s" in timings
    note_time("stop with a stream in flight", timings["stop_s"])
    assert timings["stop_s"] < GRACE_S, timings
    assert exit_code(name) == 0, container_logs(name)
    assert "certbot-entrypoint: soakp exited with status 0" in container_logs(name)
    assert upstream.errors == []


def test_certificate_from_pebble_renewed_under_a_stream_and_reused_after_a_restart(
    image: str,
    names: list[str],
    run_files: Path,
    upstream: FakeUpstream,
    admin: tuple[str, str],
    secrets_registry: SecretsRegistry,
    tmp_path: Path,
) -> None:
    """Pebble on the host: certbot in the container gets a certificate over HTTP-01 (port 80 of the
    container, published on Pebble's HTTP-01 port); forced renewals every few seconds reach new
    handshakes while a stream opened before them ends whole; a new container on the same volumes
    serves the stored certificate without asking for another."""
    with running_pebble(tmp_path / "pebble", listener_ips=(HOST_FROM_CONTAINER,)) as pebble:
        shutil.copy(pebble.listener_ca, run_files / "pebble-listener.pem")
        own_files(run_files)
        le, data = unique("le"), unique("data")
        first, second = unique("acme"), unique("acme-again")
        names.extend(
            [f"container:{first}", f"container:{second}", f"volume:{le}", f"volume:{data}"]
        )
        port = free_port()
        acme = [
            "--publish",
            f"127.0.0.1:{pebble.http01_port}:80",
            "--env",
            "SOAKP_DOMAIN=soakp.test",
            "--env",
            "CERTBOT_EMAIL=test@example.com",
            "--env",
            f"CERTBOT_SERVER={pebble.directory_url(HOST_FROM_CONTAINER)}",
            "--env",
            "REQUESTS_CA_BUNDLE=/run/test/pebble-listener.pem",
        ]
        started = time.monotonic()
        engine(
            *run_args(
                first,
                run_files,
                upstream,
                port,
                admin[0],
                (le, data),
                *acme,
                "--env",
                "RENEW_INTERVAL=3",
                "--env",
                "CERTBOT_RENEW_ARGS=--force-renewal --no-random-sleep-on-renew",
                image,
            )
        )
        wait_for_listening(first, CERT_S)
        note_time(
            "container start to listening with a new certificate from Pebble",
            time.monotonic() - started,
        )
        live = volume_path(le) / "live" / "soakp.test"
        context = client_verifying_as(pebble.root, "soakp.test")
        token = mint_over(port, context, admin, secrets_registry)

        finish = Gate()
        upstream.script("/v1/chat/completions", ticking_sse(finish))
        stream_conn = RawConnection(port, ssl_context=context)
        first_serial = peer_serial(stream_conn)
        stream = StreamWatcher(stream_conn).start(stream_request(token))
        seen: list[int] = []
        try:
            stream.wait_events(3)

            def renewed() -> bool:
                with RawConnection(port, ssl_context=context) as conn:
                    seen.append(peer_serial(conn))
                return seen[-1] != first_serial

            assert wait_until(renewed, CERT_S, interval_s=0.3), container_logs(first)
            stream.wait_events(len(stream.arrivals) + 5)
        finally:
            finish.open()
        response = stream.join()
        assert (
            response.status == 200
            and response.complete
            and response.body.endswith(b"data: [DONE]\n\n")
        )
        assert peer_serial(stream_conn) == first_serial
        stream_conn.close()
        assert "INFO TLS certificate reloaded" in container_logs(first)

        # Stop between renewals, then start a new container on the same volumes.
        assert wait_until(lambda: container_logs(first).rstrip().endswith("certbot renew done"), 60)
        engine("stop", "--time", str(STOP_TIMEOUT_S), first, timeout=STOP_TIMEOUT_S + 30)
        assert exit_code(first) == 0, container_logs(first)
        stored = pem_serial(live / "cert.pem")
        engine(
            *run_args(
                second,
                run_files,
                upstream,
                port,
                admin[0],
                (le, data),
                *acme,
                "--env",
                "CERTBOT_RENEW_ARGS=--no-random-sleep-on-renew",
                image,
            )
        )
        wait_for_listening(second)
        logs = container_logs(second)
        assert "using the certificate in /etc/letsencrypt/live/soakp.test" in logs
        assert "getting a certificate" not in logs
        with RawConnection(port, ssl_context=context) as conn:
            assert peer_serial(conn) == stored
        assert wait_until(lambda: "certbot renew done" in container_logs(second), 60), (
            container_logs(second)
        )
        assert pem_serial(live / "cert.pem") == stored  # not due: nothing renewed
        engine("stop", "--time", str(STOP_TIMEOUT_S), second, timeout=STOP_TIMEOUT_S + 30)
        assert exit_code(second) == 0, container_logs(second)
    assert upstream.errors == []


def test_compose_file_starts_a_healthy_service_with_secrets_and_stops_it(
    image: str,
    names: list[str],
    run_files: Path,
    admin: tuple[str, str],
    secrets_registry: SecretsRegistry,
    tmp_path: Path,
) -> None:
    """compose.yaml as shipped (its own bridge network, ports, sysctl, volumes, secrets, stop grace
    and health check), with only the image swapped for the one built here and the published ports
    moved to free loopback ports: podman-compose up, /healthz, an admin call whose password came
    from a secret file, the health check, then down within the grace period, the container gone."""
    require_tools("podman-compose", install_hint="make container-deps installs podman-compose")
    own_files(run_files)
    project = unique("compose")
    override = tmp_path / "compose.test.yaml"
    override.write_text(f"services:\n  soakp:\n    image: {image}\n")
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "SOAKP_HTTPS_PUBLISH": f"127.0.0.1:{port}",
        "SOAKP_HTTP_PUBLISH": f"127.0.0.1:{http_port}",
        "SOAKP_SECRET_PATH": str(run_files / "secret"),
        "SOAKP_ADMIN_PASS_PATH": str(run_files / "admin-pass"),
        "SOAKP_ADMIN_USER": admin[0],
    }
    for unset in ("SOAKP_DOMAIN", "CERTBOT_EMAIL", "CERTBOT_DOMAINS", "CERTBOT_DNS_PLUGIN"):
        env.pop(unset, None)
    compose = [
        "podman-compose",
        "--project-name",
        project,
        "--file",
        str(ROOT / "compose.yaml"),
        "--file",
        str(override),
    ]
    container = f"{project}_soakp_1"
    names.extend(
        [
            f"container:{container}",
            f"volume:{project}_letsencrypt",
            f"volume:{project}_data",
            f"network:{project}_default",
        ]
    )

    def run_compose(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*compose, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        assert result.returncode == 0, (
            f"podman-compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        )
        assert "exit code: " not in result.stdout.replace("exit code: 0", ""), (
            result.stdout + result.stderr
        )
        return result

    started = time.monotonic()
    run_compose("up", "--detach")
    wait_for_listening(container)
    note_time("podman-compose up to listening", time.monotonic() - started)
    inspect = json.loads(engine("inspect", container).stdout)[0]
    assert {
        "/etc/letsencrypt",
        "/data",
        "/run/secrets/soakp_secret",
        "/run/secrets/soakp_admin_pass",
    } <= {mount["Destination"] for mount in inspect["Mounts"]}
    health = engine("healthcheck", "run", container, check=False)
    assert health.returncode == 0, health.stdout + health.stderr + container_logs(container)

    selfsigned = volume_path(f"{project}_data") / "selfsigned" / "fullchain.pem"
    context = client_verifying_as(str(selfsigned), "localhost")
    with RawConnection(port, ssl_context=context) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert conn.read_response().status == 200
    mint_over(port, context, admin, secrets_registry)  # the admin password from the secret file

    # podman-compose 1.0.3 passes neither stop_grace_period nor a timeout on (`down` stops after 1
    # s, `stop` after Podman's 10 s), so the container is stopped as compose.yaml's header says
    # first.
    started = time.monotonic()
    engine("stop", "--time", str(STOP_TIMEOUT_S), container, timeout=STOP_TIMEOUT_S + 30)
    note_time("podman stop of the compose service", time.monotonic() - started)
    assert time.monotonic() - started < GRACE_S
    assert exit_code(container) == 0, container_logs(container)
    run_compose("down", "--volumes")
    assert engine("container", "exists", container, check=False).returncode != 0
