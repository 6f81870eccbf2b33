#!/usr/bin/env bash
# Soak: about a million POST searches with (nearly) all-new cache keys from
# 100 000 distinct client addresses, through the sidecar as shipped but with
# rate limits too high to reject (so every client gets a limiter entry) and
# the sidecar trusting the loopback peer's X-Forwarded-For. Ten wrk runs of
# SEGMENT seconds back to back; after each: requests/s, the sidecar's RSS,
# its cache entries and its tracked rate-limit clients. Fails if RSS passes
# the stated bound or the last run's throughput falls under 80 % of the
# first's. Used by `make soak` (after the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
SEGMENTS=${SEGMENTS:-10}
SEGMENT=${SEGMENT:-6s}
CONNECTIONS=${CONNECTIONS:-50}
# The bound: the memory cache's byte budget (cache.max_memory_bytes,
# 128 MiB) plus 64 MiB for the runtime, buffers and 100 000 limiter entries.
RSS_BOUND_KIB=$(( (128 + 64) * 1024 ))

. bench/lib.sh
need wrk wrk

up=$(free_port); sc=$(free_port)
start_app "$up" --search-latency-ms 0
printf 'trusted_proxies = ["127.0.0.1/32"]\n' > "$work/soak.toml"
start_sidecar "$sc" "$up" "$work/soak.toml" NUM_THREADS=2 \
    DEFAULT_RATE_LIMIT="1000000000 per minute" SEARCH_RATE_LIMIT="1000000000 per minute"
scpid=$sidecar_pid
echo "| run | requests | requests/s | errors | RSS MiB | cache entries (search) | rate-limit clients |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
echo "| start | 0 | – | – | $(awk -v r="$(rss "$scpid")" 'BEGIN {printf "%.1f", r/1024}') | 0 | 0 |"
offset=0; total=0; first=0; last=0; max_rss=0
for i in $(seq "$SEGMENTS"); do
  line=$(SOAK_OFFSET=$offset wrk -t1 -c"$CONNECTIONS" -d"$SEGMENT" -s bench/soak.lua "http://127.0.0.1:$sc/" | grep '^RESULT')
  req=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<< "$line")
  us=$(sed 's/.*duration_us=\([0-9]*\).*/\1/' <<< "$line")
  errs=$(sed 's/.*errors=\([0-9]*\).*/\1/' <<< "$line")
  rps=$(( req * 1000000 / us ))
  [ "$i" -eq 1 ] && first=$rps
  last=$rps
  offset=$(( offset + req + 1000 )); total=$(( total + req ))
  r=$(rss "$scpid"); [ "$r" -gt "$max_rss" ] && max_rss=$r
  stats=$(curl -s "http://127.0.0.1:$sc/api/cache/stats")
  items=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["namespaces"]["search"]["items"])' <<< "$stats")
  clients=$(curl -s "http://127.0.0.1:$sc/metrics" | awk '/^rag_sidecar_ratelimit_tracked_clients / {print $2}')
  echo "| $i | $req | $rps | $errs | $(awk -v r="$r" 'BEGIN {printf "%.1f", r/1024}') | $items | ${clients:-?} |"
done
echo
echo "total $total requests; peak RSS $(( max_rss / 1024 )) MiB (bound $(( RSS_BOUND_KIB / 1024 )) MiB); last/first throughput $(awk -v a="$last" -v b="$first" 'BEGIN {printf "%.2f", a/b}')"
echo "machine: $(nproc) cores; $(date -u +%Y-%m-%d); wrk -t1 -c$CONNECTIONS, $SEGMENTS runs of $SEGMENT"
[ "$max_rss" -le "$RSS_BOUND_KIB" ] || { echo "RSS over the bound" >&2; exit 1; }
[ $(( last * 100 )) -ge $(( first * 80 )) ] || { echo "throughput decayed" >&2; exit 1; }
