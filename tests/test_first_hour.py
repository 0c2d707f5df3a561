"""The first hour with SOAKP (issue #15): the traps a new user meets at the edges, each closed.

The CLI runs as a user runs it (`python soakp.py ...` in a subprocess with a scrubbed environment),
servers through the shared launcher, against the fake upstream.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest
from conftest import SOAKP_PY, SoakpProcess
from fake_upstream import CertAuthority, FakeUpstream, build_request, exchange

import soakp
import soakp as soakp_module  # for tests whose `soakp` is the launcher fixture

SECRET = "first-hour-master-secret-0123456789abcdef"
KEY = "sk-first-hour-key-never-printed-5a4b3c2d1e"
RUN_TIMEOUT_S = 30
COMMANDS = ("serve", "mint", "revoke", "tokens", "selfsigned")


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOAKP_", "OPENAI_")) and k != "PYTHONPATH"
    }
    env.update(extra)
    return env


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SOAKP_PY), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def minted_claims(result: subprocess.CompletedProcess[str]) -> soakp.TokenClaims:
    assert result.returncode == 0, result.stderr
    return soakp.verify_token(
        result.stdout.splitlines()[-1], soakp.build_keyring(SECRET), time.time()
    )


# 1. revoke and tokens refuse a database that does not exist #######################################


@pytest.mark.parametrize("command", [["tokens"], ["revoke", "fifmjanSvJA-mZ0eYcvi3A"]])
@pytest.mark.parametrize("where", ["default", "flag", "env"])
def test_registry_commands_refuse_a_database_that_does_not_exist(
    tmp_path: Path, command: list[str], where: str
) -> None:
    """Before: `soakp revoke JTI` without --db created ./soakp.db, printed a revocation and exited 0
    while the server, on var/soakp.db, kept accepting the token."""
    missing = tmp_path / "var" / "soakp.db"
    argv, env = list(command), clean_env()
    if where == "flag":
        argv += ["--db", str(missing)]
    elif where == "env":
        env["SOAKP_DB"] = str(missing)
    result = run(argv, tmp_path, env)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    shown = "./soakp.db" if where == "default" else str(missing)
    assert shown in line and "--db" in line and "SOAKP_DB" in line, line
    assert {"flag": "(from --db)", "env": "(from SOAKP_DB)", "default": "no token database"}[
        where
    ] in line
    assert not (tmp_path / "soakp.db").exists() and not missing.exists()


def test_registry_commands_still_work_on_an_existing_database(tmp_path: Path) -> None:
    db = tmp_path / "soakp.db"
    jti = minted_claims(
        run(["mint", "--secret", SECRET, "--db", str(db), "--key", KEY], tmp_path)
    ).jti
    listed = run(["tokens"], tmp_path)  # ./soakp.db, the default, exists now
    assert listed.returncode == 0, listed.stderr
    assert jti in listed.stdout


# 3. Plain HTTP on the TLS port ####################################################################


@pytest.fixture
def tls_proxy(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> SoakpProcess:
    live = tmp_path / "live"
    cert, key = test_ca.issue("soakp", directory=live)
    cert.rename(live / "fullchain.pem")
    key.rename(live / "privkey.pem")
    proxy = soakp(cert_dir=str(live))
    assert proxy.scheme == "https"
    return proxy


def test_plain_http_on_the_tls_port_gets_a_plain_400_saying_it_speaks_https(
    tls_proxy: SoakpProcess,
) -> None:
    """Before: curl said "Empty reply from server", the SDK a connection error, the log nothing."""
    response = exchange(
        tls_proxy.port,
        build_request("GET", "/v1/models", host=f"127.0.0.1:{tls_proxy.port}"),
        "GET",
        10.0,
        None,
    )
    assert response.status == 400
    error = response.json()["error"]
    assert error["code"] == "https_required"
    assert "HTTPS" in error["message"] and "https://" in error["message"]
    assert response.header("connection") == "close"
    deadline = time.monotonic() + 5
    while "on the HTTPS port" not in tls_proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    [line] = [line for line in tls_proxy.log_text().splitlines() if "on the HTTPS port" in line]
    assert "plain HTTP" in line and "127.0.0.1" in line


def test_the_tls_port_still_serves_tls_and_the_sdk_after_a_plain_request(
    tls_proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    exchange(tls_proxy.port, build_request("GET", "/healthz"), "GET", 10.0, None)
    assert tls_proxy.request("GET", "/healthz").status == 200
    token = tls_proxy.mint()
    models = tls_proxy.openai(token).models.list()
    assert models.data is not None
    assert fake_upstream.wait_for_request("/v1/models").path == "/v1/models"


def test_a_client_that_sends_nothing_is_closed_after_the_header_timeout(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    cert, key = test_ca.issue("soakp", directory=live)
    proxy = soakp("--cert", str(cert), "--tls-key", str(key), header_timeout="1s")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by SOAKP, not by our timeout
        assert time.monotonic() - started < 8


# 4. --upstream ending in /v1 ######################################################################


@pytest.mark.parametrize("suffix", ["/v1", "/v1/"])
def test_an_upstream_ending_in_v1_is_normalised_with_a_warning(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, suffix: str
) -> None:
    """Before: accepted silently, and every request went to /v1/v1/..."""
    proxy = soakp(upstream=fake_upstream.url + suffix)
    assert proxy.request("GET", "/v1/models", proxy.mint()).status == 200
    assert fake_upstream.wait_for_request().path == "/v1/models"
    warning = [line for line in proxy.log_text().splitlines() if "ends in /v1" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and "--upstream" in warning[0]


def test_parse_and_normalise_upstream_keeps_other_prefixes() -> None:
    for text, base in (
        ("https://gw.example/openai/v1", "/openai"),
        ("https://gw.example/v1/", ""),
        ("https://gw.example/v10", "/v10"),
        ("https://gw.example/prefix", "/prefix"),
    ):
        target, warning = soakp.normalise_upstream(soakp.parse_upstream(text))
        assert target.base_path == base
        assert (warning is not None) == text.rstrip("/").endswith("/v1")


# 5. Start-up names the secrets it uses ############################################################


def test_start_up_logs_the_kid_of_the_signing_secret_and_of_each_old_secret(
    soakp: Callable[..., SoakpProcess], secret: str, secrets_registry: Any
) -> None:
    old = [
        secrets_registry.add(f"old-secret-{n}-0123456789abcdef0123456789") for n in ("one", "two")
    ]
    proxy = soakp(old_secrets=",".join(old))
    text = proxy.log_text()
    assert f"signing tokens with the secret kid={soakp_module.derive_keys(secret).kid}" in text
    kids = [soakp_module.derive_keys(s).kid for s in old]
    assert (
        f"also accepting tokens of 2 old secrets (--old-secrets): kid={kids[0]}, kid={kids[1]}"
        in text
    )
    assert all(s not in text for s in old)


# 6. Where mint takes the OpenAI key from; --tls-key and SOAKP_KEY for serve #######################


def test_mint_reads_the_key_from_openai_api_key(tmp_path: Path) -> None:
    result = run(
        ["mint", "--secret", SECRET, "--db", ":memory:"], tmp_path, clean_env(OPENAI_API_KEY=KEY)
    )
    assert minted_claims(result).key == KEY
    assert KEY not in result.stdout + result.stderr


def test_mint_reads_the_key_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    result = run(
        ["mint", "--secret", SECRET, "--db", ":memory:", "--key-file", str(tmp_path / "key")],
        tmp_path,
        clean_env(OPENAI_API_KEY="sk-not-this-one"),
    )
    assert minted_claims(result).key == KEY


@pytest.mark.parametrize("flag", [["--key", "-"], ["--key-file", "-"]])
def test_mint_reads_the_key_from_standard_input(tmp_path: Path, flag: list[str]) -> None:
    result = run(
        ["mint", "--secret", SECRET, "--db", ":memory:", *flag], tmp_path, stdin=KEY + "\n"
    )
    assert minted_claims(result).key == KEY


def test_the_flag_wins_over_openai_api_key(tmp_path: Path) -> None:
    result = run(
        ["mint", "--secret", SECRET, "--db", ":memory:", "--key", KEY],
        tmp_path,
        clean_env(OPENAI_API_KEY="sk-not-this-one"),
    )
    assert minted_claims(result).key == KEY


@pytest.mark.parametrize(
    "args, env, stdin",
    [
        (["--key", "-"], {}, ""),  # before: sealed the literal "-"
        (["--key", "-"], {}, "\n"),
        ([], {"OPENAI_API_KEY": "-"}, None),
        (["--key-file", "KEYFILE"], {}, None),
    ],
)
def test_mint_never_seals_a_dash_or_nothing(
    tmp_path: Path, args: list[str], env: dict[str, str], stdin: str | None
) -> None:
    (tmp_path / "KEYFILE").write_text("-\n")
    result = run(
        ["mint", "--secret", SECRET, "--db", ":memory:", *args],
        tmp_path,
        clean_env(**env),
        stdin=stdin,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "--key" in line or "OPENAI_API_KEY" in line, line


def test_mint_without_any_key_names_every_place_it_looks(tmp_path: Path) -> None:
    result = run(["mint", "--secret", SECRET, "--db", ":memory:"], tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    for place in ("OPENAI_API_KEY", "--key-file", "--key -", "--key KEY"):
        assert place in line


def test_soakp_key_holding_an_openai_key_no_longer_breaks_serve(
    soakp_launcher: Any, tmp_path: Path
) -> None:
    """Before: SOAKP_KEY=sk-... made serve refuse to start ("--cert and --key go together")."""
    config, _ = soakp.load_config(["--db", ":memory:"], {"SOAKP_SECRET": SECRET, "SOAKP_KEY": KEY})
    assert config.key_file is None and not config.tls
    [warning] = config.warnings
    assert "SOAKP_KEY" in warning and "ignored" in warning and "SOAKP_TLS_KEY" in warning
    assert KEY not in warning


def test_soakp_key_naming_a_file_is_still_the_tls_key_with_a_warning(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert\n")
    key.write_text("key\n")
    config, _ = soakp.load_config(
        [], {"SOAKP_SECRET": SECRET, "SOAKP_CERT": str(cert), "SOAKP_KEY": str(key)}
    )
    assert (config.cert_file, config.key_file) == (str(cert), str(key))
    assert "rename it SOAKP_TLS_KEY" in config.warnings[0]
    flagged, _ = soakp.load_config(
        ["--cert", str(cert), "--key", str(key)], {"SOAKP_SECRET": SECRET}
    )
    assert flagged.key_file == str(key)  # --key stays an alias of --tls-key for serve


def test_serve_with_tls_key_serves_https(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> None:
    cert, key = test_ca.issue("soakp", directory=tmp_path)
    proxy = soakp("--cert", str(cert), "--tls-key", str(key))
    assert proxy.scheme == "https" and proxy.request("GET", "/healthz").status == 200


# 9. Messages say what happened and what to do, naming the setting #################################


def bad_inputs(tmp: Path) -> list[tuple[list[str], dict[str, str], str | None, tuple[str, ...]]]:
    """(argv, environment, stdin, settings one of which the message must name)."""
    bad_pair = tmp / "bad-pair"
    bad_pair.mkdir()
    (bad_pair / "fullchain.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    (bad_pair / "privkey.pem").write_text("not a key\n")
    base = {"SOAKP_SECRET": SECRET}
    serve = ["--listen", "127.0.0.1:0", "--db", ":memory:"]
    return [
        ([], {}, None, ("--secret-file", "SOAKP_SECRET_FILE")),
        (["--secret", "short"], {}, None, ("--secret",)),
        ([], {"SOAKP_SECRET": "short"}, None, ("SOAKP_SECRET",)),
        (["--secret-file", str(tmp / "missing")], {}, None, ("--secret-file",)),
        (["--listen", "nonsense"], base, None, ("--listen",)),
        ([], {**base, "SOAKP_LISTEN": "nonsense"}, None, ("SOAKP_LISTEN",)),
        (["--upstream", "ftp://x"], base, None, ("--upstream",)),
        (["--upstream-ca", str(tmp / "missing.pem")], base, None, ("--upstream-ca",)),
        (["--cert-dir", str(tmp / "nowhere")], base, None, ("--cert-dir",)),
        (["--cert-dir", str(bad_pair), *serve], base, None, ("--cert-dir",)),
        (["--cert", str(bad_pair / "fullchain.pem")], base, None, ("--tls-key",)),
        (["--max-body", "12XB"], base, None, ("--max-body",)),
        (["--max-connections", "many"], base, None, ("--max-connections",)),
        (["--read-timeout", "soon"], base, None, ("--read-timeout",)),
        (["--token-ttl", "400d"], base, None, ("--max-token-ttl",)),
        (["--admin-user", "admin"], base, None, ("--admin-pass",)),
        (["--log-level", "loud"], base, None, ("--log-level",)),
        (["--cors-origins", "app.example.com"], base, None, ("--cors-origins",)),
        (["--frobnicate"], base, None, ("--help",)),
        (["frobnicate"], base, None, ("serve", "mint")),
        (["mint", "--db", ":memory:"], base, None, ("OPENAI_API_KEY", "--key")),
        (
            ["mint", "--db", ":memory:", "--key", KEY, "--ttl", "400d"],
            base,
            None,
            ("--max-token-ttl",),
        ),
        (["mint", "--db", ":memory:", "--key", KEY, "--ttl", "soon"], base, None, ("--ttl",)),
        (
            ["mint", "--db", ":memory:", "--key", KEY, "--paths", "chat/completions"],
            base,
            None,
            ("/v1/",),
        ),
        (
            ["mint", "--db", ":memory:", "--key", KEY, "--origins", "app.example"],
            base,
            None,
            ("--origins",),
        ),
        (["mint", "--db", ":memory:", "--key", KEY, "--rpm", "lots"], base, None, ("--rpm",)),
        (["mint", "--db", ":memory:", "--key", "has space"], base, None, ("--key",)),
        (
            ["mint", "--db", ":memory:", "--key-file", str(tmp / "nokey")],
            base,
            None,
            ("--key-file",),
        ),
        (["mint", "--db", str(tmp / "no-such-dir" / "x.db"), "--key", KEY], base, None, ("--db",)),
        (["tokens", "--db", str(tmp / "none.db")], {}, None, ("--db",)),
        (["revoke", "--db", str(tmp / "gone.db"), "abc"], {}, None, ("--db",)),
        (["selfsigned"], {}, None, ("--dir",)),
    ]


CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


def test_every_start_up_and_cli_error_names_the_setting_to_change(tmp_path: Path) -> None:
    seen = []
    for argv, env, stdin, settings in bad_inputs(tmp_path):
        result = run(argv, tmp_path, clean_env(**env), stdin=stdin)
        line = result.stderr.strip()
        seen.append(line)
        assert result.returncode in (1, 2), (argv, result.returncode, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (argv, result.stderr)
        assert line.startswith("soakp: "), (argv, line)
        assert any(setting in line for setting in settings), (argv, settings, line)
        assert not CLASS_NAME.search(line), (argv, line)
        assert "_ssl.c" not in line and "Traceback" not in line, (argv, line)
        assert KEY not in line and SECRET not in line, argv
    repeated = {line for line in seen if seen.count(line) > 1}
    assert not repeated  # each input got its own message


def test_a_port_in_use_names_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            ["--listen", f"127.0.0.1:{port}", "--db", ":memory:"],
            tmp_path,
            clean_env(SOAKP_SECRET=SECRET),
        )
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("soakp: --listen:") and "address already in use" in line, result.stderr
    assert not CLASS_NAME.search(line) and "error while attempting" not in line


def test_describe_error_words() -> None:
    assert (
        soakp.describe_error(FileNotFoundError(2, "No such file or directory"))
        == "no such file or directory"
    )
    pem = ssl.SSLError(9, "[SSL] PEM lib (_ssl.c:3905)")
    assert soakp.describe_error(pem) == "not a PEM certificate or private key"
    assert soakp.describe_error(TimeoutError()) == "timed out"
    assert soakp.plural(1, "expired token") == "1 expired token"
    assert soakp.plural(2, "expired token") == "2 expired tokens"


def test_a_wrong_admin_password_is_called_wrong(proxy: SoakpProcess) -> None:
    """Before: "Admin credentials are required." for a password that was given but wrong."""
    import base64

    wrong = "Basic " + base64.b64encode(f"{proxy.admin[0]}:not-the-password".encode()).decode()
    response = proxy.request("GET", "/jwt", headers=[("Authorization", wrong)])
    assert response.status == 401
    assert response.json()["error"]["message"] == "Wrong admin user or password."
    missing = proxy.request("GET", "/jwt")
    assert missing.status == 401
    assert "required" in missing.json()["error"]["message"]


# 10. Help: a description, only the options a command uses, an example #############################


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_a_description_its_own_options_and_an_example(
    tmp_path: Path, command: str
) -> None:
    result = run([command, "--help"], tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    description = text.split("\n\n")[1]
    assert description.strip() and not description.startswith(("options", "positional"))
    assert re.search(r"^examples?:\n  \S*.*soakp ", text, re.MULTILINE), text
    assert f"soakp {command}" in text.split("example")[-1]
    flags = set(re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE))
    expected = {
        "serve": {
            "--listen",
            "--secret",
            "--secret-file",
            "--old-secrets",
            "--cert-dir",
            "--tls-key",
            "--db",
        },
        "mint": {"--secret", "--secret-file", "--db", "--key", "--key-file", "--ttl", "--paths"},
        "revoke": {"--db", "--redis"},
        "tokens": {"--db", "--redis"},
        "selfsigned": {"--dir", "--host"},
    }[command]
    assert expected <= flags, flags
    if command in ("revoke", "tokens", "selfsigned"):
        assert flags == expected, flags  # nothing they would ignore
    if command == "mint":
        assert "--old-secrets" not in flags and "--log-level" not in flags


def test_commands_still_accept_the_common_options_they_do_not_list(tmp_path: Path) -> None:
    """SPEC.md, Commands: every command takes --secret/--db like serve; scripts passing them run."""
    db = tmp_path / "soakp.db"
    assert (
        run(["mint", "--secret", SECRET, "--db", str(db), "--key", KEY], tmp_path).returncode == 0
    )
    result = run(["tokens", "--secret", SECRET, "--db", str(db), "--log-level", "debug"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_top_level_help_lists_the_commands_and_an_example(tmp_path: Path) -> None:
    result = run(["--help"], tmp_path)
    assert result.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^    {command} +\S", result.stdout, re.MULTILINE), command
    assert "example" in result.stdout and "-V, --version" in result.stdout


def test_an_unknown_command_is_named_and_the_commands_listed(tmp_path: Path) -> None:
    """Before: `soakp foo` said "unrecognized arguments: foo"."""
    result = run(["foo"], tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "unknown command 'foo'" in line
    assert all(command in line for command in COMMANDS)


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_dash_capital_v_prints_the_version(tmp_path: Path, flag: str) -> None:
    result = run([flag], tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"soakp {soakp.__version__}"


def test_the_serve_parser_no_longer_shadows_serve() -> None:
    source = Path(soakp.__file__).read_text()
    body = source[source.index("def build_parser") : source.index("def option_value")]
    assert not re.search(r"^\s+serve = ", body, re.MULTILINE)
    assert callable(soakp.serve)
