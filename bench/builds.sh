#!/usr/bin/env bash
# Builds of the sidecar against each other, alone: each as shipped (its own
# checkout's config when it has one, rate limits off) over one fast mock
# app, wrk alternating between them round by round (bench/lib.sh's
# run_rounds); prints the table of medians (throughput, p50, p99, CPU per
# request), each build's per-round ratio to the first, and every round's p99
# (a tail can split between rounds). On 127.0.0.1, bounded in rounds and time.
# Usage: bash bench/builds.sh NAME=DIR [NAME=DIR ...]   (DIR holds rag-sidecar;
#        the first is the reference)
# Knobs: WHAT (proxied: GET /api/stats; hits: POST /api/search, one body),
# ROUNDS (8), DURATION (3s), CONNECTIONS (32), WORKERS (2), BIN (the mock
# app's directory, target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash bench/builds.sh NAME=DIR NAME=DIR ..." >&2; exit 2; }
WHAT=${WHAT:-proxied}
ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-32}
BIN=${BIN:-target/release}
. bench/lib.sh
need wrk wrk
case $WHAT in
  proxied) script=bench/report.lua path=/api/stats ;;
  hits) script=bench/post.lua path=/api/search ;;
  *) echo "WHAT is proxied or hits" >&2; exit 2 ;;
esac

up=$(free_port)
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
contenders=(); names=()
for kv in "$@"; do
  name=${kv%%=*}; dir=$(realpath "${kv#*=}"); port=$(free_port)
  SIDECAR_BIN=$dir/rag-sidecar start_sidecar "$port" "$up" "$(baseline_config "$dir")" ENABLE_RATE_LIMIT=False
  cpu_of[$name]=$sidecar_pid
  contenders+=("$name=http://127.0.0.1:$port$path"); names+=("$name")
done
run_rounds "$work/rounds.txt" "$script" "${contenders[@]}"

python3 - "$work/rounds.txt" "$WHAT" "${names[@]}" <<'PY'
import sys
sys.path.insert(0, "bench")
from tables import table, paired
path, what, names = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"{what}:\n")
table(path, names)
for n in names[1:]:
    r, lo, hi = paired(path, n, names[0])
    print(f"- {n}/{names[0]}: median of the per-round ratios {r:.3f}x (rounds {lo:.3f}-{hi:.3f})")
p99 = {n: [] for n in names}
for line in open(path):
    name, _, *kv = line.split()
    p99[name].append(int(dict(x.split("=") for x in kv)["p99_us"]) / 1000)
for n in names:
    print(f"- {n}: p99 of each round, ms: {', '.join(f'{x:.1f}' for x in sorted(p99[n]))}")
PY
echo
echo "machine: $(nproc) cores; $(date -u +%Y-%m-%d); wrk -t${WRK_THREADS:-1} -c$CONNECTIONS -d$DURATION x $ROUNDS rounds, alternating, ${WORKERS:-2} workers each"
