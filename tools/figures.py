"""`make figures`: the numbers the README quotes about the zipapp, measured on this machine.

- size of dist/soakp.pyz, and how much of it is cryptography;
- time from starting `python3 soakp.pyz serve` to its first `200` from /healthz, on the first start
  (shiv unpacks its libraries into a fresh SHIV_ROOT) and on later starts (median of RUNS);
- memory of the idle server (VmRSS in /proc/PID/status), after it answered /healthz.

Runs the zipapp with /usr/bin/python3 (or --python) on 127.0.0.1, plain HTTP, an in-memory database.
Prints the figures and the machine they come from, as a few lines of Markdown for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from proc_helpers import memory_kib, stop_process  # noqa: E402 - the tests' /proc helpers

LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.005
RUNS = 5
MIB = 1024 * 1024


def machine() -> str:
    """CPU count, architecture, model and the Python that ran the zipapp."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = f", {found.group(1).strip()}" if found else ""
    return f"{os.cpu_count()} cores {platform.machine()}{model}"


def python_version(python: str) -> str:
    result = subprocess.run(
        [python, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


def bundled(zipapp: Path) -> dict[str, int]:
    """Compressed bytes per top-level package inside the zipapp's site-packages."""
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(zipapp) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if "site-packages" in parts and parts.index("site-packages") + 1 < len(parts):
                name = parts[parts.index("site-packages") + 1].split("-")[0]
                sizes[name] = sizes.get(name, 0) + info.compress_size
    return sizes


def version_of(zipapp: Path, package: str) -> str:
    with zipfile.ZipFile(zipapp) as archive:
        for name in archive.namelist():
            found = re.search(rf"site-packages/{package}-([0-9][^/]*)\.dist-info/", name)
            if found:
                return found.group(1)
    return "?"


def start_once(python: str, zipapp: Path, shiv_root: Path) -> tuple[float, int]:
    """Start the zipapp, wait for /healthz to answer 200; return (seconds taken, VmRSS in KiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOAKP_", "OPENAI_"))}
    env.update(SHIV_ROOT=str(shiv_root), SOAKP_SECRET=secrets.token_urlsafe(48))
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [
                python,
                str(zipapp),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                ":memory:",
                "--log-level",
                "info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            port = None
            while port is None:
                if process.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                    log.seek(0)
                    raise RuntimeError(
                        f"the zipapp did not start:\n{log.read().decode(errors='replace')}"
                    )
                log.seek(0)
                found = LISTENING.search(log.read())
                port = int(found.group(1)) if found else None
                if port is None:
                    time.sleep(POLL_S)
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/healthz", timeout=5
                    ) as response:
                        if response.status == 200:
                            break
                except (OSError, socket.timeout):
                    if time.monotonic() - started > START_TIMEOUT_S:
                        raise
                    time.sleep(POLL_S)
            took = time.monotonic() - started
            time.sleep(0.5)  # idle
            return took, memory_kib(process.pid)["VmRSS"]
        finally:
            stop_process(process, STOP_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zipapp", default="dist/soakp.pyz", help="the zipapp to measure")
    parser.add_argument("--python", default="/usr/bin/python3", help="the Python that runs it")
    parser.add_argument(
        "--runs", type=int, default=RUNS, help=f"warm starts to take the median of ({RUNS})"
    )
    args = parser.parse_args(argv)
    zipapp = Path(args.zipapp)
    if not zipapp.is_file():
        print(
            f"figures: no zipapp at {zipapp}: run make zipapp first (make figures does)",
            file=sys.stderr,
        )
        return 1
    size = zipapp.stat().st_size
    sizes = bundled(zipapp)
    with tempfile.TemporaryDirectory(prefix="soakp-figures-") as shiv_root:
        first_s, _ = start_once(args.python, zipapp, Path(shiv_root))
        warm = [start_once(args.python, zipapp, Path(shiv_root)) for _ in range(max(1, args.runs))]
    warm_s = statistics.median(took for took, _ in warm)
    rss_mb = statistics.median(rss for _, rss in warm) * 1024 / 1_000_000
    print(
        f"Measured with `make figures` on {machine()}, Python {python_version(args.python)}, "
        f"cryptography {version_of(zipapp, 'cryptography')}:"
    )
    print(
        f"- zipapp: {size / MIB:.1f} MiB ({size} bytes); cryptography is "
        f"{sizes.get('cryptography', 0) / MIB:.1f} MiB of it"
    )
    print(
        f"- start to the first answer from /healthz: {first_s:.2f} s on the first start (unpacking "
        f"included), {warm_s:.2f} s afterwards (median of {len(warm)})"
    )
    print(f"- an idle `soakp.pyz serve`: {rss_mb:.0f} MB of memory (VmRSS)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
