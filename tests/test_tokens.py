"""Tokens, pure: derive_keys, seal_key/open_key, mint_token/verify_token, parse_grant, TokenCache.

Every clock value, jti and nonce is an argument, so no test here reads the time or draws randomness
through soakp. Hand-built tokens use only the standard library and `cryptography`, never soakp's
own encoder, so that what they prove does not depend on the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import soakp

SECRET = "correct horse battery staple, 32+ chars long"
OTHER_SECRET = "an entirely different master secret, also long"
KEY = "sk-test-4f9a1c2b7e8d0a1b2c3d4e5f60718293"
NOW = 1_700_000_000
JTI = "AAECAwQFBgcICQoLDA0ODw"  # base64url of 16 bytes, as new_token() makes it
NONCE = bytes(range(12))
DAY_S = 86400
YEAR_S = 365 * DAY_S


# Helpers: independent JWT and base64url code ###########################################################


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hand_token(header: dict[str, Any], claims: dict[str, Any], signing_key: bytes | None,
               digest: str = "sha256") -> str:
    """A JWT built by hand: signed with HMAC-`digest` under `signing_key`, or unsigned when it is None."""
    signing_input = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())).encode()
    signature = b"" if signing_key is None else hmac.new(signing_key, signing_input, digest).digest()
    return signing_input.decode() + "." + b64url(signature)


def good_claims(keys: soakp.SecretKeys, **changes: Any) -> dict[str, Any]:
    """A complete, valid claim set sealed for `keys`, with `changes` applied (None removes a claim)."""
    claims: dict[str, Any] = {
        "iss": "soakp", "aud": "openai", "sub": "default", "iat": NOW, "exp": NOW + 3600, "jti": JTI,
        "ek": soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE),
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def hs256_header(kid: str) -> dict[str, Any]:
    return {"alg": "HS256", "typ": "JWT", "kid": kid}


def grant(**fields: Any) -> soakp.Grant:
    return soakp.parse_grant({"key": KEY, **fields}, 7 * DAY_S, YEAR_S)


def mint(keys: soakp.SecretKeys, **fields: Any) -> str:
    return soakp.mint_token(keys, grant(**fields), NOW, JTI, NONCE).token


@pytest.fixture(scope="module")
def keys() -> soakp.SecretKeys:
    return soakp.derive_keys(SECRET)


@pytest.fixture(scope="module")
def keyring() -> dict[str, soakp.SecretKeys]:
    return soakp.build_keyring(SECRET)


def assert_refused(token: str, keyring: dict[str, soakp.SecretKeys], now: float = NOW) -> soakp.ApiError:
    """verify_token must raise ApiError(401) whose message repeats neither the token nor the key."""
    with pytest.raises(soakp.ApiError) as info:
        soakp.verify_token(token, keyring, now)
    exc = info.value
    assert exc.status == 401
    for text in (exc.message, str(exc)):
        if token:
            assert token not in text
        assert KEY not in text
    return exc


# derive_keys ##########################################################################################


def test_derive_keys_matches_an_independent_hkdf_sha256_without_salt() -> None:
    """Signing and sealing keys are HKDF-SHA256(secret, salt=None, 32 bytes) with the SPEC's info labels."""
    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(SECRET.encode("utf-8"))

    keys = soakp.derive_keys(SECRET)
    assert keys.signing_key == hkdf(b"soakp/jwt-hs256")
    assert keys.sealing_key == hkdf(b"soakp/key-aes256gcm")
    assert len(keys.signing_key) == len(keys.sealing_key) == 32
    assert keys.signing_key != keys.sealing_key


def test_kid_is_first_16_hex_digits_of_sha256_of_the_signing_key() -> None:
    keys = soakp.derive_keys(SECRET)
    assert keys.kid == hashlib.sha256(keys.signing_key).hexdigest()[:16]
    assert len(keys.kid) == 16


