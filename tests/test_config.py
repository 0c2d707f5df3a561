"""Configuration, pure: load_config(argv, environ) and its parsers; main() on a bad value.

The environment is always passed in as a dict, never read from the test process, so the host's own
SOAKP_* variables cannot change a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import soakp

# Master secrets as a user would make them: random enough to pass SOAKP's weak-secret check.
SECRET = "s3cr3t-Kx9qLm2pVt7wRz4nBy6hJd8fA1"
OTHER = "other-Qw3eRt5yUi7oPa9sDf1gHj2kLz4xCv6b"
F32, E32, C32, A32, B32, X32 = (f"{c}-secret-Mq7Lp2Vx9Rt4Wz6Nb8Hd3Jk5G"[:32].ljust(32, "Z") for c in "fecabx")
BASE_ENV = {"SOAKP_SECRET": SECRET}


def load(argv: list[str], environ: dict[str, str] | None = None) -> soakp.Config:
    config, _ = soakp.load_config(argv, BASE_ENV if environ is None else environ)
    return config


def tls_pair(directory: Path) -> Path:
    """An empty but readable fullchain.pem + privkey.pem: load_config checks readability, not content."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fullchain.pem").write_text("cert\n")
    (directory / "privkey.pem").write_text("key\n")
    return directory


def refused(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(soakp.ConfigError) as info:
        soakp.load_config(argv, BASE_ENV if environ is None else environ)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# Defaults #############################################################################################


def test_defaults_match_the_spec_table() -> None:
    """SPEC.md, Configuration: every default in the table, with only the (required) secret given."""
    config = load([])
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 3033)
    assert config.secret == SECRET
    assert config.old_secrets == ()
    assert config.admin_user is None and config.admin_pass is None
    upstream = config.upstream
    assert (upstream.scheme, upstream.host, upstream.port, upstream.base_path, upstream.host_header) == (
        "https", "api.openai.com", 443, "", "api.openai.com")
    assert config.upstream_ca is None  # certifi's bundle
    assert config.cert_file is None and config.key_file is None and not config.tls
    assert config.db == "./soakp.db"
    assert config.token_ttl_s == 7 * 86400
    assert config.max_token_ttl_s == 365 * 86400
    assert config.cors_origins == ()
    assert config.max_body_bytes == 512 * 1024 * 1024
    assert config.connect_timeout_s == 10
    assert config.read_timeout_s == 600
    assert config.header_timeout_s == 30
    assert config.max_connections == 10000
    assert config.shutdown_grace_s == 30
    assert config.log_level == "info"


def test_letsencrypt_dir_defaults_to_etc_letsencrypt(tmp_path: Path) -> None:
    """--domain alone looks in /etc/letsencrypt/live/DOMAIN (seen in the error, as the files are absent)."""
    message = refused(["--domain", "soakp-test-nonexistent.example"])
    assert "/etc/letsencrypt/live/soakp-test-nonexistent.example/" in message


def test_config_repr_hides_secrets() -> None:
    config = load(["--old-secrets", OTHER, "--admin-user", "admin", "--admin-pass", "hunter2-is-long"])
    text = repr(config)
    assert SECRET not in text and OTHER not in text and "hunter2-is-long" not in text


# Flag over environment over default, for every option in SPEC.md's table ###############################


@dataclass
class OptionCase:
    flag: str
    env: str
    flag_value: str
    env_value: str
    read: Callable[[soakp.Config], Any]
    from_flag: Any
    from_env: Any
    partner_env: dict[str, str]
    base_env: dict[str, str]


