"""Multipart fails closed for models-limited tokens (issue 11, item 2).

SOAKP forwards, for a token with a `models` limit, only multipart bodies it reads with certainty
(RFC 2046/7578: a boundary of 1-70 bchars, CRLF line endings, no folded part headers, a close
delimiter, at most one `model` part); anything else is a 400 naming the rule. The differential tests
show that for every body SOAKP accepts, python-multipart and Werkzeug (two common form parsers) read
the same `model` (or none): hypothesis-generated bodies, every trick of the issue, and a sample
through the real server with the fake upstream. Tokens without a models limit stay byte-for-byte
passthrough.
"""

from __future__ import annotations

import io
import os
import random
from typing import TYPE_CHECKING, Any

import pytest
import python_multipart
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.formparser import parse_form_data

import soakp
from fake_upstream import build_request

if TYPE_CHECKING:
    from conftest import SoakpProcess
    from fake_upstream import FakeUpstream, RawResponse

TRANSCRIPTIONS = "/v1/audio/transcriptions"
BOUNDARY = b"strictBoundary7MA4YWxkTrZu0gW"
# RFC 2046 bchars, and the subset that may stand unquoted (token characters)
BCHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? "
TOKEN_BCHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'+_-."


def content_type(boundary: bytes, quoted: bool = False) -> bytes:
    return b"multipart/form-data; boundary=" + (b'"' + boundary + b'"' if quoted else boundary)


def part(
    name: bytes,
    value: bytes,
    filename: bytes | None = None,
    extra: bytes = b"",
    boundary: bytes = BOUNDARY,
) -> bytes:
    disposition = (
        b'form-data; name="'
        + name
        + b'"'
        + (b'; filename="' + filename + b'"' if filename else b"")
    )
    return (
        b"--"
        + boundary
        + b"\r\nContent-Disposition: "
        + disposition
        + b"\r\n"
        + extra
        + b"\r\n"
        + value
        + b"\r\n"
    )


def form(*parts: bytes, boundary: bytes = BOUNDARY) -> bytes:
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


# What each reader makes of a body #################################################################


def soakp_reads(
    body: bytes, ctype: bytes, cuts: list[int] | None = None
) -> list[str] | soakp.ApiError:
    """What a models-limited token's request gets from SOAKP's pure code: the model values it
    checks, or the ApiError(400) that refuses the body. Fed in pieces cut at `cuts`, as the network
    may."""
    try:
        scanner = soakp.MultipartModelScanner(soakp.multipart_boundary(ctype))
        found: list[str] = []
        points = sorted({c % (len(body) + 1) for c in cuts or []})
        for start, end in zip([0, *points], [*points, len(body)]):
            found += scanner.feed(body[start:end])
            if scanner.model_fields > 1:
                raise soakp.multipart_refused("a body may have at most one model field")
        scanner.finish()
    except soakp.ApiError as exc:
        assert exc.status == 400 and exc.code == "multipart_not_strict", exc.message
        return exc
    return found


def python_multipart_reads(body: bytes, ctype: bytes) -> list[str]:
    fields: list[str] = []

    def on_field(field: Any) -> None:
        if field.field_name == b"model":
            fields.append((field.value or b"").decode("utf-8", "replace"))

    def on_file(file: Any) -> None:
        if file.field_name == b"model":
            fields.append("<file>")

    python_multipart.parse_form(
        {"Content-Type": ctype, "Content-Length": str(len(body)).encode()},
        io.BytesIO(body),
        on_field,
        on_file,
    )
    return fields