def test_derive_keys_is_deterministic_and_differs_per_secret() -> None:
    assert soakp.derive_keys(SECRET) == soakp.derive_keys(SECRET)
    other = soakp.derive_keys(OTHER_SECRET)
    mine = soakp.derive_keys(SECRET)
    assert other.kid != mine.kid
    assert other.signing_key != mine.signing_key
    assert other.sealing_key != mine.sealing_key


def test_secret_keys_repr_hides_the_derived_keys(keys: soakp.SecretKeys) -> None:
    text = repr(keys)
    assert keys.signing_key.hex() not in text and repr(keys.signing_key) not in text
    assert repr(keys.sealing_key) not in text


# seal_key / open_key ##################################################################################


def test_seal_then_open_round_trips(keys: soakp.SecretKeys) -> None:
    ek = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    assert soakp.open_key(ek, JTI, keys.sealing_key) == KEY


def test_ek_format_is_unpadded_base64url_of_nonce_ciphertext_tag(keys: soakp.SecretKeys) -> None:
    """Decoded independently: 12-byte nonce ‖ ciphertext ‖ 16-byte tag, AES-256-GCM, AAD = the jti's ASCII."""
    ek = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    assert "=" not in ek and "+" not in ek and "/" not in ek
    raw = unb64url(ek)
    assert b64url(raw) == ek  # canonical unpadded encoding
    assert len(raw) == 12 + len(KEY) + 16
    assert raw[:12] == NONCE
    plain = AESGCM(keys.sealing_key).decrypt(raw[:12], raw[12:], JTI.encode("ascii"))
    assert plain == KEY.encode("ascii")


def test_ek_does_not_contain_the_key_in_plaintext(keys: soakp.SecretKeys) -> None:
    ek = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    assert KEY not in ek
    assert KEY.encode() not in unb64url(ek)


def test_open_key_with_another_jti_fails_because_the_jti_is_associated_data(keys: soakp.SecretKeys) -> None:
    ek = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    with pytest.raises(ValueError):
        soakp.open_key(ek, "another-jti", keys.sealing_key)


def test_open_key_with_another_secrets_sealing_key_fails(keys: soakp.SecretKeys) -> None:
    ek = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    with pytest.raises(ValueError):
        soakp.open_key(ek, JTI, soakp.derive_keys(OTHER_SECRET).sealing_key)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_open_key_refuses_a_tampered_ek(keys: soakp.SecretKeys, where: str) -> None:
    raw = bytearray(unb64url(soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)))
    index = {"nonce": 0, "ciphertext": 12, "tag": len(raw) - 1}[where]
    raw[index] ^= 0x01
    with pytest.raises(ValueError):
        soakp.open_key(b64url(bytes(raw)), JTI, keys.sealing_key)


@pytest.mark.parametrize("ek", ["", "AAAA", "not base64!", "A" * 5, b64url(bytes(28)), "=" * 8])
def test_open_key_refuses_garbage_with_value_error(keys: soakp.SecretKeys, ek: str) -> None:
    with pytest.raises(ValueError):
        soakp.open_key(ek, JTI, keys.sealing_key)


def test_a_fresh_nonce_gives_a_different_ek(keys: soakp.SecretKeys) -> None:
    first = soakp.seal_key(KEY, JTI, keys.sealing_key, NONCE)
    second = soakp.seal_key(KEY, JTI, keys.sealing_key, bytes(12))
    assert first != second
    assert soakp.open_key(second, JTI, keys.sealing_key) == KEY


# mint_token / verify_token ############################################################################