def option_case(name: str, tmp: Path) -> OptionCase:
    """One row of SPEC.md's configuration table, with two distinct values and how to read the result."""
    def files(*names: str) -> list[str]:
        out = []
        for n in names:
            (tmp / n).write_text(f"{n}\n")
            out.append(str(tmp / n))
        return out

    if name == "listen":
        return OptionCase("--listen", "SOAKP_LISTEN", "[::1]:9443", "0.0.0.0:8080",
                          lambda c: (c.listen_host, c.listen_port), ("::1", 9443), ("0.0.0.0", 8080), {}, BASE_ENV)
    if name == "secret":
        return OptionCase("--secret", "SOAKP_SECRET", F32, E32, lambda c: c.secret, F32, E32,
                          {}, {})
    if name == "secret-file":
        (tmp / "flag-secret").write_text(F32 + "F\n")
        (tmp / "env-secret").write_text(E32 + "E\n")
        return OptionCase("--secret-file", "SOAKP_SECRET_FILE", str(tmp / "flag-secret"), str(tmp / "env-secret"),
                          lambda c: c.secret, F32 + "F", E32 + "E", {}, {})
    if name == "old-secrets":
        return OptionCase("--old-secrets", "SOAKP_OLD_SECRETS", C32, f"{A32},{B32}",
                          lambda c: c.old_secrets, (C32,), (A32, B32), {}, BASE_ENV)
    if name == "admin-user":
        return OptionCase("--admin-user", "SOAKP_ADMIN_USER", "bob", "alice", lambda c: c.admin_user, "bob",
                          "alice", {"SOAKP_ADMIN_PASS": "a-long-password"}, BASE_ENV)
    if name == "admin-pass":
        return OptionCase("--admin-pass", "SOAKP_ADMIN_PASS", "flag-password", "env-password",
                          lambda c: c.admin_pass, "flag-password", "env-password", {"SOAKP_ADMIN_USER": "admin"},
                          BASE_ENV)
    if name == "upstream":
        return OptionCase("--upstream", "SOAKP_UPSTREAM", "https://proxy.example/base", "http://127.0.0.1:8080",
                          lambda c: (c.upstream.scheme, c.upstream.host, c.upstream.port, c.upstream.base_path),
                          ("https", "proxy.example", 443, "/base"), ("http", "127.0.0.1", 8080, ""), {}, BASE_ENV)
    if name == "upstream-ca":
        flag_ca, env_ca = files("flag-ca.pem", "env-ca.pem")
        return OptionCase("--upstream-ca", "SOAKP_UPSTREAM_CA", flag_ca, env_ca, lambda c: c.upstream_ca,
                          flag_ca, env_ca, {}, BASE_ENV)
    if name == "cert-dir":
        flag_dir, env_dir = tls_pair(tmp / "flag-live"), tls_pair(tmp / "env-live")
        return OptionCase("--cert-dir", "SOAKP_CERT_DIR", str(flag_dir), str(env_dir),
                          lambda c: (c.cert_file, c.key_file),
                          (str(flag_dir / "fullchain.pem"), str(flag_dir / "privkey.pem")),
                          (str(env_dir / "fullchain.pem"), str(env_dir / "privkey.pem")), {}, BASE_ENV)
    if name == "domain":
        tls_pair(tmp / "le" / "live" / "flag.example")
        tls_pair(tmp / "le" / "live" / "env.example")
        return OptionCase("--domain", "SOAKP_DOMAIN", "flag.example", "env.example", lambda c: c.cert_file,
                          str(tmp / "le" / "live" / "flag.example" / "fullchain.pem"),
                          str(tmp / "le" / "live" / "env.example" / "fullchain.pem"),
                          {"SOAKP_LETSENCRYPT_DIR": str(tmp / "le")}, BASE_ENV)
    if name == "letsencrypt-dir":
        tls_pair(tmp / "flag-le" / "live" / "example.com")
        tls_pair(tmp / "env-le" / "live" / "example.com")
        return OptionCase("--letsencrypt-dir", "SOAKP_LETSENCRYPT_DIR", str(tmp / "flag-le"), str(tmp / "env-le"),
                          lambda c: c.cert_file, str(tmp / "flag-le" / "live" / "example.com" / "fullchain.pem"),
                          str(tmp / "env-le" / "live" / "example.com" / "fullchain.pem"),
                          {"SOAKP_DOMAIN": "example.com"}, BASE_ENV)
    if name == "cert":
        flag_cert, env_cert, key = files("flag-cert.pem", "env-cert.pem", "key.pem")
        return OptionCase("--cert", "SOAKP_CERT", flag_cert, env_cert, lambda c: (c.cert_file, c.key_file),
                          (flag_cert, key), (env_cert, key), {"SOAKP_TLS_KEY": key}, BASE_ENV)
    if name == "tls-key":
        flag_key, env_key, cert = files("flag-key.pem", "env-key.pem", "cert.pem")
        return OptionCase("--tls-key", "SOAKP_TLS_KEY", flag_key, env_key,
                          lambda c: (c.cert_file, c.key_file),
                          (cert, flag_key), (cert, env_key), {"SOAKP_CERT": cert}, BASE_ENV)
    simple: dict[str, tuple[str, str, Callable[[soakp.Config], Any], Any, Any]] = {
        "db": (":memory:", str(tmp / "env.db"), lambda c: c.db, ":memory:", str(tmp / "env.db")),
        "token-ttl": ("90s", "1h", lambda c: c.token_ttl_s, 90, 3600),
        "max-token-ttl": ("400d", "30d", lambda c: c.max_token_ttl_s, 400 * 86400, 30 * 86400),
        "cors-origins": ("*", "https://a.example, https://b.example", lambda c: c.cors_origins, ("*",),
                         ("https://a.example", "https://b.example")),
        "max-body": ("10MB", "1MiB", lambda c: c.max_body_bytes, 10_000_000, 1024 * 1024),
        "connect-timeout": ("250ms", "5s", lambda c: c.connect_timeout_s, 0.25, 5),
        "read-timeout": ("45", "2m", lambda c: c.read_timeout_s, 45, 120),
        "header-timeout": ("1m", "15s", lambda c: c.header_timeout_s, 60, 15),
        "max-connections": ("7", "50", lambda c: c.max_connections, 7, 50),
        "shutdown-grace": ("1m", "0s", lambda c: c.shutdown_grace_s, 60, 0),
        "log-level": ("warning", "debug", lambda c: c.log_level, "warning", "debug"),
    }
    flag_value, env_value, read, from_flag, from_env = simple[name]
    return OptionCase(f"--{name}", f"SOAKP_{name.upper().replace('-', '_')}", flag_value, env_value, read,
                      from_flag, from_env, {}, BASE_ENV)