def werkzeug_reads(body: bytes, ctype: bytes) -> list[str]:
    environ = {
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": ctype.decode("latin-1"),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    _, fields, files = parse_form_data(environ, silent=False)
    return fields.getlist("model") + ["<file>"] * len(files.getlist("model"))


def check_agreement(body: bytes, ctype: bytes, cuts: list[int] | None = None) -> bool:
    """When SOAKP accepts the body, both parsers read it without error and find the same model
    values SOAKP checked; the answer never depends on where the body was cut. Returns whether SOAKP
    accepted."""
    whole = soakp_reads(body, ctype)
    cut = soakp_reads(body, ctype, cuts)
    # (which rule a refused body breaks first may depend on the cut; whether it is refused may not)
    assert (whole if isinstance(whole, list) else None) == (cut if isinstance(cut, list) else None)
    if not isinstance(whole, list):
        return False
    assert len(whole) <= 1
    assert python_multipart_reads(body, ctype) == whole, (body, ctype)
    assert werkzeug_reads(body, ctype) == whole, (body, ctype)
    return True


# Every trick of the issue, and each rule ##########################################################

B71 = b"B" * 71
B70 = B71[:70]
TRICKS: dict[str, tuple[bytes, bytes, str]] = {  # name: (Content-Type, body, words of the refusal)
    "71-character boundary with a shortened close delimiter in the file part": (
        content_type(B71),
        form(
            part(b"file", b"RIFF\r\n--" + B70 + b"--\r\n", b"a.wav", boundary=B71),
            part(b"model", b"gpt-4o-transcribe", boundary=B71),
            boundary=B71,
        ),
        "1 to 70 characters",
    ),
    "folded name=\"model\" part header": (
        content_type(BOUNDARY),
        b"--"
        + BOUNDARY
        + b"\r\nContent-Disposition: form-data;\r\n name=\"model\"\r\n\r\ngpt-4o\r\n--"
        + BOUNDARY
        + b"--\r\n",
        "folded",
    ),
    "bare-LF line endings": (
        content_type(BOUNDARY),
        form(part(b"model", b"gpt-4o")).replace(b"\r\n", b"\n"),
        "CRLF",
    ),
    "part headers ended by \\n\\n": (
        content_type(BOUNDARY),
        b"--"
        + BOUNDARY
        + b"\r\nContent-Disposition: form-data; name=\"model\"\n\ngpt-4o\r\n--"
        + BOUNDARY
        + b"--\r\n",
        "CRLF",
    ),
    "preamble without CRLF before the first boundary": (
        content_type(BOUNDARY),
        b"preamble--" + form(part(b"model", b"gpt-4o")),
        "preamble",
    ),
    "preamble with CRLF before the first boundary": (
        content_type(BOUNDARY),
        b"preamble\r\n" + form(part(b"model", b"gpt-4o")),
        "preamble",
    ),
    "unterminated last part": (
        content_type(BOUNDARY),
        part(b"model", b"whisper-1") + part(b"file", b"RIFF", b"a.wav"),
        "close delimiter",
    ),
    "two model parts": (
        content_type(BOUNDARY),
        form(part(b"model", b"whisper-1"), part(b"model", b"whisper-1")),
        "at most one model",
    ),
    "model in another case": (
        content_type(BOUNDARY),
        form(part(b"model", b"whisper-1"), part(b"MODEL", b"gpt-4o")),
        "lower case",
    ),
    "percent-encoded model name": (
        content_type(BOUNDARY),
        form(part(b"mod%65l", b"gpt-4o")),
        "lower case",
    ),
    "delimiter after a bare LF": (
        content_type(BOUNDARY),
        form(
            part(
                b"file",
                b"RIFF\n--"
                + BOUNDARY
                + b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx",
                b"a.wav",
            )
        ),
        "only as a delimiter",
    ),
    "boundary string inside a part": (
        content_type(BOUNDARY),
        form(
            part(b"file", b"RIFF\r\n--" + BOUNDARY + b"X", b"a.wav"), part(b"model", b"whisper-1")
        ),
        "followed by CRLF",
    ),
    "transport padding after a delimiter": (
        content_type(BOUNDARY),
        form(part(b"model", b"whisper-1")).replace(BOUNDARY + b"\r\n", BOUNDARY + b" \t\r\n"),
        "no padding",
    ),
    "epilogue after the close delimiter": (
        content_type(BOUNDARY),
        form(part(b"model", b"whisper-1"))
        + b"--"
        + BOUNDARY
        + b"\r\nContent-Disposition: form-data; "
        b"name=\"model\"\r\n\r\ngpt-4o\r\n--" + BOUNDARY + b"--\r\n",
        "nothing but a CRLF",
    ),
    "escaped quote in a filename hiding a name parameter": (
        content_type(BOUNDARY),
        form(
            b"--"
            + BOUNDARY
            + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\\\"; "
            b"name=\"model\"\r\n\r\ngpt-4o\r\n"
        ),
        "plain parameters",
    ),
    "RFC 2231 name*": (
        content_type(BOUNDARY),
        form(
            b"--"
            + BOUNDARY
            + b"\r\nContent-Disposition: form-data; name=\"file\"; name*=UTF-8''model\r\n"
            b"\r\ngpt-4o\r\n"
        ),
        "without name*",
    ),
    "model part as a file": (
        content_type(BOUNDARY),
        form(part(b"model", b"gpt-4o", b"m.txt")),
        "filename",
    ),
    "model part in base64": (
        content_type(BOUNDARY),
        form(part(b"model", b"Z3B0LTRv", extra=b"Content-Transfer-Encoding: base64\r\n")),
        "not encoded",
    ),
    "model part in UTF-16": (
        content_type(BOUNDARY),
        form(
            part(
                b"model",
                "gpt-4o".encode("utf-16"),
                extra=b"Content-Type: text/plain; charset=utf-16\r\n",
            )
        ),
        "UTF-8",
    ),
    "two boundary parameters": (
        b"multipart/form-data; boundary=" + BOUNDARY + b"; boundary=other",
        form(part(b"model", b"gpt-4o")),
        "exactly one boundary",
    ),
    "boundary hidden in another parameter's quoted value": (
        b'multipart/form-data; x="; boundary=other"; boundary=' + BOUNDARY,
        form(part(b"model", b"gpt-4o")),
        "Content-Type parameters",
    ),
    "media type in another case": (
        b"Multipart/Form-Data; boundary=" + BOUNDARY,
        form(part(b"model", b"gpt-4o")),
        "lower case",
    ),
    "boundary with a character outside bchars": (
        content_type(b"a{b", quoted=True),
        form(part(b"model", b"gpt-4o", boundary=b"a{b"), boundary=b"a{b"),
        "bchars",
    ),
    "part without a Content-Disposition": (
        content_type(BOUNDARY),
        form(b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\ngpt-4o\r\n"),
        "Content-Disposition",
    ),
    "part with no headers at all": (
        content_type(BOUNDARY),
        form(b"--" + BOUNDARY + b"\r\n\r\ngpt-4o\r\n"),
        "Content-Disposition",
    ),
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_multipart_trick_is_refused_naming_the_rule(trick: str) -> None:
    ctype, body, words = TRICKS[trick]
    for cuts in (None, list(range(1, len(body), 7))):
        refused = soakp_reads(body, ctype, cuts)
        assert isinstance(refused, soakp.ApiError), f"{trick} was accepted: {refused}"
        assert words in refused.message and "RFC 2046/7578" in refused.message


def test_strict_reading_still_accepts_what_clients_send() -> None:
    """httpx/requests/curl/browser shapes: quoted and unquoted boundaries of 1 and 70 characters, a
    file part with its Content-Type, the model part anywhere, a model value with UTF-8, no model."""
    for boundary, quoted in (
        (b"x", False),
        (B70, False),
        (b"=_Part 1 (x)/y:z?", True),
        (BOUNDARY, True),
    ):
        body = form(
            part(b"file", b"RIFF\r\n--y\r\n", b"a.wav", b"Content-Type: audio/wav\r\n", boundary),
            part(b"model", "whisper-1-\u00e9".encode(), boundary=boundary),
            part(b"model_extra", b"1", boundary=boundary),
            boundary=boundary,
        )
        assert check_agreement(body, content_type(boundary, quoted), [5, 90, 91, 200])
    assert soakp_reads(form(part(b"purpose", b"fine-tune")), content_type(BOUNDARY)) == []
    assert soakp_reads(form(part(b"model", b"m" * 2000)), content_type(BOUNDARY)) == [
        ""
    ]  # too long: refused
    assert soakp_reads(
        form(part(b"model", b"a", extra=b"Content-Type: text/plain; charset=UTF-8\r\n")),
        content_type(BOUNDARY),
    ) == ["a"]


# Differential: hypothesis-generated bodies ########################################################

NAMES = st.sampled_from(
    [
        b"model",
        b"file",
        b"purpose",
        b"Model",
        b"model ",
        b"modeL",
        b"mod%65l",
        b"m\xc3\xb6del",
        b"prompt",
    ]
)
PIECES = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"--",
        b"-",
        b" ",
        b"\t",
        b'"',
        b"\\",
        b";",
        b"=",
        b"name=\"model\"",
        b"Content-Disposition: form-data; name=\"model\"",
        b"\r\n\r\n",
        b"\n\n",
        b"gpt-4o",
        b"x",
    ]
)


@st.composite
def boundaries(draw: Any) -> tuple[bytes, bool]:
    quoted = draw(st.booleans())
    text = draw(st.text(BCHARS if quoted else TOKEN_BCHARS, min_size=1, max_size=72))
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["{", "\\", '"', ";", "\u00e9", " "]))
    return text.encode(), quoted