def test_mint_then_verify_round_trips(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    minted = soakp.mint_token(keys, grant(ttl=3600, sub="alice"), NOW, JTI, NONCE)
    assert minted.jti == JTI
    assert minted.expires_at == NOW + 3600
    claims = soakp.verify_token(minted.token, keyring, NOW + 10)
    assert claims.key == KEY
    assert claims.jti == JTI
    assert claims.kid == keys.kid
    assert claims.sub == "alice"
    assert claims.iat == NOW
    assert claims.exp == NOW + 3600
    assert claims.org is None and claims.project is None


def test_mint_is_deterministic_given_now_jti_and_nonce(keys: soakp.SecretKeys) -> None:
    assert mint(keys) == mint(keys)


def test_minted_token_holds_no_plaintext_key(keys: soakp.SecretKeys) -> None:
    token = mint(keys, org="org-1", project="proj-1")
    assert KEY not in token
    header_b64, payload_b64, signature_b64 = token.split(".")
    for part in (header_b64, payload_b64, signature_b64):
        assert KEY.encode() not in unb64url(part)
    assert KEY not in json.dumps(json.loads(unb64url(payload_b64)))


def test_minted_header_is_hs256_with_the_secrets_kid(keys: soakp.SecretKeys) -> None:
    header = json.loads(unb64url(mint(keys).split(".")[0]))
    assert header["alg"] == "HS256"
    assert header["kid"] == keys.kid


def test_minted_claims_are_exactly_the_specs_without_org_or_project(keys: soakp.SecretKeys) -> None:
    claims = json.loads(unb64url(mint(keys).split(".")[1]))
    assert set(claims) == {"iss", "aud", "sub", "iat", "exp", "jti", "cid", "rexp", "ek"}
    assert claims["iss"] == "soakp"
    assert claims["aud"] == "openai"
    assert claims["sub"] == "default"
    assert claims["iat"] == NOW
    assert claims["exp"] == NOW + 7 * DAY_S
    assert claims["jti"] == JTI
    assert soakp.open_key(claims["ek"], JTI, keys.sealing_key) == KEY


def test_minted_claims_carry_org_and_project_when_given(keys: soakp.SecretKeys,
                                                        keyring: dict[str, soakp.SecretKeys]) -> None:
    token = mint(keys, org="org-abc", project="proj_123")
    claims = json.loads(unb64url(token.split(".")[1]))
    assert claims["org"] == "org-abc"
    assert claims["project"] == "proj_123"
    verified = soakp.verify_token(token, keyring, NOW)
    assert (verified.org, verified.project) == ("org-abc", "proj_123")


def test_minted_claims_carry_only_org_when_only_org_given(keys: soakp.SecretKeys) -> None:
    claims = json.loads(unb64url(mint(keys, org="org-abc").split(".")[1]))
    assert claims["org"] == "org-abc"
    assert "project" not in claims


def test_minted_signature_is_hmac_sha256_under_the_signing_key(keys: soakp.SecretKeys) -> None:
    """Checked independently of pyjwt: the third part is HMAC-SHA256(signing_key, header.payload)."""
    token = mint(keys)
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(keys.signing_key, signing_input.encode(), "sha256").digest()
    assert hmac.compare_digest(unb64url(signature), expected)


def test_a_hand_built_hs256_token_verifies(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    """The helpers below build valid tokens: so each refusal test changes only the one thing it names."""
    token = hand_token(hs256_header(keys.kid), good_claims(keys), keys.signing_key)
    assert soakp.verify_token(token, keyring, NOW).key == KEY


# verify_token refusals ################################################################################


def test_verify_refuses_alg_none_with_the_right_kid(keys: soakp.SecretKeys,
                                                    keyring: dict[str, soakp.SecretKeys]) -> None:
    for alg in ("none", "None", "NONE"):
        token = hand_token({"alg": alg, "typ": "JWT", "kid": keys.kid}, good_claims(keys), None)
        assert token.endswith(".")
        assert_refused(token, keyring)


def test_verify_refuses_alg_none_even_with_a_valid_hs256_signature_attached(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    token = hand_token({"alg": "none", "kid": keys.kid}, good_claims(keys), keys.signing_key)
    assert_refused(token, keyring)


@pytest.mark.parametrize("alg, digest", [("HS512", "sha512"), ("HS384", "sha384")])
def test_verify_refuses_other_hmac_algs_signed_with_the_right_key_and_kid(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys], alg: str, digest: str) -> None:
    token = hand_token({"alg": alg, "typ": "JWT", "kid": keys.kid}, good_claims(keys), keys.signing_key, digest)
    assert_refused(token, keyring)


def test_verify_refuses_hs256_signed_token_whose_header_claims_another_alg(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    token = hand_token({"alg": "RS256", "kid": keys.kid}, good_claims(keys), keys.signing_key)
    assert_refused(token, keyring)


def test_verify_refuses_a_tampered_signature(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    token = mint(keys)
    signing_input, _, signature = token.rpartition(".")
    for index in (0, 15, 31):
        raw = bytearray(unb64url(signature))
        raw[index] ^= 0x80
        assert_refused(signing_input + "." + b64url(bytes(raw)), keyring)
    assert_refused(signing_input + ".", keyring)


@pytest.mark.parametrize("change", [
    {"sub": "mallory"}, {"exp": NOW + 10 * YEAR_S}, {"jti": "another-jti"}, {"iat": NOW - 1},
])
def test_verify_refuses_a_tampered_payload(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys],
                                           change: dict[str, Any]) -> None:
    """The payload is replaced but the original signature kept."""
    header_b64, _, signature = mint(keys, ttl=3600).split(".")
    payload = good_claims(keys, **change)
    tampered = header_b64 + "." + b64url(json.dumps(payload).encode()) + "." + signature
    assert_refused(tampered, keyring)


def test_verify_refuses_a_token_from_another_secret(keyring: dict[str, soakp.SecretKeys]) -> None:
    """Its kid is unknown here."""
    exc = assert_refused(mint(soakp.derive_keys(OTHER_SECRET)), keyring)
    assert exc.code == "invalid_api_key"


def test_verify_refuses_another_secrets_token_relabelled_with_our_kid(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    other = soakp.derive_keys(OTHER_SECRET)
    token = hand_token(hs256_header(keys.kid), good_claims(other), other.signing_key)
    assert_refused(token, keyring)


def test_verify_refuses_a_token_signed_by_us_but_sealed_by_another_secret(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys]) -> None:
    """A valid signature does not make a foreign ek open: the sealing key is checked too."""
    other = soakp.derive_keys(OTHER_SECRET)
    token = hand_token(hs256_header(keys.kid), good_claims(other), keys.signing_key)
    assert_refused(token, keyring)


def test_verify_refuses_an_ek_copied_from_another_token(keys: soakp.SecretKeys,
                                                        keyring: dict[str, soakp.SecretKeys]) -> None:
    """The ek is bound to its jti: moved under a new jti (even correctly signed) it does not open."""
    token = hand_token(hs256_header(keys.kid), good_claims(keys, jti="a-different-jti"), keys.signing_key)
    assert_refused(token, keyring)


@pytest.mark.parametrize("kid", [None, "", "0000000000000000", 12345, ["x"], {"a": 1}])
def test_verify_refuses_a_missing_or_odd_kid(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys],
                                             kid: Any) -> None:
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    assert_refused(hand_token(header, good_claims(keys), keys.signing_key), keyring)


def test_exp_equal_to_now_is_expired_without_leeway(keys: soakp.SecretKeys,
                                                    keyring: dict[str, soakp.SecretKeys]) -> None:
    token = mint(keys, ttl=60)
    assert soakp.verify_token(token, keyring, NOW + 59).exp == NOW + 60
    exc = assert_refused(token, keyring, now=NOW + 60)
    assert "expired" in exc.message.lower()
    assert_refused(token, keyring, now=NOW + 61)
    assert_refused(token, keyring, now=NOW + 59.999 + 0.002)


def test_exp_one_second_after_now_is_still_valid(keys: soakp.SecretKeys,
                                                 keyring: dict[str, soakp.SecretKeys]) -> None:
    token = hand_token(hs256_header(keys.kid), good_claims(keys, exp=NOW + 1), keys.signing_key)
    assert soakp.verify_token(token, keyring, NOW).exp == NOW + 1
    assert_refused(token, keyring, now=NOW + 1)


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "iat", "exp", "jti", "ek"])
def test_verify_refuses_a_token_missing_a_claim(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys],
                                                claim: str) -> None:
    token = hand_token(hs256_header(keys.kid), good_claims(keys, **{claim: None}), keys.signing_key)
    assert_refused(token, keyring)


