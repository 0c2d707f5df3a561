"""Forwarding, end to end: the official openai SDK (sync and async) or raw sockets -> SOAKP -> fake upstream.

What these prove: every call the SDK makes reaches the upstream with the real key in place of the token,
org/project from the token, hop-by-hop headers gone both ways, and everything else (path, query,
headers, status, body bytes) unchanged; SSE and large bodies stream instead of being held whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import time
from typing import TYPE_CHECKING

import openai
import pytest

try:
    import httpx2 as httpx  # the HTTP client of openai 3.x
except ImportError:  # openai 1.x and 2.x use httpx
    import httpx

from fake_upstream import (
    FAKE_MODELS,
    FakeUpstream,
    Gate,
    RecordedRequest,
    build_request,
    die_mid_body,
    download,
    download_bytes,
    download_sha256,
    json_reply,
    openai_error,
    sse_reply,
)

if TYPE_CHECKING:
    from conftest import Minted, SoakpProcess


def assert_key_swapped(record: RecordedRequest, minted: Minted) -> None:
    """The upstream saw exactly one Authorization, the real key, and the token nowhere."""
    assert record.header_all("authorization") == [f"Bearer {minted.key}"]
    assert minted.token not in record.raw_head.decode("latin-1")
    if record.body is not None:
        assert minted.token.encode() not in record.body


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# The SDK, synchronous ######################################################################################


def test_chat_completion_reaches_upstream_with_the_real_key(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """A chat call through SOAKP: the SDK parses the answer, the upstream got the SDK's exact body with the
    real key instead of the token, Host naming the upstream, and the upstream's response headers came back."""
    sent: list[httpx.Request] = []
    client = proxy.openai(minted.token, http_client=httpx.Client(event_hooks={"request": [sent.append]}))
    raw = client.chat.completions.with_raw_response.create(model="gpt-fake-1", messages=messages("hello ☃"))
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello ☃"
    assert raw.headers["x-request-id"].startswith("req_fake_")
    record = fake_upstream.wait_for_request("/v1/chat/completions")
    assert (record.method, record.target) == ("POST", "/v1/chat/completions")
    assert_key_swapped(record, minted)
    assert record.body == sent[0].content
    assert record.header_all("host") == [f"127.0.0.1:{fake_upstream.port}"]
    assert record.header("content-type") == "application/json"
    assert fake_upstream.errors == []


