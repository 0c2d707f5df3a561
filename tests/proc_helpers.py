"""What /proc says about a process, for the tests, bench/ and tools/ (Linux only; stdlib only).

    memory_kib(pid)      VmRSS and VmHWM (peak RSS), in KiB
    descriptors(pid)     how many file descriptors it has open
    listening_port(pid)  the TCP port it listens on (a quiet SOAKP does not log it)
    stop_process(popen)  SIGTERM, then SIGKILL after a timeout
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def memory_kib(pid: int, missing_ok: bool = False) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status.

    With missing_ok, a process that is gone (or cannot be read) gives zeros instead of OSError.
    """
    figures = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        if missing_ok:
            return figures
        raise
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in figures:
            figures[name] = int(value.split()[0])
    return figures


def descriptors(pid: int) -> int:
    """How many file descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_port(pid: int) -> int | None:
    """The TCP port a process listens on (IPv4), from /proc; None while it listens on none."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
            return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def stop_process(popen: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout_s)
