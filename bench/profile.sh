#!/usr/bin/env bash
# Where SOAKP's time per request goes: SOAKP under py-spy (when installed next to the interpreter or on
# PATH; else cProfile) while wrk sends chat completions at concurrency 16, then the top 25 functions by
# cumulative and by own time, in microseconds per request.
#   bench/profile.sh                                   python3 runs soakp
#   bench/profile.sh --python /tmp/venv/bin/python     another interpreter (one with uvloop, say)
#   bench/profile.sh --profile cprofile --quick        force cProfile; 2 s instead of 10 s
# Any bench/run.py flag works; a later --profile overrides the default.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
exec "$python" bench/run.py --profile auto "$@"
