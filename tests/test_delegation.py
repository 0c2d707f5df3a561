"""Issue 18, delegated tokens: a token minted with `delegate: N` mints narrower, shorter-lived child tokens
through POST /jwt/delegate, without the OpenAI key or the admin credentials (SPEC.md, Delegation).

The attenuation rule is checked on the pure `delegate_grant` with hypothesis, and end to end against a
running SOAKP: the key, the hierarchy (rate, budget, revocation) and the refusals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import soakp
from conftest import basic_auth, error_of
from conftest import token_claims as claims_of
from usage_upstream import chat_completion, compact

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpProcess
    from fake_upstream import FakeUpstream, RawResponse, RecordedRequest, Responder

CHAT = "/v1/chat/completions"
MODEL = "gpt-fake-1"
JSON = [("Content-Type", "application/json")]
NOW = 1_800_000_000


def delegate(server: SoakpProcess, token: str, registry: SecretsRegistry, **fields: Any) -> RawResponse:
    response = server.request("POST", "/jwt/delegate", token, JSON, json.dumps(fields).encode())
    if response.status == 201:
        registry.add(response.json()["data"]["jwt"])
    return response


def child_token(server: SoakpProcess, token: str, registry: SecretsRegistry, **fields: Any) -> str:
    response = delegate(server, token, registry, **fields)
    assert response.status == 201, response.body
    return response.json()["data"]["jwt"]


def chains(server: SoakpProcess) -> dict[str, dict[str, Any]]:
    response = server.request("GET", "/jwt", headers=[("Authorization", basic_auth(*server.admin))])
    assert response.status == 200
    return {row["cid"]: row for row in response.json()["data"]}


def chat(server: SoakpProcess, token: str) -> RawResponse:
    return server.request("POST", CHAT, token, JSON, compact({"model": MODEL, "messages": []}))


def usage_reply(prompt: int, completion: int) -> Any:
    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.reply(200, chat_completion(MODEL, prompt, completion), JSON)

    return behaviour


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# The attenuation rule, without sockets ######################################################################

UNIVERSE_STEMS = ["/v1/chat", "/v1/chat/completions", "/v1/files", "/v1/files/abc", "/v1/models", "/v1/mod"]
PATTERNS = [stem + tail for stem in UNIVERSE_STEMS for tail in ("", "*", "/*")] + ["/v1/*"]
SAMPLE_PATHS = [stem + tail for stem in UNIVERSE_STEMS for tail in ("", "/x", "X", "/x/y")]
MODELS = ["a", "b", "c"]
ORIGINS = ["https://a.example", "https://b.example"]


def parent_claims(dlg: int = 1, exp: int = NOW + 3600, rexp: int = NOW + 7200, **limits: Any) -> soakp.TokenClaims:
    permissions = soakp.parse_permissions(limits)
    return soakp.TokenClaims(jti="ParentJti", kid="k", sub="team", iat=NOW, exp=exp, key="sk-parent-key",
                             permissions=permissions, cid="ParentCid", rexp=rexp, dlg=dlg)


def matches(patterns: list[str] | None, path: str) -> bool:
    return patterns is None or soakp.path_allowed(patterns, path)




@settings(max_examples=400, deadline=None)
@given(
    parent_paths=st.none() | st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3),
    child_paths=st.none() | st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3),
    parent_models=st.none() | st.lists(st.sampled_from(MODELS), min_size=1, max_size=3),
    child_models=st.none() | st.lists(st.sampled_from(MODELS), min_size=1, max_size=3),
    parent_origins=st.none() | st.lists(st.sampled_from(ORIGINS), min_size=1, max_size=2),
    child_origins=st.none() | st.lists(st.sampled_from(ORIGINS), min_size=1, max_size=2),
    parent_rpm=st.none() | st.integers(1, 100), child_rpm=st.none() | st.integers(1, 100),
    left=st.none() | st.integers(1, 1000), child_budget=st.none() | st.integers(1, 1000),
    child_ttl=st.none() | st.integers(1, 7200), child_renew=st.none() | st.integers(1, 10000),
    parent_dlg=st.integers(1, 3), child_dlg=st.none() | st.integers(0, 3),
)
def test_a_child_is_accepted_exactly_when_every_limit_is_within_the_parents(
    parent_paths: list[str] | None, child_paths: list[str] | None, parent_models: list[str] | None,
    child_models: list[str] | None, parent_origins: list[str] | None, child_origins: list[str] | None,
    parent_rpm: int | None, child_rpm: int | None, left: int | None, child_budget: int | None,
    child_ttl: int | None, child_renew: int | None, parent_dlg: int, child_dlg: int | None,
) -> None:
    parent = parent_claims(dlg=parent_dlg, paths=parent_paths, models=parent_models, origins=parent_origins,
                           rpm=parent_rpm, max_tokens_total=None if left is None else 10_000)
    fields = {name: value for name, value in (
        ("paths", child_paths), ("models", child_models), ("origins", child_origins), ("rpm", child_rpm),
        ("max_tokens_total", child_budget), ("ttl", child_ttl), ("renew_ttl", child_renew),
        ("delegate", child_dlg)) if value is not None}
    ttl = child_ttl if child_ttl is not None else 600
    within = {
        "paths": child_paths is None or parent_paths is None or all(
            matches(parent_paths, path) for path in SAMPLE_PATHS if matches(child_paths, path)),
        "models": child_models is None or parent_models is None or set(child_models) <= set(parent_models),
        "origins": child_origins is None or parent_origins is None or set(child_origins) <= set(parent_origins),
        "rpm": child_rpm is None or parent_rpm is None or child_rpm <= parent_rpm,
        "max_tokens_total": child_budget is None or left is None or child_budget <= left,
        "ttl": ttl <= 3600,
        "renew_ttl": child_renew is None or child_renew <= 7200,
        "delegate": child_dlg is None or child_dlg <= parent_dlg - 1,
    }
    malformed = child_renew is not None and child_renew < ttl  # renew_ttl under the ttl: its own 400
    try:
        grant = soakp.delegate_grant(parent, fields, 600, 365 * 86400, NOW, left)
    except soakp.ApiError as exc:
        assert exc.status == 400
        assert malformed or not all(within.values()), (exc.message, fields)
        if not malformed:
            assert not within[exc.param], (exc.param, within)
        return
    assert all(within.values()) and not malformed, (within, fields)
    child = grant.permissions
    for path in SAMPLE_PATHS:  # whatever the child may call, the parent may call
        assert not matches(list(child.paths) if child.paths else None, path) or matches(parent_paths, path)
    if parent_models is not None:
        assert child.models is not None and set(child.models) <= set(parent_models)
    if parent_origins is not None:
        assert child.origins is not None and set(child.origins) <= set(parent_origins)
    if parent_rpm is not None:
        assert child.rpm is not None and child.rpm <= parent_rpm
    if left is not None:
        assert child.max_tokens_total is not None and child.max_tokens_total <= left
    assert NOW + grant.ttl_s <= parent.exp and NOW + (grant.renew_ttl_s or 0) <= parent.rexp
    assert grant.delegate <= parent_dlg - 1 and grant.sub == "team/default" and grant.key == parent.key
    assert grant.ancestors[-1].cid == "ParentCid"


@pytest.mark.parametrize("name", ["key", "org", "project"])
def test_inherited_fields_cannot_be_given(name: str) -> None:
    with pytest.raises(soakp.ApiError) as info:
        soakp.delegate_grant(parent_claims(), {name: "x"}, 600, 86400, NOW, None)
    assert (info.value.status, info.value.param) == (400, name)


def test_a_token_without_delegate_gets_403() -> None:
    with pytest.raises(soakp.ApiError) as info:
        soakp.delegate_grant(parent_claims(dlg=0), {}, 600, 86400, NOW, None)
    assert info.value.status == 403


# End to end #################################################################################################


def test_child_carries_the_key_sealed_for_its_own_jti(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                      secret: str, secrets_registry: SecretsRegistry) -> None:
    parent = proxy.mint_data(sub="team", delegate=2, paths=["/v1/chat/*", "/v1/models"], models=[MODEL])
    response = delegate(proxy, parent.token, secrets_registry, sub="alice", paths=["/v1/chat/completions"],
                        ttl="10m")
    assert response.status == 201, response.body
    assert set(response.json()) == {"status", "message", "data"}
    assert parent.key.encode() not in response.body
    child = response.json()["data"]["jwt"]
    claims = claims_of(child)
    parent_cid = claims_of(parent.token)["cid"]
    assert claims["sub"] == "team/alice" and claims["anc"] == [parent_cid] and claims.get("dlg", 0) == 0
    assert claims["paths"] == ["/v1/chat/completions"] and claims["models"] == [MODEL]
    keys = soakp.derive_keys(secret)
    assert soakp.open_key(claims["ek"], claims["jti"], keys.sealing_key) == parent.key
    with pytest.raises(ValueError):
        soakp.open_key(claims["ek"], parent.jti, keys.sealing_key)
    fake_upstream.script(CHAT, usage_reply(1, 1))
    assert chat(proxy, child).status == 200
    assert fake_upstream.requests[-1].header("authorization") == f"Bearer {parent.key}"
    error_of(proxy.request("GET", "/v1/models", child), 403)  # narrower than its parent
    row = chains(proxy)[claims["cid"]]
    assert row["parent"] == parent_cid and row["sub"] == "team/alice"
    assert chains(proxy)[parent_cid]["parent"] is None


def test_delegate_zero_tokens_get_403(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                      secrets_registry: SecretsRegistry) -> None:
    assert error_of(delegate(proxy, proxy.mint(), secrets_registry), 403)["code"] == "delegation_not_allowed"
    error_of(delegate(proxy, "not-a-token", secrets_registry), 401)


@pytest.mark.parametrize("fields, param", [
    ({"paths": ["/v1/*"]}, "paths"), ({"models": [MODEL, "other"]}, "models"), ({"rpm": 11}, "rpm"),
    ({"origins": ["https://evil.example"]}, "origins"), ({"max_tokens_total": 1001}, "max_tokens_total"),
    ({"ttl": "2h"}, "ttl"), ({"ttl": "10m", "renew_ttl": "3h"}, "renew_ttl"), ({"delegate": 1}, "delegate"),
    ({"key": "sk-other"}, "key"),
])
def test_every_way_to_widen_a_limit_is_refused(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                               secrets_registry: SecretsRegistry, fields: dict[str, Any],
                                               param: str) -> None:
    parent = proxy.mint(delegate=1, ttl="1h", renew_ttl="2h", paths=["/v1/chat/*"], models=[MODEL], rpm=10,
                        origins=["https://app.example"], max_tokens_total=1000)
    assert error_of(delegate(proxy, parent, secrets_registry, **fields), 400)["param"] == param


def test_a_childs_usage_is_charged_to_its_parent_and_a_spent_parent_stops_its_children(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry
) -> None:
    parent = proxy.mint_data(delegate=1, max_tokens_total=100)
    parent_cid = claims_of(parent.token)["cid"]
    first = child_token(proxy, parent.token, secrets_registry, sub="a")
    second = child_token(proxy, parent.token, secrets_registry, sub="b", max_tokens_total=80)
    assert claims_of(first)["max_tokens_total"] == 100 and claims_of(second)["max_tokens_total"] == 80
    fake_upstream.script(CHAT, usage_reply(30, 30))
    assert chat(proxy, first).status == 200
    assert wait_until(lambda: chains(proxy)[parent_cid]["prompt_tokens"] == 30, 3)
    assert chains(proxy)[parent_cid]["completion_tokens"] == 30
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == 100
    assert chat(proxy, second).status == 200  # its own 80 are untouched, but the parent has only 40 left
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == 40
    for token in (first, second, parent.token):
        assert error_of(chat(proxy, token), 429)["code"] == "insufficient_quota"
    error_of(delegate(proxy, parent.token, secrets_registry), 429)


def test_children_share_their_ancestors_rate_limit(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                   secrets_registry: SecretsRegistry) -> None:
    parent = proxy.mint(delegate=1, rpm=3)
    first = child_token(proxy, parent, secrets_registry, sub="a")  # minting counts: 1 of 3
    second = child_token(proxy, parent, secrets_registry, sub="b")  # 2 of 3
    assert proxy.request("GET", "/v1/models", first).status == 200  # 3 of 3
    error_of(proxy.request("GET", "/v1/models", second), 429)
    error_of(proxy.request("GET", "/v1/models", parent), 429)


def test_revoking_the_grandparent_revokes_parent_and_child(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                           secrets_registry: SecretsRegistry) -> None:
    root = proxy.mint_data(delegate=2, ttl="1h", renew_ttl="2h")
    middle = child_token(proxy, root.token, secrets_registry, sub="team", delegate=1)
    leaf = child_token(proxy, middle, secrets_registry, sub="alice", renew_ttl="90m", ttl="30m")
    leaf_claims = claims_of(leaf)
    assert leaf_claims["sub"] == "default/team/alice"
    assert leaf_claims["anc"] == [root.jti, claims_of(middle)["cid"]]
    assert leaf_claims["rexp"] <= claims_of(middle)["rexp"] <= claims_of(root.token)["rexp"]
    status = proxy.request("POST", "/jwt/refresh", leaf)
    assert status.status == 201
    refreshed = secrets_registry.add(status.json()["data"]["jwt"])
    assert claims_of(refreshed)["anc"] == leaf_claims["anc"]
    assert proxy.request("GET", "/v1/models", refreshed).status == 200
    revoke = proxy.request("POST", "/jwt/revoke", headers=[("Authorization", basic_auth(*proxy.admin)), *JSON],
                           body=json.dumps({"cid": root.jti}).encode())
    assert revoke.status == 200
    for token in (root.token, middle, refreshed):
        error_of(proxy.request("GET", "/v1/models", token), 401)
    error_of(delegate(proxy, middle, secrets_registry), 401)


def test_a_child_never_outlives_its_parent(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                           secrets_registry: SecretsRegistry) -> None:
    parent = proxy.mint(delegate=1, ttl="20m")
    child = child_token(proxy, parent, secrets_registry)  # the default ttl (1 h here) is cut to the parent's
    assert claims_of(child)["exp"] <= claims_of(parent)["exp"]
    assert claims_of(child)["rexp"] <= claims_of(parent)["rexp"]