SPEC_OPTIONS = [
    "listen", "secret", "secret-file", "old-secrets", "admin-user", "admin-pass", "upstream", "upstream-ca",
    "cert-dir", "domain", "letsencrypt-dir", "cert", "tls-key", "db", "token-ttl", "max-token-ttl",
    "cors-origins",
    "max-body", "connect-timeout", "read-timeout", "header-timeout", "max-connections", "shutdown-grace",
    "log-level",
]


@pytest.mark.parametrize("name", SPEC_OPTIONS)
def test_environment_variable_beats_the_default(name: str, tmp_path: Path) -> None:
    case = option_case(name, tmp_path)
    config = load([], {**case.base_env, **case.partner_env, case.env: case.env_value})
    assert case.read(config) == case.from_env


@pytest.mark.parametrize("name", SPEC_OPTIONS)
def test_flag_beats_the_environment_variable(name: str, tmp_path: Path) -> None:
    case = option_case(name, tmp_path)
    config = load([case.flag, case.flag_value], {**case.base_env, **case.partner_env, case.env: case.env_value})
    assert case.read(config) == case.from_flag


@pytest.mark.parametrize("name", SPEC_OPTIONS)
def test_flag_works_without_the_environment_variable(name: str, tmp_path: Path) -> None:
    case = option_case(name, tmp_path)
    config = load([case.flag, case.flag_value], {**case.base_env, **case.partner_env})
    assert case.read(config) == case.from_flag


def test_option_names_match_the_spec_table() -> None:
    """Every option in SPEC.md has a flag and a SOAKP_* variable of the same name."""
    for name in SPEC_OPTIONS:
        assert name in soakp.OPTIONS
        assert soakp.OPTIONS[name][0] == f"SOAKP_{name.upper().replace('-', '_')}"


def test_explicit_serve_command_takes_the_same_options() -> None:
    config = load(["serve", "--listen", "127.0.0.1:0", "--max-body", "1k"])
    assert config.listen_port == 0 and config.max_body_bytes == 1024


def test_mint_takes_secret_db_and_ttls_from_the_environment() -> None:
    """SPEC.md, Commands: every command takes --secret/--db and their variables like serve."""
    env = {"SOAKP_SECRET": OTHER, "SOAKP_DB": ":memory:", "SOAKP_TOKEN_TTL": "1h", "SOAKP_MAX_TOKEN_TTL": "2h"}
    config, args = soakp.load_config(["mint", "--key", "sk-test"], env)
    assert (config.secret, config.db, config.token_ttl_s, config.max_token_ttl_s) == (OTHER, ":memory:", 3600, 7200)
    assert args.command == "mint"


