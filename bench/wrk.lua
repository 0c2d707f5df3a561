-- wrk script for bench/run.py: POST one chat completion with the Authorization header from BENCH_AUTH
-- and the body from BENCH_BODY (bench/clients.py CHAT_BODY, which bench/run.py hands over, so that wrk
-- and the fallback client send the same bytes), then print one machine-readable line (the same one
-- bench/clients.py `load` prints).
-- Latencies are wrk's, in microseconds; `errors` counts socket errors and timeouts, `non2xx` answers
-- whose status was not 2xx (wrk's summary.errors.status).

wrk.method = "POST"
wrk.body = assert(os.getenv("BENCH_BODY"), "BENCH_BODY is not set (bench/run.py sets it)")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d errors=%d non2xx=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d\n",
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
