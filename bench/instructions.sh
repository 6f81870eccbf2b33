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
# rate limiting on at a limit that never rejects, and spans exported at a
# sample ratio of 0.01 and of 1.0 (to a Python OTLP sink answering 200; the
# export itself runs on the batch processor's thread, not counted here:
# bench/traces.sh has its throughput cost). Then a cache hit (the
# same POST /api/search, as shipped) and the floor, examples/hyper_floor.rs
# (bare hyper answering the hit's bytes) with and without hyper's
# header-read timer: what the stack costs above hyper, and what the timer
# costs; and the proxying floor (hyper_floor --proxy) on the proxied request. Valgrind's CPU has no SHA extensions, so the hit's SHA-256 runs the
# portable code here (the real CPU's SHA-NI path is much cheaper): the hit's
# count overstates the key's share.
# Used by `make bench` (after the release build). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
. bench/lib.sh
need valgrind valgrind

up=$(free_port)
start_app "$up" --search-latency-ms 0
printf '[retry]\nenabled = false\n[circuit_breaker]\nenabled = false\n' > "$work/resilience-off.toml"
# The OTLP/HTTP sink of the exporting configurations.
sink=$(free_port)
python3 - "$sink" <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
pids+=($!); wait_port "$sink"
export_at() { echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$1"; }
FLOOR=${FLOOR:-target/release/examples/hyper_floor}
# The floor answers as many bytes as the sidecar's hit (the mock's search).
hit_bytes=$(curl -s -X POST -H 'Content-Type: application/json' \
  -d '{"query": "Học máy là gì?", "top_k": 5}' "http://127.0.0.1:$up/api/search" | wc -c)

instructions() { # instructions CONFIG ENV N [KIND] → total instructions of the sidecar
  local port; port=$(free_port)
  env LOG_LEVEL=warn ENABLE_RATE_LIMIT=False NUM_THREADS=1 $2 valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$work/cg.out" "$BIN/rag-sidecar" --config "$1" \
    --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up" 2>/dev/null &
  count "$!" "$port" "$3" "${4:-proxied}"
}

floor_instructions() { # floor_instructions FLAGS N [KIND] → total instructions of the floor
  local port; port=$(free_port)
  # KIND proxied: the proxying floor (hyper_floor --proxy), GET /api/stats.
  local what=("$hit_bytes")
  [ "${3:-hit}" = proxied ] && what=(--proxy "127.0.0.1:$up")
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/cg.out" \
    "$FLOOR" "127.0.0.1:$port" 1 "${what[@]}" $1 2>/dev/null &
  count "$!" "$port" "$2" "${3:-hit}"
}

count() { # count PID PORT N KIND: sends N requests, stops PID, prints its main thread's total
  local pid=$1
  wait_port "$2"
  send_requests "$2" "$3" "$4"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$work"/cg.out-01
  rm -f "$work"/cg.out*
}

per_request() { # per_request NAME CONFIG ENV [KIND]
  local a b
  a=$(instructions "$2" "$3" 1000 "${4:-}"); b=$(instructions "$2" "$3" 3000 "${4:-}")
  echo "$1 $(( (b - a) / 2000 ))"
}

floor_per_request() { # floor_per_request NAME FLAGS [KIND]
  local a b
  a=$(floor_instructions "$2" 1000 "${3:-}"); b=$(floor_instructions "$2" 3000 "${3:-}")
  echo "$1 $(( (b - a) / 2000 ))"
}

{
  per_request shipped config/rag-sidecar.toml "X=1"
  per_request resilience-off "$work/resilience-off.toml" "X=1"
  per_request metrics-off config/rag-sidecar.toml "ENABLE_METRICS=False"
  per_request rate-limit-on config/rag-sidecar.toml "ENABLE_RATE_LIMIT=True DEFAULT_RATE_LIMIT=1000000000/minute"
  per_request traces-0.01 config/rag-sidecar.toml "$(export_at 0.01)"
  per_request traces-1.0 config/rag-sidecar.toml "$(export_at 1.0)"
  per_request hit config/rag-sidecar.toml "X=1" hit
  floor_per_request floor ""
  floor_per_request floor-no-timer --no-timer
  floor_per_request floor-proxy "" proxied
} > "$work/figures"
python3 - "$work/figures" <<'PY'
import sys
f = dict(l.split() for l in open(sys.argv[1]))
s, r, m, l, t1, t100, h, fl, fn, fp = (int(f[k]) for k in ("shipped", "resilience-off", "metrics-off", "rate-limit-on", "traces-0.01", "traces-1.0", "hit", "floor", "floor-no-timer", "floor-proxy"))
print("Instructions per request in the sidecar (callgrind, 1 worker, GET default route):\n")
print("| configuration | instructions/request | layer's share |")
print("|---|---:|---:|")
print(f"| as shipped | {s:,} | |")
print(f"| retry + circuit off | {r:,} | retry + circuit: {s - r:,} ({(s - r) / r * 100:.1f} % of the rest) |")
print(f"| metrics off | {m:,} | metrics: {s - m:,} ({(s - m) / m * 100:.1f} % of the rest) |")
print(f"| rate limiting on (never rejecting) | {l:,} | rate limiting: {l - s:,} ({(l - s) / s * 100:.1f} % of the rest) |")
print(f"| spans exported, ratio 0.01 | {t1:,} | export at 0.01: {t1 - s:,} ({(t1 - s) / s * 100:.1f} %) |")
print(f"| spans exported, ratio 1.0 | {t100:,} | export at 1.0: {t100 - s:,} ({(t100 - s) / s * 100:.1f} %) |")
print(f"| the proxying floor (hyper_floor --proxy) | {fp:,} | the stack above it: {s - fp:,} |")
print()
print("A cache hit (POST /api/search, the same body) and the floor (examples/hyper_floor.rs:")
print("bare hyper answering the hit's bytes, 1 worker), instructions per request:\n")
print("| what | instructions/request |")
print("|---|---:|")
print(f"| rag-sidecar, cache hit (as shipped) | {h:,} |")
print(f"| hyper floor, header-read timer on (the sidecar's setting) | {fl:,} |")
print(f"| hyper floor, no timer | {fn:,} |")
print(f"\n- hyper's header-read timer: {fl - fn:,} instructions per request; the stack above hyper on a hit: {h - fl:,}")
PY
