#!/usr/bin/env bash
# Heap allocations per request (issue 35's measure), counted by valgrind's
# DHAT on a build with the system allocator (allocation calls are the
# code's, whatever serves them): N=1000 and N=3000 sequential requests on
# one keep-alive connection, one worker; the difference divided by 2000
# removes start-up and shutdown. Rows: a proxied GET (default route, not
# cached) and a cache hit (the same POST /api/search), as shipped (rate
# limits off, as in bench.sh). DHAT counts every thread: the background
# probes (readiness and the system monitor, every 5 s) add their share of
# the longer run's extra seconds, a fraction of an allocation per request.
# Builds target/alloc/system/rag-sidecar first (SKIP_BUILD=1 reuses it; the
# shipped build is put back after). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build -j2 --release --bin rag-sidecar --no-default-features >&2
  mkdir -p target/alloc/system && cp target/release/rag-sidecar target/alloc/system/
  cargo build -j2 --release --bins >&2   # the shipped build back in place, and the mock app
fi
SIDECAR=${SIDECAR:-target/alloc/system/rag-sidecar}
. bench/lib.sh
need valgrind valgrind

up=$(free_port)
start_app "$up" --search-latency-ms 0

blocks() { # blocks N KIND → heap blocks the sidecar allocated in all
  local port; port=$(free_port)
  env LOG_LEVEL=warn ENABLE_RATE_LIMIT=False NUM_THREADS=1 valgrind --tool=dhat \
    --dhat-out-file=/dev/null "$SIDECAR" --config config/rag-sidecar.toml \
    --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up" 2>"$work/dhat.err" &
  local pid=$!
  wait_port "$port"
  send_requests "$port" "$1" "$2"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  # "Total:     1,234 bytes in 56 blocks"
  sed -n 's/.*Total: .* bytes in \([0-9,]*\) blocks.*/\1/p' "$work/dhat.err" | tr -d , | head -1
}

per_request() { # per_request KIND
  local a b
  a=$(blocks 1000 "$1"); b=$(blocks 3000 "$1")
  echo "$1 $(( (b - a) / 2000 )).$(( ((b - a) % 2000) * 10 / 2000 ))"
}

echo "Heap allocations per request (DHAT, system allocator, 1 worker, $(git rev-parse --short HEAD)):"
echo
echo "| request | allocations/request |"
echo "|---|---:|"
for kind in proxied hit; do
  read -r k v < <(per_request "$kind")
  echo "| $k | $v |"
done
