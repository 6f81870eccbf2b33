#!/usr/bin/env bash
# The global allocator, measured (issue 21): the sidecar built with glibc's
# malloc, mimalloc and jemalloc (Cargo features; src/main.rs), side by side
# over one fast mock app, wrk alternating between them round by round, in
# one run: throughput, latency and CPU per request for proxied requests
# (GET /api/stats) and cache hits (POST /api/search, same body), then RSS
# idle and with 10 000 cached ~4 KiB answers. Builds the three into
# target/alloc/ first (each a release build: minutes; SKIP_BUILD=1 reuses
# them).
# Knobs: ROUNDS (7), DURATION (3s), CONNECTIONS (32), WORKERS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-32}
BIN=${BIN:-target/release}
ALLOCATORS=(system mimalloc jemalloc)

if [ -z "${SKIP_BUILD:-}" ]; then
  for a in "${ALLOCATORS[@]}"; do
    features=(--no-default-features); [ "$a" = system ] || features+=(--features "$a")
    cargo build -j2 --release --bin rag-sidecar "${features[@]}" >&2
    mkdir -p "target/alloc/$a" && cp target/release/rag-sidecar "target/alloc/$a/"
  done
  cargo build -j2 --release --bins >&2   # the shipped build back in place, and the mock app
fi

. bench/lib.sh
need wrk wrk
up=$(free_port)
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
# Room for the 10 000 answers (the default search namespace holds fewer).
printf '[[routes]]\nname = "search"\ncache = { max_items = 10000 }\n' > "$work/10k.toml"
proxied=(); hits=(); declare -A port_of idle_rss
for a in "${ALLOCATORS[@]}"; do
  p=$(free_port)
  SIDECAR_BIN=$PWD/target/alloc/$a/rag-sidecar start_sidecar "$p" "$up" "$work/10k.toml" ENABLE_RATE_LIMIT=False
  port_of[$a]=$p; cpu_of[$a]=$sidecar_pid; cpu_of[$a-hit]=$sidecar_pid
  curl -fsS "http://127.0.0.1:$p/api/stats" >/dev/null
  idle_rss[$a]=$(rss "$sidecar_pid")
  proxied+=("$a=http://127.0.0.1:$p/api/stats"); hits+=("$a-hit=http://127.0.0.1:$p/api/search")
done
run_rounds "$work/proxied.txt" bench/report.lua "${proxied[@]}"
run_rounds "$work/hits.txt" bench/post.lua "${hits[@]}"
: > "$work/rss.txt"
for a in "${ALLOCATORS[@]}"; do
  loaded=$(rss "${cpu_of[$a]}")
  filled=$(python3 bench/fill.py "${port_of[$a]}" 10000)
  echo "$a ${idle_rss[$a]} $loaded $(rss "${cpu_of[$a]}") $filled" >> "$work/rss.txt"
done

python3 - "$work" "${ALLOCATORS[@]}" <<'PY'
import sys
sys.path.insert(0, "bench")
from tables import table, paired
work, names = sys.argv[1], sys.argv[2:]
print("Proxied (GET /api/stats, default route):\n")
m = table(f"{work}/proxied.txt", names)
for n in names[1:]:
    r, lo, hi = paired(f"{work}/proxied.txt", n, names[0])
    print(f"- {n}/{names[0]}: median of the per-round ratios {r:.3f}x (rounds {lo:.3f}-{hi:.3f})")
print("\nCache hits (POST /api/search, same body):\n")
hits = [f"{n}-hit" for n in names]
m = table(f"{work}/hits.txt", hits)
for n in hits[1:]:
    r, lo, hi = paired(f"{work}/hits.txt", n, hits[0])
    print(f"- {n}/{hits[0]}: median of the per-round ratios {r:.3f}x (rounds {lo:.3f}-{hi:.3f})")
print("\nMemory (RSS, MiB):\n")
print("| allocator | idle | after the load | with 10 000 cached answers | entries |")
print("|---|---:|---:|---:|---:|")
for line in open(f"{work}/rss.txt"):
    a, idle, loaded, filled, items, mib = line.split()
    print(f"| {a} | {int(idle)/1024:.1f} | {int(loaded)/1024:.1f} | {int(filled)/1024:.1f} | {items} ({mib} MiB) |")
PY
echo
echo "machine: $(nproc) cores; $(date -u +%Y-%m-%d); wrk -t1 -c$CONNECTIONS -d$DURATION x $ROUNDS rounds, ${WORKERS:-2} workers each"
