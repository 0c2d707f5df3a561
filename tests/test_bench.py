"""bench/run.py --quick starts every process and prints a row for every scenario.

These tests check that the harness works, never how fast anything is: speed is what `make bench` is for,
on a quiet machine. They take about 15 s each.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "bench" / "run.py"
QUICK_TIMEOUT_S = 100.0

# Every row the table must have, in order (bench/run.py ROW_IDS).
ROW_IDS = [
    "start_src", "start_pyz", "idle_rss",
    "c1_p50", "c1_p99", "c1_added_p50", "c1_added_p99", "c1_cpu", "c1_cpu_vs_nginx",
    "c16_rps", "c16_cpu", "c16_cpu_vs_nginx", "c64_rps", "c64_cpu", "c64_vs_c16", "upstream_conns",
    "sse_ttfc", "sse_delay_p50", "sse_delay_p99", "sse_coalesced",
    "sse_many_ttfc", "sse_many_delay_p50", "sse_many_delay_p99", "sse_many_cpu",
    "hold_errors", "hold_peak_rss", "held_errors", "held_peak_rss",
]
# Rows whose direct column is a measurement (the others have no direct counterpart).
DIRECT_ROWS = {"c1_p50", "c1_p99", "c16_rps", "c64_rps", "c64_vs_c16", "sse_ttfc", "sse_delay_p50",
               "sse_delay_p99", "sse_coalesced", "sse_many_ttfc", "sse_many_delay_p50",
               "sse_many_delay_p99"}
METRICS = ["start → first proxied answer", "RSS after the first answer", "latency p50", "latency p99",
           "latency added over direct", "proxy CPU per request", "requests/s", "new upstream TLS connections",
           "time to first event", "relay delay per event", "events that arrived together", "held streams",
           "peak RSS while holding them", "proxy CPU per request, against nginx",
           "relay delay per chunk", "proxy CPU per SSE chunk", "streams to their end",
           "peak RSS over those streams"]
# Issue #17's rows and their targets, relative to nginx in the same run.
ISSUE17_TARGETS = {
    "c1_cpu_vs_nginx": "≤ 5× nginx", "c16_cpu_vs_nginx": "≤ 5× nginx",
    "sse_many_ttfc": "≤ nginx + 0.5", "sse_many_delay_p50": "≤ nginx + 0.15",
    "sse_many_delay_p99": "≤ nginx + 0.5", "sse_many_cpu": "≤ 2× nginx",
    "held_errors": "0", "held_peak_rss": "≤ 1.5× nginx",
}


def run_quick(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """Run `bench/run.py --quick`; on timeout SIGTERM it, so that it stops what it started."""
    report = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "--quick", "--json", str(report), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        out, err = proc.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"bench/run.py --quick took over {QUICK_TIMEOUT_S}s:\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out, json.loads(report.read_text())


def is_measured(value: object) -> bool:
    return isinstance(value, (int, float)) or isinstance(value, str) and value[:1].isdigit()


def check_rows(out: str, report: dict) -> dict[str, dict]:
    rows = {row["id"]: row for row in report["rows"]}
    assert [row["id"] for row in report["rows"]] == ROW_IDS
    for metric in METRICS:
        assert metric in out, f"no {metric!r} row in the table:\n{out}"
    for row_id in ROW_IDS:
        soakp = rows[row_id]["soakp"]
        if row_id == "start_pyz":
            continue  # dist/soakp.pyz is another target's build product: absent, stale or broken, the row is there
        assert is_measured(soakp), f"{row_id}: SOAKP gave {soakp!r}"
        if row_id in DIRECT_ROWS:
            assert is_measured(rows[row_id]["direct"]), f"{row_id}: direct gave {rows[row_id]['direct']!r}"
    return rows


def check_issue17(out: str, report: dict, rows: dict[str, dict], paths: tuple[str, ...]) -> None:
    """Issue #17's scenarios ran in their shape: every chunk of every SSE stream arrived, every
    held stream got all its chunks, the proxy's CPU per chunk was measured, and the rows carry the
    issue's targets."""
    plan = report["meta"]["plan"]
    assert f"POST a {len(load_bench_clients().CHAT_BODY)}-byte chat completion" in out
    for row_id, target in ISSUE17_TARGETS.items():
        assert rows[row_id]["target"] == target, f"{row_id}: target {rows[row_id]['target']!r}"
    expected = plan["sse_many_connections"] * plan["sse_many_rounds"] * plan["sse_many_chunks"]
    for path in paths:
        sse = report["results"]["sse_many"][path]
        assert (sse["events"], sse["errors"]) == (expected, 0), f"sse_many/{path}: {sse}"
    for path in (p for p in paths if p != "direct"):
        assert report["results"]["sse_many"][path]["cpu_us_per_chunk"] > 0, path
        held = report["results"]["held"][path]
        chunks = plan["held_streams"] * plan["held_chunks"]
        assert (held["errors"], held["events"]) == (0, chunks), f"held/{path}: {held}"
    assert rows["held_errors"]["scenario"] == (
        f"hold {plan['held_streams']}x{plan['held_chunks'] * plan['held_interval_ms'] / 1000:g}s")


