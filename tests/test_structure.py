"""Issue 12, structure: one chunked decoder for requests and answers, fuzzed in both modes.

The request side reads exactly what the decoder asks for (ChunkedDecoder.next_read), so that a client's
next pipelined request is never consumed with the body; the answer side feeds whatever arrived.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import soakp


def encode(chunks: list[bytes], trailers: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks if c)
    return body + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def pull(decoder: soakp.ChunkedDecoder, wire: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """Read `wire` the way read_request_body reads a socket: a line when the decoder wants one, else at
    most what it asks for (and, from `cuts`, sometimes less). Returns the payload and what was read."""
    out, pos, turn = [], 0, 0
    while not decoder.done:
        wanted = decoder.next_read()
        if wanted:
            size = min(wanted, cuts[turn % len(cuts)]) if cuts else wanted
            data, turn = wire[pos:pos + max(1, size)], turn + 1
        else:
            eol = wire.find(b"\r\n", pos)
            assert eol != -1, "the decoder asked for a line the wire does not have"
            data = wire[pos:eol + 2]
        assert data, "read past the end of the wire"
        pos += len(data)
        out.append(decoder.feed(data))
    return b"".join(out), pos


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8),
       trailers=st.lists(st.sampled_from([b"X-Checksum: abc", b"Server-Timing: db;dur=5"]), max_size=2),
       tail=st.binary(max_size=50), cuts=st.lists(st.integers(1, 64), max_size=5))
def test_request_mode_reads_exactly_the_body_and_never_its_successor(
    chunks: list[bytes], trailers: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    wire = encode(chunks, trailers)
    decoder = soakp.ChunkedDecoder(max_body_bytes=10_000, check_trailers=True)
    payload, read = pull(decoder, wire + tail, cuts)
    assert payload == b"".join(chunks)
    assert read == len(wire) and decoder.leftover == b""


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8), tail=st.binary(max_size=50),
       cuts=st.lists(st.integers(1, 200), min_size=1, max_size=6))
def test_answer_mode_decodes_whatever_arrived_and_keeps_what_follows(
    chunks: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    wire = encode(chunks, []) + tail
    decoder = soakp.ChunkedDecoder()
    out, pos, turn = [], 0, 0
    while pos < len(wire) and not decoder.done:
        size = cuts[turn % len(cuts)]
        out.append(decoder.feed(wire[pos:pos + size]))
        pos, turn = pos + size, turn + 1
    assert decoder.done and b"".join(out) == b"".join(chunks)
    assert decoder.leftover + wire[pos:] == tail


@pytest.mark.parametrize("wire, status", [
    (b"5\r\nhelloXX0\r\n\r\n", 400), (b"zz\r\n", 400), (b"1" * 5000 + b"\r\n", 400),
    (b"2711\r\n", 413), (b"0\r\nBad Field\r\n\r\n", 400), (b"0\r\n" + b"X-Pad: " + b"p" * 70000 + b"\r\n\r\n", 431),
])
def test_request_mode_refuses_with_the_status_a_client_is_told(wire: bytes, status: int) -> None:
    decoder = soakp.ChunkedDecoder(max_body_bytes=10_000, check_trailers=True)
    with pytest.raises(soakp.FramingError) as info:
        decoder.feed(wire)
        decoder.feed(b"")  # payload decoded before the fault is handed on first; the fault comes next
    assert info.value.status == status


def test_answer_mode_drops_trailers_unchecked() -> None:
    decoder = soakp.ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\nBad Field\r\n\r\n") == b"abc" and decoder.done


def answer(*lines: bytes, method: str = "GET") -> soakp.ResponseHead:
    return soakp.parse_response_head(b"\r\n".join(lines) + b"\r\n\r\n", method)


@pytest.mark.parametrize("head, minor, strip, expected", [
    ((b"HTTP/1.1 200 OK", b"Content-Length: 10"), 1, False, ("length", True, False, True)),
    ((b"HTTP/1.1 200 OK", b"Content-Length: 100000"), 1, False, ("length", True, False, False)),
    ((b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), 1, False, ("chunked", True, False, False)),
    ((b"HTTP/1.1 200 OK", b"Connection: close"), 1, False, ("chunked", True, False, False)),
    ((b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), 0, False, ("close", False, False, False)),
    ((b"HTTP/1.1 200 OK", b"Content-Length: 10"), 1, True, ("chunked", True, True, False)),
    ((b"HTTP/1.1 200 OK", b"Content-Length: 10", b"Content-Encoding: gzip"), 1, True, ("length", True, False, True)),
    ((b"HTTP/1.1 400 Bad Request", b"Content-Length: 10"), 1, True, ("length", True, False, True)),
    ((b"HTTP/1.1 204 No Content",), 1, False, ("none", True, False, True)),
])
def test_plan_answer_frames_each_answer_for_the_client(head: tuple[bytes, ...], minor: int, strip: bool,
                                                       expected: tuple[str, bool, bool, bool]) -> None:
    """The response planner: the upstream's framing is kept where it can be; unknown lengths go chunked
    to HTTP/1.1 clients and end by close for HTTP/1.0; taking the usage event out changes the length."""
    plan = soakp.plan_answer(answer(*head), minor, True, strip)
    assert (plan.framing, plan.keep_alive, plan.strip_usage_event, plan.whole) == expected


def test_client_head_follows_the_plan_not_the_upstream() -> None:
    resp = answer(b"HTTP/1.1 200 OK", b"Content-Length: 10", b"Content-Type: text/event-stream")
    head = soakp.build_client_head(resp, soakp.plan_answer(resp, 1, True, True))
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head
    assert resp.body_kind == "length" and resp.content_length == 10  # the upstream's head is left as it was


def test_requests_and_answers_look_headers_up_alike() -> None:
    """ResponseHead.header() used to answer None for any header it had not indexed, present or not."""
    resp = answer(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Openai-Processing-Ms: 7")
    assert resp.header(b"openai-processing-ms") == b"7" and resp.header(b"x-missing") is None
    head = soakp.parse_request_head(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Custom: 1\r\n\r\n")
    assert head.header(b"x-custom") == b"1" and head.header(b"host") == b"x"


# The module's shape (issue 12) ##############################################################################

SOURCE = (Path(__file__).resolve().parents[1] / "soakp.py").read_text()
MAX_FUNCTION_LINES = 80


def top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.If):  # a definition that depends on the Python version
        return [n for sub in node.body for n in top_level_names(sub)]
    return []


def test_every_name_is_defined_in_its_own_section_or_an_earlier_one() -> None:
    """Read top to bottom: code in section N uses only names of sections 1..N (annotations aside, which
    are strings here). A banner `# N. ...` starts each section."""
    starts = [(number + 1, int(m[1])) for number, line in enumerate(SOURCE.splitlines())
              if (m := re.match(r"# (\d)\. ", line))]
    assert [n for _, n in starts] == list(range(1, len(starts) + 1)) and len(starts) >= 8

    def section(line: int) -> int:
        return max((n for start, n in starts if line >= start), default=0)

    tree = ast.parse(SOURCE)
    defined = {}
    for node in tree.body:
        for name in top_level_names(node):
            defined.setdefault(name, section(node.lineno))

    class Uses(ast.NodeVisitor):
        def __init__(self, here: int) -> None:
            self.here, self.late = here, []

        def visit_arg(self, node: ast.arg) -> None:  # annotations are not run
            pass

        def visit_AnnAssign(self, node: ast.AnnAssign) -> None:  # noqa: N802
            if node.value is not None:
                self.visit(node.value)

        def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:  # noqa: N802
            for child in (*node.decorator_list, *node.args.defaults, *node.body):
                self.visit(child)
            for default in node.args.kw_defaults:
                if default is not None:
                    self.visit(default)

        visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

        def visit_Name(self, node: ast.Name) -> None:  # noqa: N802
            if isinstance(node.ctx, ast.Load) and defined.get(node.id, 0) > self.here:
                self.late.append(f"line {node.lineno}: {node.id} (section {defined[node.id]})")

    late = []
    for node in tree.body:
        uses = Uses(section(node.lineno))
        uses.visit(node)
        late += uses.late
    assert late == []


def test_no_function_is_longer_than_80_lines() -> None:
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