@pytest.mark.parametrize("change", [
    {"aud": "anthropic"}, {"aud": ""}, {"aud": ["someone-else"]},
    {"iss": "not-soakp"}, {"iss": ""}, {"iss": "SOAKP"},
])
def test_verify_refuses_wrong_audience_or_issuer(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys],
                                                 change: dict[str, Any]) -> None:
    token = hand_token(hs256_header(keys.kid), good_claims(keys, **change), keys.signing_key)
    assert_refused(token, keyring)


@pytest.mark.parametrize("change", [
    {"exp": str(NOW + 3600)}, {"exp": float(NOW + 3600) + 0.5}, {"exp": True}, {"iat": "yesterday"},
    {"jti": 12345}, {"jti": "jtí-non-ascii"}, {"sub": 7}, {"ek": 0}, {"org": "bad\r\nX-Injected: 1"},
    {"project": ["p"]},
])
def test_verify_refuses_claims_of_the_wrong_type(keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys],
                                                 change: dict[str, Any]) -> None:
    token = hand_token(hs256_header(keys.kid), good_claims(keys, **change), keys.signing_key)
    assert_refused(token, keyring)


@pytest.mark.parametrize("garbage", [
    "", "x", "a.b", "a.b.c", "...", "Bearer abc", "eyJ.eyJ.sig", "é.é.é", "\x00\x01\x02",
    b64url(b"[]") + "." + b64url(b"{}") + ".", b64url(b'{"alg":"HS256"') + ".e30.",
    b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".abc",
])
def test_verify_refuses_garbage_strings(keyring: dict[str, soakp.SecretKeys], garbage: str) -> None:
    assert_refused(garbage, keyring)


