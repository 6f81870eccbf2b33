#!/usr/bin/env bash
# Where the sidecar's CPU time per request goes, by crate: perf samples the
# loaded sidecar (cpu-clock, so it works without hardware counters, as in
# this project's VMs) while wrk drives it as bench/bench.sh does (-t1 -c50,
# 2 workers), once on the proxied route (GET /api/stats) and once on cache
# hits (POST /api/search, one body). The CPU time per request (user +
# kernel, from /proc/PID/stat around the run) is split by the share of
# samples in the kernel and in each group of user-space symbols.
#
# This is the evidence for the budget argument in docs/benchmarks.md
# ("Where the time goes"):
# to match nginx's throughput on the proxied route the sidecar's user time
# would have to fit in what nginx spends beyond the kernel work both share.
# Needs perf (Debian linux-perf) and the `profiling` build (release with
# symbols): `cargo build --profile profiling --bins`. Not part of `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/profiling}
DURATION=${DURATION:-8}
. bench/lib.sh
need wrk wrk
need perf linux-perf
[ -x "$BIN/rag-sidecar" ] || { echo "no $BIN/rag-sidecar: cargo build --profile profiling --bins" >&2; exit 1; }

up=$(free_port); sc=$(free_port)
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
start_sidecar "$sc" "$up" config/rag-sidecar.toml ENABLE_RATE_LIMIT=False
curl -fsS -X POST -H 'Content-Type: application/json' -d '{"query": "Học máy là gì?", "top_k": 5}' \
  "http://127.0.0.1:$sc/api/search" >/dev/null
# The sidecar's CPU ticks, user + kernel (lib.sh's ticks gives the two).
cpu_ticks() { ticks "$sidecar_pid" | awk '{print $1 + $2}'; }

profile() { # profile SLUG NAME SCRIPT PATH
  local slug=$1 name=$2 script=$3 path=$4
  wrk -t1 -c50 -d2s -s "$script" "http://127.0.0.1:$sc$path" >/dev/null   # warm-up
  # A run without perf gives the CPU time per request (perf's own
  # interrupts would inflate it), then a run of the same length under perf
  # gives the shares.
  local t0 t1 line requests cpu_us
  t0=$(cpu_ticks)
  line=$(wrk -t1 -c50 -d"${DURATION}s" -s "$script" "http://127.0.0.1:$sc$path" | grep '^RESULT')
  t1=$(cpu_ticks)
  requests=${line#*requests=}; requests=${requests%% *}
  cpu_us=$(awk -v a="$t0" -v b="$t1" -v hz="$clk" -v n="$requests" 'BEGIN {printf "%.2f", (b - a) * 1e6 / hz / n}')
  perf record -q -e cpu-clock -F 999 -p "$sidecar_pid" -o "$work/$slug.data" -- sleep "$DURATION" 2>/dev/null &
  local perf_pid=$!
  wrk -t1 -c50 -d"${DURATION}s" -s "$script" "http://127.0.0.1:$sc$path" >/dev/null
  wait "$perf_pid" || true
  perf report -q -i "$work/$slug.data" --no-children --sort dso,sym -g none 2>/dev/null |
    python3 bench/profile_groups.py "$name" "$requests" "$DURATION" "$cpu_us"
}

profile proxied "proxied (GET /api/stats)" bench/report.lua /api/stats
profile hit "cache hit (POST /api/search)" bench/post.lua /api/search