# The secret ##########################################################################################


def test_secret_file_flag_strips_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    assert load(["--secret-file", str(tmp_path / "secret")], {}).secret == SECRET


def test_secret_file_variable_strips_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(OTHER + "\r\n")
    assert load([], {"SOAKP_SECRET_FILE": str(tmp_path / "secret")}).secret == OTHER


def test_secret_flag_beats_the_secret_file_variable(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(OTHER + "\n")
    assert load(["--secret", SECRET], {"SOAKP_SECRET_FILE": str(tmp_path / "secret")}).secret == SECRET


def test_secret_file_flag_beats_the_secret_variable(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(OTHER + "\n")
    assert load(["--secret-file", str(tmp_path / "secret")], {"SOAKP_SECRET": SECRET}).secret == OTHER


def test_a_32_character_secret_is_enough() -> None:
    assert load(["--secret", X32], {}).secret == X32


@pytest.mark.parametrize("argv, environ", [
    (["--secret", "x" * 31], {}),
    ([], {"SOAKP_SECRET": "x" * 31}),
    ([], {}),
    ([], {"SOAKP_SECRET": ""}),
    (["--secret", SECRET, "--secret-file", "/dev/null"], {}),
    ([], {"SOAKP_SECRET": SECRET, "SOAKP_SECRET_FILE": "/dev/null"}),
    (["--secret-file", "/nonexistent/soakp-secret"], {}),
    (["--old-secrets", "short"], BASE_ENV),
    (["--old-secrets", f"{OTHER},short"], BASE_ENV),
])
def test_bad_secrets_are_config_errors(argv: list[str], environ: dict[str, str]) -> None:
    message = refused(argv, environ)
    assert "x" * 31 not in message


def test_a_short_secret_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("too short\n")
    refused(["--secret-file", str(tmp_path / "secret")], {})


# Bad values ##########################################################################################


@pytest.mark.parametrize("argv", [
    ["--listen", "localhost"], ["--listen", "127.0.0.1:"], ["--listen", ":3033"], ["--listen", "127.0.0.1:99999"],
    ["--listen", "127.0.0.1:abc"], ["--listen", "host name:80"], ["--listen", "127.0.0.1:-1"], ["--listen", ""],
    ["--listen", "[::1]"], ["--listen", "http://127.0.0.1:3033"],
])
def test_a_malformed_listen_address_is_a_config_error(argv: list[str]) -> None:
    refused(argv)


@pytest.mark.parametrize("argv", [
    ["--connect-timeout", "10x"], ["--connect-timeout", "0"], ["--connect-timeout", "-1s"], ["--read-timeout", ""],
    ["--read-timeout", "forever"], ["--header-timeout", "0s"], ["--shutdown-grace", "soon"],
    ["--token-ttl", "0"], ["--token-ttl", "1.5"], ["--token-ttl", "7 days"], ["--max-token-ttl", "abc"],
    ["--token-ttl", "400d"],  # longer than the default 365d cap
    ["--max-token-ttl", "1h"],  # shorter than the default 7d token ttl
])
def test_a_bad_duration_is_a_config_error(argv: list[str]) -> None:
    refused(argv)


@pytest.mark.parametrize("size", ["12XB", "-1", "1.5MiB", "", "MiB", "ten", "1 TiB"])
def test_a_bad_size_is_a_config_error(size: str) -> None:
    refused(["--max-body", size])


@pytest.mark.parametrize("argv", [
    ["--max-connections", "0"], ["--max-connections", "ten"], ["--max-connections", "-5"],
    ["--log-level", "verbose"], ["--log-level", "INFO2"],
    ["--upstream", "ftp://api.example"], ["--upstream", "https://user:pw@api.example"],
    ["--upstream", "https://api.example/?x=1"], ["--upstream", "not a url"], ["--upstream", "https://"],
    ["--upstream-ca", "/nonexistent/ca.pem"],
    ["--admin-user", "admin"], ["--admin-pass", "long-enough-pass"], ["--admin-user", "a", "--admin-pass", "short"],
])
def test_other_bad_values_are_config_errors(argv: list[str]) -> None:
    refused(argv)


@pytest.mark.parametrize("argv", [["--log-level", ""], ["--db", ""], ["--upstream", ""], ["--listen", ""]])
def test_an_explicitly_empty_flag_value_is_refused_not_silently_defaulted(argv: list[str]) -> None:
    """`--log-level ""` is a mistake (an unset shell variable, say): it must not quietly mean the default."""
    refused(argv)


def test_cert_without_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    refused(["--cert", str(tmp_path / "cert.pem")])


def test_key_without_cert_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    refused(["--key", str(tmp_path / "key.pem")])


def test_an_unreadable_cert_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    message = refused(["--cert", str(tmp_path / "missing.pem"), "--key", str(tmp_path / "key.pem")])
    assert "missing.pem" in message


def test_a_cert_dir_without_the_pair_is_a_config_error(tmp_path: Path) -> None:
    refused(["--cert-dir", str(tmp_path)])


def test_two_ways_of_naming_the_certificate_at_once_are_a_config_error(tmp_path: Path) -> None:
    live = tls_pair(tmp_path / "le" / "live" / "example.com")
    cert, key = str(live / "fullchain.pem"), str(live / "privkey.pem")
    refused(["--cert-dir", str(live), "--cert", cert, "--key", key])
    refused(["--domain", "example.com", "--letsencrypt-dir", str(tmp_path / "le"), "--cert-dir", str(live)])
    refused(["--domain", "example.com", "--letsencrypt-dir", str(tmp_path / "le"), "--cert", cert, "--key", key])
    refused(["--cert-dir", str(live)], {**BASE_ENV, "SOAKP_CERT": cert, "SOAKP_TLS_KEY": key})


@pytest.mark.parametrize("domain", ["../etc", "example.com/../x", "exa mple.com", "a..b"])
def test_a_domain_that_is_not_a_name_is_a_config_error(tmp_path: Path, domain: str) -> None:
    refused(["--domain", domain, "--letsencrypt-dir", str(tmp_path)])


@pytest.mark.parametrize("argv", [["--frobnicate"], ["--frobnicate", "1"], ["serve", "--nope"], ["--listen"],
                                  ["mint"], ["mint", "--key", "sk-x", "--listen", "127.0.0.1:1"]])
def test_an_unknown_or_incomplete_flag_is_a_config_error(argv: list[str]) -> None:
    refused(argv)


def test_domain_and_letsencrypt_dir_resolve_to_certbots_live_directory(tmp_path: Path) -> None:
    live = tls_pair(tmp_path / "le" / "live" / "example.com")
    config = load(["--domain", "example.com", "--letsencrypt-dir", str(tmp_path / "le")])
    assert config.cert_file == str(live / "fullchain.pem")
    assert config.key_file == str(live / "privkey.pem")
    assert config.tls


def test_cert_dir_resolves_to_fullchain_and_privkey(tmp_path: Path) -> None:
    live = tls_pair(tmp_path / "live")
    config = load(["--cert-dir", str(live)])
    assert (config.cert_file, config.key_file) == (str(live / "fullchain.pem"), str(live / "privkey.pem"))


# The parsers #########################################################################################


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("30", 30), ("250ms", 0.25), ("1.5s", 1.5),
    ("0", 0), (" 10s ", 10), ("10S", 10), ("600s", 600),
])
def test_parse_duration_s(text: str, seconds: float) -> None:
    assert soakp.parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "abc", "-5s", "5x", "5 s s", "1e3", "5w", "10 minutes", "1h30m"])
