#!/usr/bin/env bash
# What each optional layer costs the sidecar, in instructions per request:
# callgrind counts instructions, not seconds, so the figures repeat whatever
# else the machine is doing (unlike throughput on a noisy 2-core machine).
# The sidecar runs one worker under callgrind; a client sends N sequential
# GET /api/stats (default route, not cached) through it; the difference
# between N=1000 and N=3000 divided by 2000 removes start-up and shutdown.
# Only the thread that serves requests is counted (--separate-threads): the
# system monitor's /proc reads run on the blocking pool at their own pace and
# would otherwise add a time-dependent share to every request.
# Configurations: as shipped (retry, circuit breaking and metrics on, rate
# limits off as in bench.sh), retry and circuit breaking off, metrics off,
# and rate limiting on at a limit that never rejects.
# Used by `make bench` (after the release build). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
. bench/lib.sh
need valgrind valgrind

up=$(free_port)
start_app "$up" --search-latency-ms 0
printf '[retry]\nenabled = false\n[circuit_breaker]\nenabled = false\n' > "$work/resilience-off.toml"

instructions() { # instructions CONFIG ENV N → total instructions of the sidecar
  local port; port=$(free_port)
  env LOG_LEVEL=warn ENABLE_RATE_LIMIT=False NUM_THREADS=1 $2 valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$work/cg.out" "$BIN/rag-sidecar" --config "$1" \
    --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up" 2>/dev/null &
  local pid=$!
  wait_port "$port"
  python3 - "$port" "$3" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    c.request("GET", "/api/stats"); r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$work"/cg.out-01
  rm -f "$work"/cg.out*
}

per_request() { # per_request NAME CONFIG ENV
  local a b
  a=$(instructions "$2" "$3" 1000); b=$(instructions "$2" "$3" 3000)
  echo "$1 $(( (b - a) / 2000 ))"
}

{
  per_request shipped config/rag-sidecar.toml "X=1"
  per_request resilience-off "$work/resilience-off.toml" "X=1"
  per_request metrics-off config/rag-sidecar.toml "ENABLE_METRICS=False"
  per_request rate-limit-on config/rag-sidecar.toml "ENABLE_RATE_LIMIT=True DEFAULT_RATE_LIMIT=1000000000/minute"
} > "$work/figures"
python3 - "$work/figures" <<'PY'
import sys
f = dict(l.split() for l in open(sys.argv[1]))
s, r, m, l = (int(f[k]) for k in ("shipped", "resilience-off", "metrics-off", "rate-limit-on"))
print("Instructions per request in the sidecar (callgrind, 1 worker, GET default route):\n")
print("| configuration | instructions/request | layer's share |")
print("|---|---:|---:|")
print(f"| as shipped | {s:,} | |")
print(f"| retry + circuit off | {r:,} | retry + circuit: {s - r:,} ({(s - r) / r * 100:.1f} % of the rest) |")
print(f"| metrics off | {m:,} | metrics: {s - m:,} ({(s - m) / m * 100:.1f} % of the rest) |")
print(f"| rate limiting on (never rejecting) | {l:,} | rate limiting: {l - s:,} ({(l - s) / s * 100:.1f} % of the rest) |")
PY
