"""No SOAKP log ever holds a key, a whole token, the master secret or the admin password.

conftest.py registers every such value and every SOAKP log file (servers' stderr and stdout, CLI
commands' stderr) in `secrets_registry`, and moves this file's tests after all others, so this check
covers everything the session did. Run alone, it first does enough to give the logs something to say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fake_upstream import FakeUpstream, openai_error

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpProcess


def test_no_log_holds_a_secret(proxy: SoakpProcess, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry) -> None:
    """Grep every SOAKP log of the session for every key, token, secret and password used."""
    # Give this run's shared server (at --log-level debug) some traffic: good, refused and failed requests.
    minted = proxy.mint_data(org="org-log", project="proj-log")
    assert proxy.request("GET", "/v1/models", minted.token).status == 200
    assert proxy.request("GET", "/v1/models", minted.token[:-4] + "AAAA").status == 401
    fake_upstream.script("/v1/chat/completions", openai_error(500, "upstream exploded"))
    assert proxy.request("POST", "/v1/chat/completions", minted.token, body=b"{}").status == 500
    assert proxy.request("GET", "/v1/../jwt", minted.token).status == 400

    assert secrets_registry.logs, "no SOAKP log was captured"
    assert any(path.read_text(errors="replace").strip() for path in secrets_registry.logs), "every log is empty"
    leaks = []
    for path in secrets_registry.logs:
        text = path.read_text(encoding="utf-8", errors="replace")
        for value in secrets_registry.values:
            if value in text:
                line = next(line for line in text.splitlines() if value in line)
                leaks.append(f"{path.name}: {value[:10]}... in {line[:200]!r}")
    assert not leaks, "secrets found in SOAKP logs:\n" + "\n".join(leaks)