def test_parse_duration_s_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        soakp.parse_duration_s(text)


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * 1024**2), ("10MB", 10_000_000), ("64k", 65536), ("64KiB", 65536), ("64kB", 64000),
    ("100", 100), ("100b", 100), ("1GiB", 1024**3), ("2gb", 2_000_000_000), ("0", 0),
])
def test_parse_size_bytes(text: str, size: int) -> None:
    assert soakp.parse_size_bytes(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "1.5MiB", "-1", "12XB", "1 TiB", "ten"])
def test_parse_size_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        soakp.parse_size_bytes(text)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:3033", ("127.0.0.1", 3033)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("localhost:0", ("localhost", 0)),
    ("[::1]:8443", ("::1", 8443)), ("[::]:443", ("::", 443)), ("proxy.internal:65535", ("proxy.internal", 65535)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert soakp.parse_listen(text) == expected


@pytest.mark.parametrize("text", [
    "", "localhost", "127.0.0.1:", ":3033", "127.0.0.1:65536", "127.0.0.1:x", "host name:80", "[::1]",
    "127.0.0.1:+80", "a/b:80", "[]:80",
])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        soakp.parse_listen(text)


@pytest.mark.parametrize("text, expected", [
    ("https://api.openai.com", ("https", "api.openai.com", 443, "", "api.openai.com")),
    ("https://api.openai.com/", ("https", "api.openai.com", 443, "", "api.openai.com")),
    ("https://api.openai.com:443", ("https", "api.openai.com", 443, "", "api.openai.com")),
    ("https://gw.example:8443/prefix/", ("https", "gw.example", 8443, "/prefix", "gw.example:8443")),
    ("https://gw.example/a/b", ("https", "gw.example", 443, "/a/b", "gw.example")),
    ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080, "", "127.0.0.1:8080")),
    ("http://local.test:80/", ("http", "local.test", 80, "", "local.test")),
    ("http://local.test:443", ("http", "local.test", 443, "", "local.test:443")),
    ("https://[::1]:8443", ("https", "::1", 8443, "", "[::1]:8443")),
    ("https://[::1]", ("https", "::1", 443, "", "[::1]")),
])
def test_parse_upstream(text: str, expected: tuple[str, str, int, str, str]) -> None:
    t = soakp.parse_upstream(text)
    assert (t.scheme, t.host, t.port, t.base_path, t.host_header) == expected
    assert t.tls == (t.scheme == "https")


