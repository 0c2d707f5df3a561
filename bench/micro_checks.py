"""Per-request cost of SOAKP's token checks, in microseconds: revocation and permissions (issue #3).

    python bench/micro_checks.py [--number N] [--repeat R]

Times, with timeit, the calls every proxied request makes before anything goes upstream:
  verify      TokenCache.verify for a token already verified once (a dict lookup, then the revocation
              check), with 0, 10,000 and 1,000,000 other jtis revoked; and the first, uncached verify
              (HMAC + AES-GCM) for scale
  perms       check_permissions for a token carrying every claim (paths, origins, rpm, budget)
  rate        RateLimiter.acquire on its own
  model       json_model on a small chat body (what a models-limited token adds per request)
Each figure is the best of R repeats of N calls, divided by N. No sockets, no files: the registry is
:memory: and nothing is forwarded. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import sys
import time
import timeit
from pathlib import Path
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import soakp  # noqa: E402 - after the path is set, so the repository's soakp.py is the one timed

SECRET = "bench-micro-checks-secret-" + "0" * 20
KEY = "sk-bench-" + "k" * 40
ORIGIN = "https://app.example.com"
CHAT_BODY = json.dumps({"model": "gpt-4o-mini", "stream": True,
                        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": "Say hello."}]}).encode()
REVOKED_COUNTS = (0, 10_000, 1_000_000)
ALL_CLAIMS = {"paths": ["/v1/chat/completions", "/v1/audio/*"], "models": ["gpt-4o-mini", "whisper-1"],
              "rpm": soakp.MAX_RPM, "origins": [ORIGIN, "http://localhost:5173"], "max_tokens_total": 10**9}


def best_us(call: Callable[[], Any], number: int, repeat: int, before_each: Callable[[], None] | None = None) -> float:
    """The fastest of `repeat` runs of `number` calls, in microseconds per call."""
    runs = []
    for _ in range(repeat):
        if before_each is not None:
            before_each()
        runs.append(timeit.Timer(call).timeit(number) / number * 1e6)
    return min(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat (default 200000)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats; the best is kept (default 5)")
    args = parser.parse_args()
    number, repeat = args.number, args.repeat
    if not 1 <= number <= soakp.MAX_RPM or not 1 <= repeat <= 100:
        parser.error(f"--number must be 1..{soakp.MAX_RPM} (the rpm claim's ceiling) and --repeat 1..100")

    config, _ = soakp.load_config(["serve", "--secret", SECRET, "--db", ":memory:"], {})
    state = soakp.build_state(config)
    rows: list[tuple[str, float]] = []
    try:
        now = time.time()
        grant = soakp.parse_grant({"key": KEY, **ALL_CLAIMS}, config.token_ttl_s, config.max_token_ttl_s)
        minted = soakp.new_token(state.current_keys, grant, int(now))
        token = minted.token

        rows.append(("verify, first time (HMAC + AES-GCM, uncached)",
                     best_us(lambda: soakp.verify_token(token, state.keyring, now), max(1, number // 20), repeat)))
        for count in REVOKED_COUNTS:
            revoked = {soakp.b64url_encode(secrets.token_bytes(16)): int(now) + 3600 for _ in range(count)}
            cache = soakp.TokenCache(state.keyring, revoked)
            cache.verify(token, now)
            rows.append((f"verify, cached, {count:,} revoked",
                         best_us(lambda cache=cache: cache.verify(token, now), number, repeat)))

        claims = state.tokens.verify(token, now)
        head = soakp.parse_request_head(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: soakp.example.com\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nOrigin: " + ORIGIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(CHAT_BODY))

        def fresh_limiter() -> None:  # rpm is the claim's ceiling: `number` calls stay within one burst
            state.rate = soakp.RateLimiter()

        rows.append(("check_permissions, every claim",
                     best_us(lambda: soakp.check_permissions(state, claims, head, "/v1/chat/completions", now),
                             number, repeat, fresh_limiter)))
        limiter = soakp.RateLimiter()
        rows.append(("RateLimiter.acquire",
                     best_us(lambda: limiter.acquire(claims.jti, soakp.MAX_RPM, now), number, repeat,
                             lambda: limiter.next_free.clear())))
        rows.append((f"json_model + check_model, {len(CHAT_BODY)}-byte chat body",
                     best_us(lambda: soakp.check_model(ALL_CLAIMS["models"], soakp.json_model(CHAT_BODY)),
                             max(1, number // 4), repeat)))
    finally:
        state.registry.close()

    print(f"# soakp {soakp.__version__}, Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.machine()}; best of {repeat} x {number} calls")
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:8.3f} us")
    cached = dict(rows)[f"verify, cached, {REVOKED_COUNTS[-1]:,} revoked"]
    total = cached + dict(rows)["check_permissions, every claim"]
    print(f"{'per request: cached verify + check_permissions':<{width}}  {total:8.3f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