def test_verify_refuses_an_over_long_but_validly_signed_token(keys: soakp.SecretKeys,
                                                              keyring: dict[str, soakp.SecretKeys]) -> None:
    token = hand_token(hs256_header(keys.kid), good_claims(keys, pad="x" * 9000), keys.signing_key)
    assert len(token) > 8192
    assert_refused(token, keyring)


def test_verify_refuses_an_over_long_garbage_token_quickly(keyring: dict[str, soakp.SecretKeys]) -> None:
    assert_refused("a" * 1_000_000, keyring)


PERMISSIONS = {"paths": ["/v1/chat/*", "/v1/models"], "models": ["gpt-4o-mini"], "rpm": 10,
               "origins": ["https://app.example"], "max_tokens_total": 1000}


def test_permission_claims_round_trip_through_mint_and_verify(keys: soakp.SecretKeys,
                                                              keyring: dict[str, soakp.SecretKeys]) -> None:
    """SPEC.md, Tokens: the optional permission claims travel in the token and come back verified."""
    token = mint(keys, **PERMISSIONS)
    payload = json.loads(unb64url(token.split(".")[1]))
    for name, value in PERMISSIONS.items():
        assert payload[name] == value
    permissions = soakp.verify_token(token, keyring, NOW).permissions
    assert permissions.paths == ("/v1/chat/*", "/v1/models")
    assert permissions.models == ("gpt-4o-mini",)
    assert permissions.rpm == 10
    assert permissions.origins == ("https://app.example",)
    assert permissions.max_tokens_total == 1000