@pytest.mark.parametrize("text", [
    "ftp://api.example", "api.openai.com", "//api.openai.com", "https://", "https://user@api.example",
    "https://user:pw@api.example", "https://api.example?x=1", "https://api.example/v1?x=1",
    "https://api.example#frag", "https://api.example:99999", "https://api.example:port", "file:///etc/passwd",
])
def test_parse_upstream_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        soakp.parse_upstream(text)


# main() ##############################################################################################


@pytest.mark.parametrize("argv, environ", [
    (["--listen", "nonsense"], BASE_ENV),
    (["--secret", "too-short-secret"], {}),
    ([], {}),
    (["--max-body", "12XB"], BASE_ENV),
    (["--read-timeout", "soon"], BASE_ENV),
    (["--frobnicate"], BASE_ENV),
    (["--cert", "/nonexistent/cert.pem", "--key", "/nonexistent/key.pem"], BASE_ENV),
    (["--cert", "/nonexistent/cert.pem"], BASE_ENV),
    (["--upstream", "ftp://x"], BASE_ENV),
    (["mint"], BASE_ENV),
    (["mint", "--key", "sk-x"], {}),
    (["selfsigned"], {}),
])
def test_main_bad_value_exits_2_with_one_stderr_line_and_no_traceback(
        argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert soakp.main(argv, environ=environ) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.endswith("\n")
    assert "Traceback" not in err
    assert "too-short-secret" not in err


def test_main_version_prints_soakp_and_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's version action exits through SystemExit(0); main() may also just return 0."""
    try:
        code = soakp.main(["--version"], environ={})
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    out, err = capsys.readouterr()
    assert out.strip() == f"soakp {soakp.__version__}"
    assert err == ""


@pytest.mark.parametrize("secret", ["x" * 32, "s" * 64, "ab" * 20, "abcdefgh" * 5, "0123456789abcdef" * 2 + "0"])
def test_a_weak_master_secret_is_refused_with_a_way_to_make_a_good_one(secret: str) -> None:
    """Issue 11 item 8: a secret of few distinct characters, or one short pattern repeated, is refused at
    start however long it is, and the message says how to make a good one (never repeating the secret)."""
    with pytest.raises(soakp.ConfigError) as info:
        load(["--secret", secret], {})
    message = str(info.value)
    assert "too easy to guess" in message and "secrets.token_urlsafe" in message and secret not in message


@pytest.mark.parametrize("secret", ["0f3a9c1e7b2d4a6f8e0c2b4d6f8a1c3e", "correct horse battery staple, 32+ chars long"])
def test_random_and_passphrase_secrets_are_accepted(secret: str) -> None:
    assert load(["--secret", secret], {}).secret == secret
