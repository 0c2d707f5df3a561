"""The command line as a user runs it: `python soakp.py ...` and `python -m soakp ...` in a subprocess.

Each run gets a scrubbed environment (no SOAKP_* from the host) and a fresh working directory.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

import soakp

REPO = Path(__file__).resolve().parent.parent
SOAKP_PY = REPO / "soakp.py"
SECRET = "cli-test-master-secret-0123456789abcdef"
KEY = "sk-cli-test-key-do-not-print-9f8e7d6c5b4a"
RUN_TIMEOUT_S = 30


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAKP_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "soakp", *args] if module else [sys.executable, str(SOAKP_PY), *args]
    return subprocess.run(command, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_version(tmp_path: Path) -> None:
    result = run(["--version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"soakp {soakp.__version__}"
    assert result.stderr == ""


def test_python_dash_m_soakp_version(tmp_path: Path) -> None:
    """`python -m soakp` behaves like `python soakp.py` (SPEC.md, Shape)."""
    result = run(["--version"], tmp_path, env=clean_env(PYTHONPATH=str(REPO)), module=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"soakp {soakp.__version__}"


def test_mint_prints_a_token_that_verifies_under_the_same_secret(tmp_path: Path) -> None:
    before = int(time.time())
    result = run(["mint", "--key", KEY, "--secret", SECRET, "--sub", "cli-user", "--ttl", "15m"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    token = lines[-1]
    assert token == token.strip() and token.count(".") == 2 and " " not in token
    claims = soakp.verify_token(token, soakp.build_keyring(SECRET), time.time())
    assert claims.key == KEY
    assert claims.sub == "cli-user"
    assert before <= claims.iat <= int(time.time()) + 1
    assert claims.exp - claims.iat == 900
    assert claims.kid == soakp.derive_keys(SECRET).kid


def test_mint_takes_its_secret_from_the_environment(tmp_path: Path) -> None:
    result = run(["mint", "--key", KEY], tmp_path, env=clean_env(SOAKP_SECRET=SECRET))
    assert result.returncode == 0, result.stderr
    assert soakp.verify_token(result.stdout.splitlines()[-1], soakp.build_keyring(SECRET), time.time()).key == KEY


def test_mint_never_prints_the_key(tmp_path: Path) -> None:
    result = run(["mint", "--key", KEY, "--secret", SECRET, "--log-level", "debug"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stdout
    assert KEY not in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_mint_token_is_refused_under_another_secret(tmp_path: Path) -> None:
    result = run(["mint", "--key", KEY, "--secret", SECRET], tmp_path)
    token = result.stdout.splitlines()[-1]
    with pytest.raises(soakp.ApiError):
        soakp.verify_token(token, soakp.build_keyring("another-secret-that-is-long-enough-0000"), time.time())


def test_mint_with_a_bad_key_exits_2_without_echoing_the_key(tmp_path: Path) -> None:
    bad_key = "sk-has a-space-secretvalue"
    result = run(["mint", "--key", bad_key, "--secret", SECRET], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert bad_key not in result.stdout + result.stderr
    assert "secretvalue" not in result.stdout + result.stderr


def test_selfsigned_writes_a_loadable_pair_in_certbot_layout(tmp_path: Path) -> None:
    out_dir = tmp_path / "tls"
    result = run(["selfsigned", "--dir", str(out_dir), "--host", "example.test"], tmp_path)
    assert result.returncode == 0, result.stderr
    fullchain, privkey = out_dir / "fullchain.pem", out_dir / "privkey.pem"
    assert fullchain.is_file() and privkey.is_file()
    assert stat.S_IMODE(privkey.stat().st_mode) == 0o600
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(fullchain), str(privkey))
    cert = x509.load_pem_x509_certificate(fullchain.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"example.test", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert b"PRIVATE KEY" not in fullchain.read_bytes()


@pytest.mark.parametrize("args", [["--frobnicate"], ["serve", "--listen", "not-an-address", "--secret", SECRET],
                                  ["mint", "--key", KEY], ["--secret", "short"]])
def test_a_bad_flag_exits_2_with_one_stderr_line_and_no_traceback(tmp_path: Path, args: list[str]) -> None:
    result = run(args, tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert KEY not in result.stdout + result.stderr


def test_serve_with_an_unloadable_certificate_exits_2_with_one_line(tmp_path: Path) -> None:
    """SPEC.md, Configuration: an unusable cert stops start-up with one clear line and exit code 2."""
    (tmp_path / "fullchain.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "privkey.pem").write_text("not a key\n")
    result = run(["serve", "--secret", SECRET, "--listen", "127.0.0.1:0", "--db", ":memory:",
                  "--cert-dir", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_mint_registers_the_jti_in_the_db_and_never_the_key_or_token(tmp_path: Path) -> None:
    """SPEC.md: mint registers the token in the db; the key never appears in the database."""
    db = tmp_path / "registry.db"
    result = run(["mint", "--key", KEY, "--secret", SECRET, "--db", str(db)], tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[-1]
    jti = soakp.verify_token(token, soakp.build_keyring(SECRET), time.time()).jti
    listed = run(["tokens", "--db", str(db), "--secret", SECRET], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert jti in listed.stdout
    assert KEY not in listed.stdout and token not in listed.stdout
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*"))
    assert jti.encode() in stored
    assert KEY.encode() not in stored and token.encode() not in stored