def test_a_token_without_permission_claims_is_not_limited(keys: soakp.SecretKeys,
                                                          keyring: dict[str, soakp.SecretKeys]) -> None:
    permissions = soakp.verify_token(mint(keys), keyring, NOW).permissions
    assert (permissions.paths, permissions.models, permissions.rpm, permissions.origins,
            permissions.max_tokens_total) == (None, None, None, None, None)


@pytest.mark.parametrize("claim, value", [
    ("paths", "/v1/chat/*"), ("paths", []), ("paths", ["/etc/passwd"]), ("paths", ["/v1/../jwt/*"]),
    ("paths", [1]), ("models", "gpt-4o"), ("models", [""]), ("models", [None]), ("rpm", 0), ("rpm", -1),
    ("rpm", "10"), ("rpm", 1.5), ("rpm", True), ("origins", ["javascript:alert(1)"]), ("origins", "*"),
    ("max_tokens_total", 0), ("max_tokens_total", "1000"),
])
def test_verify_fails_closed_on_unreadable_permission_claims(
        keys: soakp.SecretKeys, keyring: dict[str, soakp.SecretKeys], claim: str, value: Any) -> None:
    """A correctly signed token whose limit cannot be read is refused, never treated as unlimited."""
    claims = good_claims(keys)
    claims[claim] = value
    token = hand_token(hs256_header(keys.kid), claims, keys.signing_key)
    assert_refused(token, keyring)


# Rotation ############################################################################################


def test_build_keyring_puts_the_current_secret_first() -> None:
    ring = soakp.build_keyring(SECRET, [OTHER_SECRET])
    assert list(ring) == [soakp.derive_keys(SECRET).kid, soakp.derive_keys(OTHER_SECRET).kid]


def test_rotation_an_old_secrets_token_still_verifies_and_kid_picks_its_key() -> None:
    old, new = soakp.derive_keys(OTHER_SECRET), soakp.derive_keys(SECRET)
    ring = soakp.build_keyring(SECRET, [OTHER_SECRET])
    old_claims = soakp.verify_token(mint(old), ring, NOW)
    new_claims = soakp.verify_token(mint(new), ring, NOW)
    assert (old_claims.kid, old_claims.key) == (old.kid, KEY)
    assert (new_claims.kid, new_claims.key) == (new.kid, KEY)


def test_rotation_a_token_from_a_dropped_secret_is_refused() -> None:
    old = soakp.derive_keys(OTHER_SECRET)
    assert_refused(mint(old), soakp.build_keyring(SECRET))


# parse_grant ##########################################################################################


def parse(fields: dict[str, Any], default_ttl_s: int = 7 * DAY_S, max_ttl_s: int = YEAR_S) -> soakp.Grant:
    return soakp.parse_grant(fields, default_ttl_s, max_ttl_s)


def assert_grant_refused(fields: dict[str, Any], max_ttl_s: int = YEAR_S) -> soakp.ApiError:
    with pytest.raises(soakp.ApiError) as info:
        parse(fields, max_ttl_s=max_ttl_s)
    assert info.value.status == 400
    return info.value


def test_parse_grant_defaults() -> None:
    g = parse({"key": KEY}, default_ttl_s=1234)
    assert (g.key, g.ttl_s, g.sub, g.org, g.project) == (KEY, 1234, "default", None, None)


def test_parse_grant_all_fields() -> None:
    g = parse({"key": KEY, "org": "org-abc", "project": "proj_1", "ttl": 60, "sub": "edge device 7"})
    assert (g.key, g.ttl_s, g.sub, g.org, g.project) == (KEY, 60, "edge device 7", "org-abc", "proj_1")


def test_parse_grant_json_nulls_mean_absent() -> None:
    g = parse({"key": KEY, "org": None, "project": None, "ttl": None, "sub": None}, default_ttl_s=99)
    assert (g.ttl_s, g.sub, g.org, g.project) == (99, "default", None, None)


def test_grant_repr_hides_the_key() -> None:
    assert KEY not in repr(parse({"key": KEY}))


