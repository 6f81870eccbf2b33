#!/usr/bin/env bash
# Throughput and latency of rag-sidecar against nginx and a direct connection,
# all on 127.0.0.1, in one run: the contenders alternate, round after round,
# and the table reports medians and ratios. Installs wrk and nginx from
# Debian when missing. Used by `make bench` (which builds the release first).
#
# Knobs: ROUNDS (5), DURATION per run (5s), CONNECTIONS (50), WORKERS for
# both proxies (2), PATH_ (the request, default /api/stats: the default route).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
WORKERS=${WORKERS:-2}
PATH_=${PATH_:-/api/stats}
BIN=${BIN:-target/release}

apt_updated=
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need wrk wrk
need nginx nginx-light
[ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx || NGINX=$(command -v nginx)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

up=$(free_port); ngx=$(free_port); sc=$(free_port)

# The fast upstream: the mock app with no simulated latency, one thread.
"$BIN/mock-legacy-app" --listen "127.0.0.1:$up" --search-latency-ms 0 --rag-latency-ms 0 --threads 1 >/dev/null &
pids+=($!); wait_port "$up"

mkdir -p "$work"/{body,proxy,fastcgi,uwsgi,scgi}
sed -e "s|@DIR@|$work|g" -e "s|@UPSTREAM@|127.0.0.1:$up|" -e "s|@LISTEN@|127.0.0.1:$ngx|" \
    -e "s|@WORKERS@|$WORKERS|" bench/nginx.conf.in > "$work/nginx.conf"
"$NGINX" -c "$work/nginx.conf" -p "$work" &
pids+=($!); wait_port "$ngx"

# The sidecar as shipped, access log off (nginx's is off too).
(cd "$work" && exec env LOG_LEVEL=warn NUM_THREADS="$WORKERS" "$OLDPWD/$BIN/rag-sidecar" \
    --config "$OLDPWD/config/rag-sidecar.toml" --listen "127.0.0.1:$sc" --upstream "http://127.0.0.1:$up") &
scpid=$!; pids+=($scpid); wait_port "$sc"
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
curl -fsS "http://127.0.0.1:$sc$PATH_" >/dev/null
idle_rss=$(rss $scpid)

declare -A url=([direct]="http://127.0.0.1:$up$PATH_" [nginx]="http://127.0.0.1:$ngx$PATH_" [rag-sidecar]="http://127.0.0.1:$sc$PATH_")
order=(direct nginx rag-sidecar)
results="$work/results.txt"
# Warm every path once, unrecorded.
for c in "${order[@]}"; do wrk -t1 -c"$CONNECTIONS" -d1s "${url[$c]}" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  for c in "${order[@]}"; do
    line=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s bench/report.lua "${url[$c]}" | grep '^RESULT')
    echo "$c $line" >> "$results"
    echo "round $r/$ROUNDS $c: $line" >&2
  done
  order=("${order[@]:1}" "${order[0]}")   # rotate who goes first
done
load_rss=$(rss $scpid)

python3 - "$results" "$idle_rss" "$load_rss" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, _, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    rows[name].append(d)
med = {}
for name, runs in rows.items():
    rps = statistics.median(int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in runs)
    p50 = statistics.median(int(r["p50_us"]) for r in runs) / 1000
    p99 = statistics.median(int(r["p99_us"]) for r in runs) / 1000
    errs = sum(int(r["errors"]) for r in runs)
    med[name] = (rps, p50, p99, errs, len(runs))
print("| contender | requests/s (median) | p50 ms | p99 ms | errors | runs |")
print("|---|---:|---:|---:|---:|---:|")
for name in ("direct", "nginx", "rag-sidecar"):
    rps, p50, p99, errs, n = med[name]
    print(f"| {name} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {errs} | {n} |")
s, n, d = med["rag-sidecar"], med["nginx"], med["direct"]
print()
print(f"- throughput sidecar/nginx: {s[0]/n[0]:.2f}x; sidecar/direct: {s[0]/d[0]:.2f}x")
print(f"- p99 sidecar/nginx: {s[2]/n[2]:.2f}x; p50 sidecar/nginx: {s[1]/n[1]:.2f}x")
print(f"- sidecar RSS: idle {int(sys.argv[2])/1024:.1f} MiB, after the load {int(sys.argv[3])/1024:.1f} MiB")
PY
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(date -u +%Y-%m-%d); wrk -t1 -c$CONNECTIONS -d$DURATION x $ROUNDS rounds, $WORKERS workers each, GET $PATH_"
