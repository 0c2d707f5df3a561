"""deploy/soakp.service, the systemd unit for the zipapp: what systemd itself says of it.

`systemd-analyze verify` loads the unit as systemd would (every key known and well-formed, the
ExecStart program present) and `systemd-analyze security --offline=true` scores its sandboxing; the
README quotes that score. No systemd needs to run: both read the file alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "soakp.service"
README = ROOT / "README.md"
MAX_EXPOSURE = 2.0  # systemd calls 0-2 "OK" (then MEDIUM, EXPOSED, UNSAFE)


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (Debian's systemd package)")
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values in order ([Service] and the rest alike; systemd allows repeated keys)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(path: Path) -> str:
    """What `systemd-analyze verify` says of a unit file: "" when it has nothing to say."""
    result = systemd_analyze("verify", str(path))
    return (
        f"exit {result.returncode}\n{result.stdout}{result.stderr}"
        if result.returncode
        else result.stdout + result.stderr
    )


def test_systemd_verifies_the_unit_without_a_warning() -> None:
    assert verify(UNIT) == ""


def test_verify_would_catch_a_misspelt_or_malformed_setting(tmp_path: Path) -> None:
    """The check above can fail: systemd-analyze verify exits 0 on unknown keys, but says so."""
    broken = tmp_path / "soakp.service"
    broken.write_text(
        UNIT.read_text()
        .replace("TimeoutStopSec=40", "TimeoutStopSec=forty")
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
    )
    said = verify(broken)
    assert "Failed to parse time value" in said and "Unknown key 'ProtectSytem'" in said


def test_reload_stop_timeout_user_and_port_capability() -> None:
    """SIGHUP on reload; systemd waits longer than SOAKP's shutdown grace before it kills; a
    non-root user that may bind port 443 and has no other capability."""
    settings = unit_settings(UNIT.read_text())
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["KillSignal"] == ["SIGTERM"]
    grace = re.search(
        r'"shutdown-grace": \(\s*"SOAKP_SHUTDOWN_GRACE",\s*"(\d+)s"', (ROOT / "soakp.py").read_text()
    )
    assert grace, "SOAKP's default shutdown grace not found in soakp.py"
    assert int(settings["TimeoutStopSec"][0]) > int(grace[1])
    assert settings["User"] == ["soakp"] and settings["Group"] == ["soakp"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert (
        "SOAKP_SECRET_FILE=%d/secret" in settings["Environment"]
    )  # the credential, never in the unit


def test_sandboxing_scores_ok_and_the_readme_quotes_the_score() -> None:
    result = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Overall exposure level for soakp\.service: (\d+\.\d) (\w+)", result.stdout)
    assert found, result.stdout
    assert float(found[1]) <= MAX_EXPOSURE and found[2] == "OK", found[0]
    assert f"exposure level {found[1]} OK" in README.read_text(), (
        f"README's systemd section should quote `systemd-analyze security`: {found[1]} {found[2]}"
    )