@pytest.mark.parametrize("ttl, seconds", [
    (1, 1), (3600, 3600), (YEAR_S, YEAR_S), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800),
    ("3600", 3600), ("365d", YEAR_S),
])
def test_parse_grant_ttl_as_int_or_duration_string(ttl: Any, seconds: int) -> None:
    assert parse({"key": KEY, "ttl": ttl}).ttl_s == seconds


@pytest.mark.parametrize("ttl", [
    0, -1, -3600, True, False, 1.0, 90.5, "1.5", "0s", "-5s", "", "abc", "5 years", "250ms", [60], {"s": 1},
    YEAR_S + 1, "366d", 10**30,
])
def test_parse_grant_refuses_bad_ttl(ttl: Any) -> None:
    assert_grant_refused({"key": KEY, "ttl": ttl})


def test_parse_grant_ttl_over_a_configured_max_is_400() -> None:
    assert parse({"key": KEY, "ttl": "1h"}, max_ttl_s=3600).ttl_s == 3600
    assert_grant_refused({"key": KEY, "ttl": 3601}, max_ttl_s=3600)


@pytest.mark.parametrize("bad_key", [
    "", "x" * 513, "sk-secret value", "sk-secret\tvalue", "sk-secret-value\n", " sk-secret-value",
    "sk-sécret-value", "sk-secret\x00value", "sk-secret\x7fvalue", 12345, None, ["sk-secret-value"],
    {"k": "sk-secret-value"}, True,
])
def test_parse_grant_refuses_a_bad_key_without_repeating_it(bad_key: Any) -> None:
    fields = {"key": bad_key} if bad_key is not None else {}
    exc = assert_grant_refused(fields)
    if isinstance(bad_key, str) and bad_key:
        for text in (exc.message, str(exc), repr(exc)):
            assert bad_key not in text
            assert bad_key.strip() not in text


@pytest.mark.parametrize("good_key", ["x", "x" * 512, "sk-proj-AbC_123-~!@#$%^&*()", "not-an-openai-key"])
def test_parse_grant_accepts_any_1_to_512_visible_ascii_key(good_key: str) -> None:
    assert parse({"key": good_key}).key == good_key


@pytest.mark.parametrize("field", ["keys", "exp", "iss", "aud", "jti", "ek", "iat", "kid", "Key", "admin"])
def test_parse_grant_refuses_unknown_fields(field: str) -> None:
    exc = assert_grant_refused({"key": KEY, field: "x"})
    assert KEY not in exc.message


def test_parse_grant_accepts_permission_claims() -> None:
    g = parse({"key": KEY, "paths": ["/v1/chat/*", "/openai/models"], "models": ["gpt-4o", "gpt-4o"],
               "rpm": 60, "origins": ["https://App.Example:8443"], "max_tokens_total": 10000})
    assert g.permissions.paths == ("/v1/chat/*", "/v1/models")  # the /openai/ alias is mapped
    assert g.permissions.models == ("gpt-4o",)
    assert g.permissions.rpm == 60
    assert g.permissions.origins == ("https://app.example:8443",)
    assert g.permissions.max_tokens_total == 10000


@pytest.mark.parametrize("claim, value", [
    ("paths", "/v1/chat/*"), ("paths", []), ("paths", ["/jwt/generate"]), ("paths", ["/v1/../jwt/*"]),
    ("paths", ["/v1//models"]), ("paths", ["/v1/%2e%2e/x"]), ("paths", ["/v1/*/x"]), ("paths", ["*"]),
    ("paths", [7]), ("paths", ["/v1/x"] * 101), ("models", []), ("models", [""]), ("models", ["a\nb"]),
    ("models", "gpt-4o"), ("rpm", 0), ("rpm", -5), ("rpm", True), ("rpm", "60"), ("rpm", 1.5),
    ("rpm", 10**9), ("origins", ["*"]), ("origins", ["https://a.example/"]), ("origins", ["null"]),
    ("origins", ["ftp://a.example"]), ("origins", "https://a.example"), ("max_tokens_total", 0),
    ("max_tokens_total", -1), ("max_tokens_total", "100"), ("max_tokens_total", 10**13),
])
def test_parse_grant_refuses_malformed_permission_claims(claim: str, value: Any) -> None:
    exc = assert_grant_refused({"key": KEY, claim: value})
    assert KEY not in exc.message