@st.composite
def bodies(draw: Any) -> tuple[bytes, bytes]:
    boundary, quoted = draw(boundaries())
    values = st.one_of(
        st.binary(max_size=30),
        st.sampled_from(
            [
                b"gpt-4o",
                b"whisper-1",
                b"",
                b"\r\n--" + boundary[:-1] + b"--",
                b"\r\n--" + boundary + b"x",
                b"\n--" + boundary + b"\r\n",
                b"\r\n--" + boundary[:70] + b"--\r\n",
                b"--" + boundary,
            ]
        ),
    )
    parts = draw(
        st.lists(
            st.tuples(
                NAMES,
                values,
                st.sampled_from([None, b"a.wav"]),
                st.sampled_from([b"", b"Content-Type: text/plain\r\n", b"X-A: b\r\n"]),
            ),
            max_size=4,
        )
    )
    body = form(*(part(n, v, f, e, boundary) for n, v, f, e in parts), boundary=boundary)
    for _ in range(draw(st.integers(0, 3))):  # mutations: insert, delete or replace a few bytes
        at = draw(st.integers(0, len(body)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            body = body[:at] + draw(PIECES) + body[at:]
        elif kind == 1:
            body = body[:at] + body[at + draw(st.integers(1, 4)) :]
        else:
            body = body[:at] + draw(PIECES) + body[at + draw(st.integers(1, 4)) :]
    ctype = content_type(boundary, quoted)
    if draw(st.integers(0, 4)) == 0:  # spellings of the header that parsers read differently
        ctype = draw(st.sampled_from([
            ctype.replace(b"multipart/form-data", b"Multipart/Form-Data"),
            ctype.replace(b"boundary", b"BOUNDARY"),
            ctype.replace(b"; ", b";"),
            ctype.replace(b"; ", b" ; "),
            ctype.replace(b"=", b" = "),
            ctype + b"; charset=utf-8",
            ctype + b";",
            b"multipart/form-data; charset=utf-8; " + ctype.split(b"; ", 1)[1],
            ctype.replace(b"boundary=", b"boundary*="),
            ctype + b"; boundary=other",
        ]))
    return ctype, body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(), st.lists(st.integers(0, 10**6), max_size=6))
def test_multipart_differential_every_accepted_body_reads_the_same_model(
    generated: tuple[bytes, bytes], cuts: list[int]
) -> None:
    ctype, body = generated
    check_agreement(body, ctype, cuts)


def test_multipart_differential_covers_accepted_and_refused_bodies() -> None:
    """The generator is not vacuous: from a fixed seed, a good share of the bodies is accepted (and
    then agreed on by both parsers) and a good share refused."""
    accepted = refused = 0
    rng = random.Random(11)
    for _ in range(400):
        boundary = "".join(rng.choice(TOKEN_BCHARS) for _ in range(rng.randint(1, 70))).encode()
        parts = [
            part(
                rng.choice([b"model", b"file", b"purpose"]),
                rng.choice([b"gpt-4o", b"", os.urandom(20)]),
                rng.choice([None, b"a.wav"]),
                boundary=boundary,
            )
            for _ in range(rng.randint(0, 3))
        ]
        body = form(*parts, boundary=boundary)
        if rng.random() < 0.5:
            at = rng.randint(0, len(body))
            body = body[:at] + rng.choice([b"\n", b"\r\n--" + boundary, b" "]) + body[at:]
        if check_agreement(body, content_type(boundary), [rng.randint(0, 500)]):
            accepted += 1
        else:
            refused += 1
    assert accepted >= 100 and refused >= 100


# Through the real server ##########################################################################


def send(proxy: SoakpProcess, token: str, ctype: bytes, body: bytes) -> RawResponse:
    return proxy.request(
        "POST", TRANSCRIPTIONS, token, [("Content-Type", ctype.decode("latin-1"))], body
    )


def test_multipart_tricks_through_the_server_are_400_and_never_reach_the_upstream(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    token = proxy.mint(models=["whisper-1"])
    for trick in sorted(TRICKS):
        ctype, body, words = TRICKS[trick]
        response = send(proxy, token, ctype, body)
        assert response.status == 400, (trick, response.body)
        error = response.json()["error"]
        assert error["code"] == "multipart_not_strict" and words in error["message"], trick
        assert set(error) == {"message", "type", "param", "code"}
    assert fake_upstream.requests == []


def test_multipart_differential_sample_through_the_server(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """Bodies SOAKP's pure code accepts reach the upstream byte for byte, and both parsers read the
    model SOAKP allowed from what the upstream received; bodies it refuses are 400 and never reach
    it."""
    token = proxy.mint(models=["whisper-1"])
    rng = random.Random(7)
    sent = 0
    for number in range(30):
        boundary = "".join(rng.choice(TOKEN_BCHARS) for _ in range(rng.randint(1, 70))).encode()
        parts = [
            part(b"file", os.urandom(rng.randint(0, 300)), b"a.wav", boundary=boundary),
            part(b"model", b"whisper-1", boundary=boundary),
        ]
        rng.shuffle(parts)
        body = form(*parts, boundary=boundary)
        if number % 3 == 0:  # a trick: a bare LF, a stray delimiter or a lost close delimiter
            body = rng.choice(
                [
                    body.replace(b"\r\n", b"\n", 1),
                    body[:-4],
                    body + b"x",
                    body.replace(b"\r\n\r\n", b"\r\n--" + boundary + b" \r\n\r\n", 1),
                ]
            )
        ctype = content_type(boundary)
        accepted = isinstance(soakp_reads(body, ctype), list)
        response = send(proxy, token, ctype, body)
        if accepted:
            assert response.status == 200, response.body
            record = fake_upstream.wait_for_request(TRANSCRIPTIONS, lambda r, b=body: r.body == b)
            assert (
                python_multipart_reads(record.body, ctype)
                == werkzeug_reads(record.body, ctype)
                == ["whisper-1"]
            )
            sent += 1
        else:
            assert (
                response.status == 400
                and response.json()["error"]["code"] == "multipart_not_strict"
            )
    assert sent >= 15 and len(fake_upstream.requests) == sent


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_multipart_unterminated_streamed_body_never_reaches_the_upstream_whole(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, framing: str
) -> None:
    """The model part first (so SOAKP starts forwarding), then 2 MB of file and no close delimiter:
    the client gets a 400 and the upstream never a complete body, since the last piece waits for the
    close delimiter."""
    token = proxy.mint(models=["whisper-1"])
    body = part(b"model", b"whisper-1") + part(b"file", os.urandom(2 * 1024 * 1024), b"a.wav")
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", content_type(BOUNDARY).decode()),
    ]
    if framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        wire = (
            build_request("POST", TRANSCRIPTIONS, headers)
            + b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks)
            + b"0\r\n\r\n"
        )
    else:
        wire = build_request("POST", TRANSCRIPTIONS, headers, body)
    response = proxy.raw(wire, "POST")
    assert response.status == 400 and "close delimiter" in response.json()["error"]["message"]
    record = fake_upstream.wait_for_request(TRANSCRIPTIONS, complete=True)
    assert not record.complete and record.body_length < len(body)


def test_multipart_without_a_models_limit_stays_passthrough(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """A token without a models limit forwards even a body SOAKP would refuse for a limited one,
    byte for byte: SOAKP reads multipart only to enforce a limit."""
    token = proxy.mint()
    path = "/v1/multipart/passthrough"  # the fake upstream answers 404 without reading the body
    for trick in (
        "bare-LF line endings",
        "unterminated last part",
        "71-character boundary with a shortened close delimiter in the file part",
    ):
        ctype, body, _ = TRICKS[trick]
        response = proxy.request(
            "POST", path, token, [("Content-Type", ctype.decode("latin-1"))], body
        )
        assert response.status == 404
        assert fake_upstream.wait_for_request(
            path, lambda r, b=body: r.body == b
        ).body_length == len(body)