def test_streamed_chat_completion(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """`stream=True`: the SDK reads every SSE chunk through SOAKP, up to `data: [DONE]`."""
    client = proxy.openai(minted.token)
    stream = client.chat.completions.create(
        model="gpt-fake-1", messages=messages("stream me"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: stream me"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert_key_swapped(fake_upstream.wait_for_request("/v1/chat/completions"), minted)


def test_embeddings_and_models(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """embeddings.create (base64 by default in the SDK) and models.list (a GET) work through SOAKP."""
    client = proxy.openai(minted.token)
    result = client.embeddings.create(model="text-embedding-fake", input=["one", "two"])
    assert [item.embedding for item in result.data] == [[0.25, 0.5, 0.0], [0.25, 0.5, 1.0]]
    assert [model.id for model in client.models.list()] == FAKE_MODELS
    embeddings, models = fake_upstream.requests
    assert (embeddings.method, embeddings.target) == ("POST", "/v1/embeddings")
    assert (models.method, models.target) == ("GET", "/v1/models")
    assert_key_swapped(embeddings, minted)
    assert_key_swapped(models, minted)


def test_files_create_uploads_20mb_unchanged(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """files.create with a 20 MB file: the multipart body reaches the upstream and the file part's
    SHA-256 there equals the client's."""
    data = os.urandom(20 * 1024 * 1024)
    client = proxy.openai(minted.token)
    file_object = client.files.create(file=("train.jsonl", data, "application/jsonl"), purpose="fine-tune")
    assert file_object.bytes == len(data)
    assert file_object.filename == "train.jsonl"
    record = fake_upstream.wait_for_request("/v1/files")
    upload = record.multipart()["file"]
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert record.multipart()["purpose"].data == b"fine-tune"
    assert_key_swapped(record, minted)


def test_audio_transcription_upload(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """audio.transcriptions.create (multipart with a model field) works through SOAKP."""
    audio = b"RIFF" + os.urandom(300_000)
    client = proxy.openai(minted.token)
    transcription = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio, "audio/wav"))
    assert transcription.text == f"fake transcript of clip.wav ({len(audio)} bytes)"
    record = fake_upstream.wait_for_request("/v1/audio/transcriptions")
    parts = record.multipart()
    assert parts["file"].data == audio
    assert parts["model"].data == b"whisper-1"
    assert_key_swapped(record, minted)


def test_responses_create(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """responses.create works through SOAKP."""
    client = proxy.openai(minted.token)
    response = client.responses.create(model="gpt-fake-1", input="say hi")
    assert response.output_text == "echo: say hi"
    assert_key_swapped(fake_upstream.wait_for_request("/v1/responses"), minted)


def test_upstream_429_is_the_sdks_rate_limit_error(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """An upstream 429 reaches the SDK as openai.RateLimitError with the upstream's message, code,
    request id and Retry-After (SOAKP passes errors it did not make through untouched)."""
    fake_upstream.script(
        "/v1/chat/completions",
        openai_error(
            429,
            "Rate limit reached for gpt-fake-1 on requests per min",
            "requests",
            "rate_limit_exceeded",
            headers=[("retry-after", "7"), ("x-request-id", "req_upstream_429"), ("x-ratelimit-remaining-requests", "0")],
        ),
    )
    client = proxy.openai(token)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-fake-1", messages=messages("hi"))
    error = caught.value
    assert error.status_code == 429
    assert "Rate limit reached for gpt-fake-1" in error.message
    assert error.code == "rate_limit_exceeded"
    assert error.request_id == "req_upstream_429"
    assert error.response.headers["retry-after"] == "7"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_upstream_400_is_the_sdks_bad_request_error(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """An upstream 400 reaches the SDK as openai.BadRequestError with message, param and code intact."""
    fake_upstream.script(
        "/v1/chat/completions",
        openai_error(
            400,
            "Invalid value for 'messages': empty array.",
            "invalid_request_error",
            "invalid_value",
            param="messages",
            headers=[("x-request-id", "req_upstream_400")],
        ),
    )
    client = proxy.openai(token)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-fake-1", messages=[])
    error = caught.value
    assert error.status_code == 400
    assert "Invalid value for 'messages'" in error.message
    assert (error.param, error.code, error.request_id) == ("messages", "invalid_value", "req_upstream_400")


def test_org_and_project_come_from_the_token(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A token with org and project overrides the client's own OpenAI-Organization / OpenAI-Project."""
    minted = proxy.mint_data(org="org-from-token", project="proj-from-token")
    client = proxy.openai(minted.token, organization="org-from-client", project="proj-from-client")
    client.models.list()
    record = fake_upstream.wait_for_request("/v1/models")
    assert record.header_all("openai-organization") == ["org-from-token"]
    assert record.header_all("openai-project") == ["proj-from-token"]
    assert_key_swapped(record, minted)


def test_client_org_and_project_pass_when_the_token_has_none(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """A token without org/project lets the client's own headers through unchanged."""
    client = proxy.openai(minted.token, organization="org-from-client", project="proj-from-client")
    client.models.list()
    record = fake_upstream.wait_for_request("/v1/models")
    assert record.header_all("openai-organization") == ["org-from-client"]
    assert record.header_all("openai-project") == ["proj-from-client"]


def test_token_org_with_client_project(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """Each header is decided on its own: the token's org wins, the client's project passes."""
    minted = proxy.mint_data(org="org-from-token")
    client = proxy.openai(minted.token, organization="org-from-client", project="proj-from-client")
    client.models.list()
    record = fake_upstream.wait_for_request("/v1/models")
    assert record.header_all("openai-organization") == ["org-from-token"]
    assert record.header_all("openai-project") == ["proj-from-client"]


def test_openai_alias_base_url(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """An SDK whose base URL ends in /openai reaches the upstream's /v1."""
    client = openai.OpenAI(base_url=f"{proxy.url}/openai", api_key=minted.token, max_retries=0, timeout=30)
    assert [model.id for model in client.models.list()] == FAKE_MODELS
    record = fake_upstream.wait_for_request("/v1/models")
    assert record.target == "/v1/models"


def test_cli_minted_token_works(proxy: SoakpProcess, fake_upstream: FakeUpstream, soakp_cli, secret: str, secrets_registry, tmp_path) -> None:
    """`soakp.py mint` with the same secret prints a token (last stdout line) that the server accepts:
    tokens are valid by signature alone, the registry is not needed."""
    key = secrets_registry.new_key()
    result = soakp_cli(
        "mint", "--secret", secret, "--db", str(tmp_path / "cli.db"),
        "--key", key, "--org", "org-cli", "--sub", "cli-test", "--ttl", "1h",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = secrets_registry.add(result.stdout.strip().splitlines()[-1])
    assert key not in result.stdout and key not in result.stderr
    client = proxy.openai(token)
    assert [model.id for model in client.models.list()] == FAKE_MODELS
    record = fake_upstream.wait_for_request("/v1/models")
    assert record.header_all("authorization") == [f"Bearer {key}"]
    assert record.header_all("openai-organization") == ["org-cli"]


# The SDK, asynchronous #####################################################################################


def test_async_sdk_calls(proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted) -> None:
    """AsyncOpenAI through SOAKP: chat, streamed chat, embeddings, models, a file, a transcription,
    responses, and an upstream error, all on one event loop (several calls at once)."""

    async def run() -> None:
        async with proxy.async_openai(minted.token) as client:
            chat, embeddings, models, response = await asyncio.gather(
                client.chat.completions.create(model="gpt-fake-1", messages=messages("async")),
                client.embeddings.create(model="text-embedding-fake", input="x", encoding_format="float"),
                client.models.list(),
                client.responses.create(model="gpt-fake-1", input="async responses"),
            )
            assert chat.choices[0].message.content == "echo: async"
            assert embeddings.data[0].embedding == [0.25, 0.5, 0.0]
            assert [model.id for model in models.data] == FAKE_MODELS
            assert response.output_text == "echo: async responses"

            stream = await client.chat.completions.create(model="gpt-fake-1", messages=messages("astream"), stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
            assert text == "echo: astream"

            data = os.urandom(3 * 1024 * 1024)
            file_object = await client.files.create(file=("a.jsonl", data, "application/jsonl"), purpose="batch")
            assert file_object.bytes == len(data)
            transcription = await client.audio.transcriptions.create(model="whisper-1", file=("b.wav", b"RIFF1234", "audio/wav"))
            assert transcription.text == "fake transcript of b.wav (8 bytes)"

            fake_upstream.script(
                "/v1/embeddings", openai_error(429, "Slow down", "requests", "rate_limit_exceeded", headers=[("x-request-id", "req_a429")])
            )
            with pytest.raises(openai.RateLimitError) as caught:
                await client.embeddings.create(model="text-embedding-fake", input="y")
            assert caught.value.request_id == "req_a429" and "Slow down" in caught.value.message

    asyncio.run(asyncio.wait_for(run(), 120))
    records = fake_upstream.requests
    assert len(records) == 8
    for record in records:
        assert_key_swapped(record, minted)
    uploads = [r for r in records if r.path == "/v1/files"]
    assert uploads[0].body_length > 3 * 1024 * 1024


def test_async_sdk_gets_first_sse_chunk_while_upstream_withholds_the_second(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str
) -> None:
    """The async SDK's stream yields chunk 1 while the upstream is still holding chunk 2 back."""
    gate = Gate()
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    fake_upstream.script(
        "/v1/chat/completions",
        sse_reply(
            [
                {**chunk, "choices": [{"index": 0, "delta": {"content": "first"}, "finish_reason": None}]},
                {**chunk, "choices": [{"index": 0, "delta": {"content": "second"}, "finish_reason": "stop"}]},
            ],
            gate=gate,
        ),
    )

    async def run() -> list[str]:
        async with proxy.async_openai(token) as client:
            stream = await client.chat.completions.create(model="m", messages=messages("x"), stream=True)
            iterator = stream.__aiter__()
            try:
                first = await asyncio.wait_for(iterator.__anext__(), 10)
                assert gate.reached.wait(5) and not gate.is_open
            finally:
                gate.open()
            rest = [item async for item in iterator]
            return [c.choices[0].delta.content for c in [first, *rest]]

    assert asyncio.run(asyncio.wait_for(run(), 60)) == ["first", "second"]


# Raw HTTP: what exactly is forwarded #######################################################################


def test_sse_chunk_reaches_client_while_upstream_withholds_the_second(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str
) -> None:
    """On the wire: the client reads SSE event 1 while the upstream withholds event 2 until released,
    and then gets the whole stream, byte for byte, properly ended."""
    gate = Gate()
    fake_upstream.script("/v1/chat/completions", sse_reply([{"n": 1, "text": "first"}, {"n": 2, "text": "second"}], gate=gate))
    body = b'{"model":"gpt-fake-1","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    request = build_request(
        "POST",
        "/v1/chat/completions",
        [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json"), ("Accept", "text/event-stream")],
        body,
    )
    with proxy.connect() as conn:
        conn.send(request)
        try:
            received = conn.read_until(lambda data: b'"first"' in data, timeout_s=10)
            assert b'"first"' in received, f"connection ended before the first event: {received!r}"
            assert gate.reached.wait(5) and not gate.is_open
            assert b'"second"' not in received
        finally:
            gate.open()
        response = conn.read_response("POST")
    assert response.status == 200
    assert response.complete
    assert response.header("content-type") == "text/event-stream; charset=utf-8"
    assert response.body == b'data: {"n": 1, "text": "first"}\n\ndata: {"n": 2, "text": "second"}\n\ndata: [DONE]\n\n'


def test_request_body_streams_upstream_before_it_ends(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """SOAKP sends the first part of a request body upstream before the client has sent the rest."""
    first, second = os.urandom(256 * 1024), os.urandom(256 * 1024)
    head = build_request(
        "POST",
        "/v1/fake/echo/upload",
        [("Authorization", f"Bearer {token}"), ("Content-Length", str(len(first) + len(second)))],
    )
    with proxy.connect() as conn:
        conn.send(head + first)
        arrived = fake_upstream.wait_until(
            lambda: any(r.body_length >= len(first) - 64 * 1024 for r in fake_upstream.requests), timeout_s=10
        )
        assert arrived, "SOAKP held the first part of the body back until the rest came"
        conn.send(second)
        response = conn.read_response("POST")
    assert response.status == 200
    record = fake_upstream.wait_for_request("/v1/fake/echo/upload")
    assert record.body_sha256 == hashlib.sha256(first + second).hexdigest()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/fake/echo/a%20b/c?x=1&y=%2F&z=a+b&empty=&x=2",
        "/v1/fake/echo?q=%E2%98%83&list%5B%5D=1&list%5B%5D=2",
        "/v1/fake/echo/files/file-abc123/content",
        "/v1/fake/echo?next=/../jwt/generate&dots=./.",
    ],
)
def test_path_and_query_are_forwarded_exactly(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, target: str) -> None:
    """The upstream receives the request target byte for byte (the query is not canonicalised)."""
    response = proxy.request("GET", target, token)
    assert response.status == 200, response.body
    assert fake_upstream.wait_for_request().target == target


def test_openai_alias_maps_to_v1(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """/openai/x?q reaches the upstream as /v1/x?q."""
    response = proxy.request("GET", "/openai/fake/echo/alias?q=1&r=%20", token)
    assert response.status == 200, response.body
    assert fake_upstream.wait_for_request().target == "/v1/fake/echo/alias?q=1&r=%20"


@pytest.mark.parametrize("size", [0, 1, 65_537, 1_000_003])
def test_body_bytes_are_forwarded_unchanged(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, size: int) -> None:
    """A binary body of any size (Content-Length framed) arrives upstream byte for byte."""
    body = os.urandom(size)
    response = proxy.request("POST", "/v1/fake/echo/bytes", token, [("Content-Type", "application/octet-stream")], body)
    assert response.status == 200, response.body
    record = fake_upstream.wait_for_request("/v1/fake/echo/bytes")
    assert record.body == body
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_is_forwarded_unchanged(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A chunked request body arrives upstream as the same bytes (SOAKP may re-frame it), no trailers leak."""
    pieces = [b'{"model": "gpt', b'-fake-1", "input":', b' "\xc3\xa9t\xc3\xa9"}  \n']
    head = build_request(
        "POST",
        "/v1/fake/echo/chunked",
        [("Authorization", f"Bearer {token}"), ("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")],
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    response = proxy.raw(head + body)
    assert response.status == 200, response.body
    record = fake_upstream.wait_for_request("/v1/fake/echo/chunked")
    assert record.body == b"".join(pieces)
    assert record.header("content-type") == "application/json"


def test_hop_by_hop_request_headers_are_dropped(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """Connection and the headers it names, Keep-Alive, Proxy-*, TE, Trailer and Upgrade from the client
    never reach the upstream; other headers, repeated ones in order, do."""
    headers = [
        ("Connection", "keep-alive, X-Hop-Req"),
        ("X-Hop-Req", "must-not-pass"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("Proxy-Authorization", "Basic cHJveHk6cGFzcw=="),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("X-Dup", "first"),
        ("X-Custom", "value  with   spaces"),
        ("X-Dup", "second"),
        ("OpenAI-Beta", "assistants=v2"),
        ("User-Agent", "soakp-tests/1"),
    ]
    response = proxy.request("GET", "/v1/fake/echo/hop", token, headers)
    assert response.status == 200, response.body
    record = fake_upstream.wait_for_request("/v1/fake/echo/hop")
    names = record.header_names()
    for name in ("x-hop-req", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding"):
        assert name not in names, f"{name} reached the upstream: {record.headers}"
    assert all("x-hop-req" not in value.lower() for value in record.header_all("connection"))
    assert record.header_all("x-dup") == ["first", "second"]
    assert record.header_all("x-custom") == ["value  with   spaces"]
    assert record.header_all("openai-beta") == ["assistants=v2"]
    assert record.header_all("user-agent") == ["soakp-tests/1"]


def test_hop_by_hop_response_headers_are_dropped(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """Hop-by-hop headers in the upstream's answer (Connection: x-hop, X-Hop, Keep-Alive, Proxy-*,
    Trailer, Upgrade) never reach the client; the rest, Set-Cookie twice in order, does, and the body too."""
    body = {"object": "list", "data": []}
    fake_upstream.script(
        "/v1/models",
        json_reply(
            body,
            headers=[
                ("Connection", "x-hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic realm=upstream"),
                ("Proxy-Connection", "keep-alive"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("X-Kept", "yes"),
                ("Set-Cookie", "a=1; Secure"),
                ("Set-Cookie", "b=2; Secure"),
                ("x-request-id", "req_hop"),
            ],
        ),
    )
    response = proxy.request("GET", "/v1/models", token)
    assert response.status == 200
    names = response.header_names()
    for name in ("x-hop", "keep-alive", "proxy-authenticate", "proxy-connection", "trailer", "upgrade"):
        assert name not in names, f"{name} reached the client: {response.headers}"
    assert all("x-hop" not in value.lower() for value in response.header_all("connection"))
    assert response.header_all("x-kept") == ["yes"]
    assert response.header_all("set-cookie") == ["a=1; Secure", "b=2; Secure"]
    assert response.header_all("x-request-id") == ["req_hop"]
    assert response.json() == body


@pytest.mark.parametrize("status", [201, 299, 418, 503])
def test_upstream_status_and_body_pass_unchanged(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, status: int) -> None:
    """Whatever status the upstream answers with reaches the client, with the body as sent."""
    payload = {"status_was": status, "note": "from upstream ✓"}
    fake_upstream.script("/v1/fake/status", json_reply(payload, status, headers=[("X-Upstream", "1")]))
    response = proxy.request("POST", "/v1/fake/status", token, [("Content-Type", "application/json")], b"{}")
    assert response.status == status
    assert response.json() == payload
    assert response.header("x-upstream") == "1"


def test_chunked_response_reaches_client_unchanged(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A chunked upstream answer arrives complete, bytes identical, properly ended."""
    fake_upstream.script("/v1/fake/download", download(3 * 1024 * 1024 + 17))
    response = proxy.request("GET", "/v1/fake/download", token)
    assert response.status == 200 and response.complete
    assert hashlib.sha256(response.body).hexdigest() == download_sha256(3 * 1024 * 1024 + 17)


def test_concurrent_answers_over_tls_arrive_each_intact(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """Sixteen different 1.5 MB answers read from the upstream at once each reach their own client
    byte for byte: the TLS connections share one landing buffer for socket reads, and no answer may
    carry another's bytes."""
    expected = {}
    for index in range(16):
        blob = os.urandom(768 * 1024).hex()
        fake_upstream.script(f"/v1/fake/blob{index}", json_reply({"index": index, "blob": blob}))
        expected[index] = blob

    def fetch(index: int) -> tuple[int, int, dict]:
        response = proxy.request("GET", f"/v1/fake/blob{index}", token)
        return index, response.status, response.json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(fetch, range(16)))
    assert [(index, status) for index, status, _ in results] == [(i, 200) for i in range(16)]
    for index, _, answer in results:
        assert answer == {"index": index, "blob": expected[index]}


def test_keep_alive_client_connection_serves_several_requests(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """One client connection carries several requests in a row (HTTP/1.1 keep-alive)."""
    with proxy.connect() as conn:
        for index in range(3):
            conn.send(build_request("GET", f"/v1/fake/echo/ka{index}", [("Authorization", f"Bearer {token}")]))
            response = conn.read_response()
            assert response.status == 200
            assert response.json()["target"] == f"/v1/fake/echo/ka{index}"


def test_upstream_connections_are_reused(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """Sequential requests reuse a kept-alive upstream connection: at most one new one for five requests."""
    client = proxy.openai(token)
    client.models.list()
    before = fake_upstream.connections_accepted
    for _ in range(5):
        client.models.list()
    assert fake_upstream.connections_accepted - before <= 1
    assert len(fake_upstream.requests) == 6


def test_good_request_after_upstream_died_mid_body(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """After an upstream connection broke mid-body, the next request (same client connection or a new
    one) is served over a fresh upstream connection."""
    fake_upstream.script("/v1/fake/die", die_mid_body(how="reset"))
    broken = proxy.request("GET", "/v1/fake/die", token)
    assert not broken.complete
    client = proxy.openai(token)
    for _ in range(3):
        assert [model.id for model in client.models.list()] == FAKE_MODELS


def test_expect_100_continue(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A client that sends `Expect: 100-continue` gets its 100 Continue, then the upstream's answer to
    the body it sent after it."""
    body = os.urandom(200_000)
    head = build_request(
        "POST",
        "/v1/fake/echo/expect",
        [("Authorization", f"Bearer {token}"), ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    with proxy.connect() as conn:
        conn.send(head)
        interim = conn.read_until(lambda data: b"\r\n\r\n" in data, timeout_s=10)
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:200]
        conn.send(body)
        response = conn.read_response("POST")
    assert response.status == 200
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_sdk_over_an_https_listener(soakp, fake_upstream: FakeUpstream, test_ca) -> None:
    """SOAKP started with --cert/--key serves HTTPS: the SDK (trusting the test CA) chats and streams."""
    cert_path, key_path = test_ca.issue("soakp-listener")
    server = soakp(cert=str(cert_path), key=str(key_path))
    assert server.scheme == "https"
    minted = server.mint_data()
    client = server.openai(minted.token)
    assert client.chat.completions.create(model="m", messages=messages("tls")).choices[0].message.content == "echo: tls"
    stream = client.chat.completions.create(model="m", messages=messages("tls stream"), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "echo: tls stream"
    assert_key_swapped(fake_upstream.wait_for_request("/v1/chat/completions"), minted)


# Large transfers in bounded memory ##########################################################################

BIG_BYTES = 200 * 1024 * 1024
MEMORY_GROWTH_LIMIT_KIB = 50 * 1024


def test_200mb_upload_and_download_stream_in_bounded_memory(soakp, fake_upstream: FakeUpstream) -> None:
    """A 200 MB upload (Content-Length, from a generator) and a 200 MB chunked download pass through a
    fresh SOAKP intact while its peak RSS grows by less than 50 MB: bodies are streamed, not held."""
    server = soakp()
    minted = server.mint_data()
    auth = {"Authorization": f"Bearer {minted.token}"}
    fake_upstream.script("/v1/fake/download", download(BIG_BYTES))
    fake_upstream.script("/v1/fake/warmup", download(2 * 1024 * 1024))
    with httpx.Client(timeout=120) as http:
        # Warm up: load every code path (TLS to the upstream, both directions) before measuring.
        assert http.post(f"{server.url}/v1/fake/echo/warmup", content=os.urandom(2 * 1024 * 1024), headers=auth).status_code == 200
        assert len(http.get(f"{server.url}/v1/fake/warmup", headers=auth).content) == 2 * 1024 * 1024
        before = server.memory_kib()

        started = time.monotonic()
        response = http.post(
            f"{server.url}/v1/fake/echo/upload",
            content=download_bytes(BIG_BYTES),
            headers={**auth, "Content-Length": str(BIG_BYTES), "Content-Type": "application/octet-stream"},
        )
        upload_s = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["body_length"] == BIG_BYTES
        assert response.json()["body_sha256"] == download_sha256(BIG_BYTES)
        after_upload = server.memory_kib()

        started = time.monotonic()
        hasher, received = hashlib.sha256(), 0
        with http.stream("GET", f"{server.url}/v1/fake/download", headers=auth) as streamed:
            assert streamed.status_code == 200
            for block in streamed.iter_raw():
                hasher.update(block)
                received += len(block)
        download_s = time.monotonic() - started
        after = server.memory_kib()

    print(
        f"\nsoakp memory (KiB): before RSS={before['VmRSS']} HWM={before['VmHWM']}; "
        f"after 200 MB upload ({upload_s:.1f}s) RSS={after_upload['VmRSS']} HWM={after_upload['VmHWM']}; "
        f"after 200 MB download ({download_s:.1f}s) RSS={after['VmRSS']} HWM={after['VmHWM']}; "
        f"peak growth {after['VmHWM'] - before['VmRSS']} KiB"
    )
    assert received == BIG_BYTES
    assert hasher.hexdigest() == download_sha256(BIG_BYTES)
    upload = fake_upstream.wait_for_request("/v1/fake/echo/upload")
    assert upload.body_length == BIG_BYTES and upload.complete
    assert after["VmHWM"] - before["VmRSS"] < MEMORY_GROWTH_LIMIT_KIB


def test_http10_keep_alive_client_gets_a_streamed_answer_ended_by_close(
    proxy: SoakpProcess, token: str, fake_upstream: FakeUpstream
) -> None:
    """Regression: an HTTP/1.0 client asking for keep-alive got a chunked upstream answer with neither
    a length nor chunking (1.0 has none) and an open connection, so it never saw the end. SOAKP must
    end such a body by closing."""
    fake_upstream.script("/v1/fake/http10/stream", sse_reply([{"n": 1}, {"n": 2}]))
    with proxy.connect() as conn:
        conn.send(
            f"GET /v1/fake/http10/stream HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        assert conn.wait_closed(timeout_s=10), "the connection stayed open: the client cannot find the end"
        data = bytes(conn.buffer)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n' or body.count(b"data:") == 3
