#!/usr/bin/env bash
# Is the cost of a cache hit flat from 1 000 to 100 000 entries? Two
# sidecars, identical but for how many distinct searches they hold (1 000
# and 100 000, ~0.7 KiB answers), each loaded with hits on questions drawn
# at random from everything it holds; the two alternate round after round
# (ROUNDS of DURATION, wrk -t1 -cCONNECTIONS) and the table reports medians
# and the median of the per-round ratios. The cache statistics are read
# before and after the measured rounds to show that they were all hits.
# Used by `make bench` (after the release build); installs wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-50}
WORKERS=${WORKERS:-2}
BIN=${BIN:-target/release}
. bench/lib.sh
need wrk wrk

up=$(free_port)
start_app "$up" --search-latency-ms 0
# Room for 100 000 entries in the search namespace and in the byte budget.
cat > "$work/scale.toml" <<TOML
[cache]
max_memory_bytes = 1073741824
[[routes]]
name = "search"
cache = { max_items = 150000 }
TOML
declare -A port pid
for n in 1000 100000; do
  port[$n]=$(free_port)
  start_sidecar "${port[$n]}" "$up" "$work/scale.toml" ENABLE_RATE_LIMIT=False
  pid[$n]=$sidecar_pid
  printf 'KEYS = %d\nFILL = true\ndofile("bench/keys.lua")\n' "$n" > "$work/fill$n.lua"
  printf 'KEYS = %d\ndofile("bench/keys.lua")\n' "$n" > "$work/hit$n.lua"
done
stats() { # stats PORT -> "items hits misses" of the search namespace
  curl -fsS "http://127.0.0.1:$1/api/cache/stats" |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["namespaces"]["search"]; print(s["items"], s["hits"], s["misses"])'
}
# Fill: walk every question until the namespace holds them all (bounded).
for n in 1000 100000; do
  for _ in $(seq 10); do
    wrk -t1 -c"$CONNECTIONS" -d3s -s "$work/fill$n.lua" "http://127.0.0.1:${port[$n]}/api/search" >/dev/null
    read -r items _ _ <<<"$(stats "${port[$n]}")"
    [ "$items" -ge "$n" ] && break
  done
  echo "filled: $items entries (of $n)" >&2
done
declare -A before
for n in 1000 100000; do before[$n]=$(stats "${port[$n]}"); done
out="$work/scale.txt"
order=(1000 100000)
for n in "${order[@]}"; do wrk -t1 -c"$CONNECTIONS" -d1s -s "$work/hit$n.lua" "http://127.0.0.1:${port[$n]}/api/search" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  for n in "${order[@]}"; do
    line=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$work/hit$n.lua" "http://127.0.0.1:${port[$n]}/api/search" | grep '^RESULT')
    echo "$n $line" >> "$out"
    echo "round $r/$ROUNDS $n entries: $line" >&2
  done
  order=("${order[@]:1}" "${order[0]}")
done
after1k="$(stats "${port[1000]}") $(rss "${pid[1000]}")"; after100k="$(stats "${port[100000]}") $(rss "${pid[100000]}")"
python3 - "$out" "${before[1000]}" "$after1k" "${before[100000]}" "$after100k" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    n, _, *kv = line.split()
    rows[n].append(dict(x.split("=") for x in kv))
print("Cache-hit cost against the number of entries (POST /api/search, questions drawn at random from all the entries):\n")
print("| entries | requests/s (median) | p50 ms | p99 ms | errors | runs | hits during the runs | misses | RSS MiB |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
rps = {}
for n, b, a in (("1000", sys.argv[2], sys.argv[3]), ("100000", sys.argv[4], sys.argv[5])):
    runs = rows[n]
    (items, h0, m0), (_, h1, m1, rss) = (map(int, b.split()), map(int, a.split()))
    rps[n] = [int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in runs]
    print(f"| {items:,} | {statistics.median(rps[n]):,.0f} | {statistics.median(int(r['p50_us']) for r in runs)/1000:.3f} | "
          f"{statistics.median(int(r['p99_us']) for r in runs)/1000:.3f} | {sum(int(r['errors']) for r in runs)} | {len(runs)} | {h1 - h0:,} | {m1 - m0:,} | {rss / 1024:.1f} |")
ratios = sorted(x / y for x, y in zip(rps["100000"], rps["1000"]))
print(f"\n- hit throughput with 100 000 entries: median of the per-round ratios {statistics.median(ratios):.3f}x of 1 000 entries (rounds ranged {ratios[0]:.3f}-{ratios[-1]:.3f})")
PY