@pytest.mark.parametrize("field", ["org", "project", "sub"])
@pytest.mark.parametrize("value", [
    "", " leading", "trailing ", "line\nbreak", "crlf\r\nX-Injected: 1", "tab\there", "nul\x00", "é",
    "x" * 257, 123, True, ["a"], {"a": "b"},
])
def test_parse_grant_refuses_bad_labels(field: str, value: Any) -> None:
    exc = assert_grant_refused({"key": KEY, field: value})
    assert KEY not in exc.message


@pytest.mark.parametrize("field", ["org", "project", "sub"])
@pytest.mark.parametrize("value", ["a", "org-AbC123", "proj_x.y", "team a", "x" * 256, "~!@#$%^&*()"])
def test_parse_grant_accepts_printable_ascii_labels(field: str, value: str) -> None:
    assert getattr(parse({"key": KEY, field: value}), field) == value


# TokenCache ###########################################################################################


def test_token_cache_second_verify_returns_the_cached_claims(keys: soakp.SecretKeys) -> None:
    """After the first verify the keyring is emptied: the second verify can only come from the cache."""
    ring = soakp.build_keyring(SECRET)
    cache = soakp.TokenCache(ring, soakp.Revocations())
    token = mint(keys, ttl=60)
    first = cache.verify(token, NOW)
    ring.clear()
    second = cache.verify(token, NOW + 1)
    assert second is first
    assert second.key == KEY


def test_token_cache_refuses_an_expired_cached_token(keys: soakp.SecretKeys) -> None:
    cache = soakp.TokenCache(soakp.build_keyring(SECRET), soakp.Revocations())
    token = mint(keys, ttl=60)
    cache.verify(token, NOW)
    for now in (NOW + 60, NOW + 61, NOW + 3600):
        with pytest.raises(soakp.ApiError) as info:
            cache.verify(token, now)
        assert info.value.status == 401
        assert token not in info.value.message


def test_token_cache_does_not_remember_refusals(keys: soakp.SecretKeys) -> None:
    """A token refused once (unknown kid) verifies once its secret is in the keyring."""
    ring: dict[str, soakp.SecretKeys] = {}
    cache = soakp.TokenCache(ring, soakp.Revocations())
    token = mint(keys)
    with pytest.raises(soakp.ApiError):
        cache.verify(token, NOW)
    ring.update(soakp.build_keyring(SECRET))
    assert cache.verify(token, NOW).key == KEY


def test_token_cache_is_bounded(keys: soakp.SecretKeys) -> None:
    cache = soakp.TokenCache(soakp.build_keyring(SECRET), soakp.Revocations(), max_entries=3)
    tokens = [soakp.mint_token(keys, grant(), NOW, f"jti-{i}", NONCE).token for i in range(6)]
    for token in tokens:
        cache.verify(token, NOW)
    assert len(cache.entries) <= 3
    for token in tokens:  # evicted ones verify again from scratch
        assert cache.verify(token, NOW).key == KEY


def test_token_cache_refuses_a_revoked_token_even_when_cached(keys: soakp.SecretKeys) -> None:
    """The shared Revocations (jti -> expiry) are consulted on every verify, cached or not."""
    revoked = soakp.Revocations()
    cache = soakp.TokenCache(soakp.build_keyring(SECRET), revoked)
    token = mint(keys)
    assert cache.verify(token, NOW).jti == JTI
    revoked.tokens[JTI] = NOW + 3600
    with pytest.raises(soakp.ApiError) as info:
        cache.verify(token, NOW)
    assert info.value.status == 401