def test_quick_bench_prints_every_scenario(tmp_path: Path) -> None:
    out, report = run_quick(tmp_path)
    rows = check_rows(out, report)
    nginx_installed = report["meta"]["nginx"] != "not installed"
    for row_id in ROW_IDS:
        nginx = rows[row_id]["nginx"]
        if row_id in ("start_pyz", "c1_added_p50", "c1_added_p99") or nginx is None:
            continue
        assert is_measured(nginx) if nginx_installed else nginx == "not installed", f"{row_id}: nginx {nginx!r}"
    paths = ("direct", "soakp", "nginx") if nginx_installed else ("direct", "soakp")
    check_issue17(out, report, rows, paths)
    if nginx_installed:  # every target against nginx has a verdict
        assert all(isinstance(rows[row_id]["ok"], bool) for row_id in ISSUE17_TARGETS)


def test_quick_bench_without_wrk_or_nginx_uses_the_python_fallbacks(tmp_path: Path) -> None:
    out, report = run_quick(tmp_path, "--without", "wrk", "--without", "nginx")
    rows = check_rows(out, report)
    assert "bench/clients.py" in report["meta"]["load_generator"]
    assert rows["c16_rps"]["nginx"] == "skipped"
    check_issue17(out, report, rows, ("direct", "soakp"))
    assert rows["sse_many_cpu"]["nginx"] == "skipped" and rows["sse_many_cpu"]["ok"] is None


def load_bench_clients() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_clients", ROOT / "bench" / "clients.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rate_runs_send_issue_17s_request_and_get_its_answer() -> None:
    """The c=1/16/64 runs are issue #17's POST: a ~230-byte chat completion out, ~600 bytes back.
    wrk and the fallback client send the same body: wrk.lua has none of its own."""
    from fake_upstream import BENCH_CHAT_COMPLETION, bench_json_reply

    body = load_bench_clients().CHAT_BODY
    assert 200 <= len(body) <= 260 and json.loads(body)["messages"][-1]["role"] == "user"
    assert 550 <= len(bench_json_reply(BENCH_CHAT_COMPLETION)) <= 650
    wrk_lua = (ROOT / "bench" / "wrk.lua").read_text()
    assert 'os.getenv("BENCH_BODY")' in wrk_lua and "messages" not in wrk_lua


def test_shared_state_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    """bench/shared_state.py (what --redis costs, the end of a full `make bench`): a short run starts its
    Redis, upstream and SOAKPs and prints every row. It once broke when its upstream moved, unseen,
    because only full runs reach it."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "shared_state.py"), "--requests", "60"],
                            capture_output=True, text=True, timeout=QUICK_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("c=1 latency, p50 (ms)", "SOAKP CPU per request (ms)", "Redis scripts (round trips) per request",
                "Redis commands per request"):
        assert row in result.stdout, result.stdout
