#!/usr/bin/env bash
# This build against another, alone: two sidecars as shipped (rate limits
# off) over one fast mock app, wrk alternating between them round by round;
# prints the medians and the median of the per-round ratios this/baseline,
# for cache hits (POST /api/search, same body) and proxied requests
# (GET /api/stats). A longer look than bench.sh's BASELINE rounds when
# those straddle 1.0. On 127.0.0.1, bounded in rounds and time.
# Usage: BASELINE=<dir holding the other rag-sidecar> bash bench/ab.sh
# Knobs: ROUNDS (12), DURATION (3s), CONNECTIONS (50), BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BASELINE:?set BASELINE to the directory of the other build}"
ROUNDS=${ROUNDS:-12}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-50}
BIN=${BIN:-target/release}
. bench/lib.sh
need wrk wrk

up=$(free_port); new=$(free_port); old=$(free_port)
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
start_sidecar "$new" "$up" config/rag-sidecar.toml ENABLE_RATE_LIMIT=False
SIDECAR_BIN=$(realpath "$BASELINE/rag-sidecar") start_sidecar "$old" "$up" "$(baseline_config)" ENABLE_RATE_LIMIT=False

for what in "hits bench/post.lua /api/search" "proxied bench/report.lua /api/stats"; do
  set -- $what
  out="$work/$1.txt"
  for r in $(seq "$ROUNDS"); do
    for c in new old; do
      port=$new; [ "$c" = old ] && port=$old
      echo "$c $(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$2" "http://127.0.0.1:$port$3" | grep '^RESULT')" >> "$out"
    done
  done
  python3 - "$1" "$out" <<'PY'
import statistics, sys
rows = {"new": [], "old": []}
for line in open(sys.argv[2]):
    c, _, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    rows[c].append(int(d["requests"]) / (int(d["duration_us"]) / 1e6))
r = sorted(n / o for n, o in zip(rows["new"], rows["old"]))
print(f"{sys.argv[1]}: this build {statistics.median(rows['new']):,.0f} requests/s, baseline "
      f"{statistics.median(rows['old']):,.0f}; per-round this/baseline median {statistics.median(r):.3f}x "
      f"(range {r[0]:.3f}-{r[-1]:.3f}, {len(r)} rounds)")
PY
done
echo "machine: $(nproc) cores; $(date -u +%Y-%m-%d); wrk -t1 -c$CONNECTIONS -d$DURATION x $ROUNDS rounds, alternating"
