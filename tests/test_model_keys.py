"""`model` read the way every upstream might read it (issue 11, item 3).

For a models-limited token: a JSON body with a top-level key equal to `model` case-insensitively but
not exactly is a 400; a WebSocket query naming `model` more than once in any case is a 400; on the
Realtime credential endpoints the nested `session.model` is checked too. json_models is the pure
helper; its chunked walk (used so a big body can be checked off the event loop) reads exactly what
json.loads reads.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import soakp
from fake_upstream import build_request

if TYPE_CHECKING:
    from conftest import SoakpProcess
    from fake_upstream import FakeUpstream, RawResponse

SESSION_PATHS = [
    "/v1/realtime/client_secrets",
    "/v1/realtime/sessions",
    "/v1/realtime/transcription_sessions",
]


def refused_400(body: bytes, nested: bool = False) -> str:
    with pytest.raises(soakp.ApiError) as caught:
        soakp.json_models(body, nested)
    assert caught.value.status == 400
    return caught.value.message


# Pure #############################################################################################


def test_json_models_reads_top_level_and_session_model() -> None:
    body = json.dumps(
        {"session": {"type": "realtime", "model": "gpt-realtime"}, "model": "x"}
    ).encode()
    assert soakp.json_models(body) == ["x"]
    assert soakp.json_models(body, nested_session=True) == ["x", "gpt-realtime"]
    assert soakp.json_models(b'{"session": {"model": 5}}', nested_session=True) == [""]
    assert (
        soakp.json_models(b'{"session": "s", "input": [{"model": "deep"}]}', nested_session=True)
        == []
    )
    assert soakp.json_models(b'{"session": [{"model": "in a list"}]}', nested_session=True) == []
    assert soakp.json_model(b'{"model": "a"}') == "a" and soakp.json_model(b"[1]") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "ok", "MODEL": "bad"}',
        b'{"Model": "bad"}',
        b'{"model": "ok", "mOdEl": "bad"}',
        b'{"model": "ok", "model": "bad"}',
        b'{"model": "ok", "mod\\u0065l": "bad"}',
    ],
)
def test_json_model_key_in_another_case_or_twice_is_400(body: bytes) -> None:
    """Issue 11 item 3: `{"model": "ok", "MODEL": "bad"}` passed: an upstream that folds case
    reads bad."""
    refused_400(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"session": {"model": "ok", "MODEL": "bad"}}',
        b'{"SESSION": {"model": "bad"}}',
        b'{"session": {"model": "ok"}, "session": {"model": "bad"}}',
        b'{"session": {"model": "a", "model": "b"}}',
    ],
)
def test_json_session_model_in_another_case_or_twice_is_400(body: bytes) -> None:
    refused_400(body, nested=True)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["model", "Model", "session", "x", "input", ""]), children, max_size=4
        )
    ),
    max_leaves=20,
)


def reference(body: bytes, nested: bool) -> list[str] | None:
    """What json_models must answer, from json.loads itself (None for a 400)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if sum(k == "model" for k, _ in pairs) > 1:
            raise ValueError("repeated model")
        return dict(pairs)

    try:
        document = json.loads(body, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return None
    found: list[str] = []
    keys = ("model", "session") if nested else ("model",)
    scopes = [document]
    if nested and isinstance(document, dict) and isinstance(document.get("session"), dict):
        scopes.append(document["session"])
    for scope in scopes:
        if not isinstance(scope, dict):
            continue
        if any(k.casefold() in keys and k != k.casefold() for k in scope):
            return None
        if "model" in scope:
            found.append(scope["model"] if isinstance(scope["model"], str) else "")
    return found


@settings(max_examples=400, deadline=None)
@given(JSON, st.booleans(), st.sampled_from([1, 2, 3, 7]), st.sampled_from([None, 0, 2]))
@example({"session": {"model": "m", "x": [1, [2, {"model": "d"}]]}, "model": "t"}, True, 1, None)
@example([1, 2, {"model": "a"}, "s\u00e9,\\\"", [], {}], False, 1, None)
def test_json_walk_reads_what_json_loads_reads(
    document: Any, nested: bool, chunk: int, indent: int | None
) -> None:
    """json_models' walk, with chunks as small as one character (so every container and string is
    walked piece by piece) and as used (16 KiB: one C call), agrees with json.loads on every
    document."""
    body = json.dumps(document, indent=indent).encode()
    expected = reference(body, nested)
    for step in (chunk, soakp.JSON_CHUNK_CHARS):
        try:
            found: list[str] | None = soakp.json_models(body, nested, chunk=step)
        except soakp.ApiError:
            found = None
        assert found == expected, step


@given(st.binary(max_size=60))
@example(b'{"a": [1, 2,]}')
@example(b'{"a": "\\x"}')
@example(b'{"a": 1} x')
@example(b'\xef\xbb\xbf{"model": "a"}')
@example(b'{"a": "\x01"}')
@example(b'[NaN, Infinity, -Infinity, 1e999]')
@example(b'[[[[1], {"model": "a", "model": "b"}]]]')
def test_json_walk_refuses_what_json_loads_refuses(body: bytes) -> None:
    """Arbitrary bytes, walked one character at a time: refused exactly when json.loads refuses them
    (or they name `Model`), and otherwise read the same."""
    expected = reference(body, False)
    try:
        found: list[str] | None = soakp.json_models(body, chunk=1)
    except soakp.ApiError:
        found = None
    assert found == expected


# Through the server ###############################################################################


def post(proxy: SoakpProcess, path: str, token: str, body: bytes) -> RawResponse:
    return proxy.request("POST", path, token, [("Content-Type", "application/json")], body)


def error(response: RawResponse, status: int) -> dict[str, Any]:
    assert response.status == status, response.body
    found = response.json()["error"]
    assert set(found) == {"message", "type", "param", "code"}
    return found


def test_json_model_in_another_case_is_400_for_a_models_limited_token_only(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    limited, free = proxy.mint(models=["gpt-4o-mini"]), proxy.mint()
    body = b'{"model": "gpt-4o-mini", "MODEL": "gpt-4o", "input": "x"}'
    assert "'MODEL'" in error(post(proxy, "/v1/embeddings", limited, body), 400)["message"]
    assert fake_upstream.requests == []
    assert post(proxy, "/v1/embeddings", free, body).status == 200
    assert fake_upstream.wait_for_request("/v1/embeddings").body == body


@pytest.mark.parametrize("path", SESSION_PATHS)
def test_session_model_is_checked_on_the_realtime_credential_endpoints(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, path: str
) -> None:
    """Issue 11 item 3: `{"session": {"model": "x"}}` passed, and the ephemeral key it returns works
    outside every SOAKP limit. The token's paths open these endpoints (the lead's credential
    rule)."""
    token = proxy.mint(models=["gpt-realtime"], paths=SESSION_PATHS)
    bad = json.dumps({"session": {"type": "realtime", "model": "gpt-4o-realtime-preview"}}).encode()
    assert error(post(proxy, path, token, bad), 403)["code"] == "model_not_allowed"
    case = json.dumps({"session": {"model": "gpt-realtime", "Model": "other"}}).encode()
    error(post(proxy, path, token, case), 400)
    assert fake_upstream.requests == []
    good = json.dumps({"session": {"type": "realtime", "model": "gpt-realtime"}}).encode()
    post(proxy, path, token, good)
    assert fake_upstream.wait_for_request(path).body == good


def test_websocket_query_naming_model_twice_in_any_case_is_400(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    token = proxy.mint(models=["gpt-realtime"])
    before = fake_upstream.connections_accepted
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    for query in ("?model=gpt-realtime&MODEL=other", "?Model=other&model=gpt-realtime"):
        wire = build_request("GET", "/v1/realtime" + query, headers, host=f"127.0.0.1:{proxy.port}")
        assert error(proxy.raw(wire), 400)["param"] == "model"
    assert fake_upstream.connections_accepted == before
