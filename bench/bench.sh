#!/usr/bin/env bash
# Throughput and latency of rag-sidecar against nginx and a direct connection,
# the cost of rate limiting, of the retry/circuit layers and of metrics, an outage
# scenario (bench/fault.py), cache hits and cache memory,
# all on 127.0.0.1, in one run: the contenders alternate, round after round,
# and the table reports medians and ratios. Installs wrk and nginx from
# Debian when missing. Used by `make bench` (which builds the release first).
#
# For the comparisons with nginx the tables also give each contender's CPU
# time per request (user + kernel, from /proc/PID/stat around each run: the
# app for "direct", nginx's workers, the sidecar): on this machine wrk, the
# app and the proxy share two cores, so CPU per request is what decides
# throughput.
#
# Floors stand beside them: examples/hyper_floor.rs, a bare hyper server
# answering the cache hit's bytes on the sidecar's runtime setup (what hyper
# and tokio cost alone), and the same forwarding each request over an
# upstream connection of its own (`--proxy`: what proxying over hyper costs
# at the least). Every row also gives wrk's own CPU (share of one
# core): wrk -t1 near 1.0 would make wrk the ceiling (then WRK_THREADS=2).
#
# Knobs: ROUNDS (5), DURATION per run (5s), CONNECTIONS (32), LIGHT (8: the
# connections of the lighter-load rounds), WRK_THREADS (1), WORKERS for
# both proxies (2), PATH_ (the request, default /api/stats: the default route);
# the on-vs-off comparisons use AB_ROUNDS (9) of AB_DURATION (3s) and report
# the median of the per-round ratios. BASELINE=DIR runs DIR/rag-sidecar (for
# example the previous commit's release build) as one more contender in the
# proxying and cache-hit rounds, so old and new are compared against nginx in
# the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
LIGHT=${LIGHT:-8}
FLOOR=${FLOOR:-target/release/examples/hyper_floor}
WORKERS=${WORKERS:-2}
PATH_=${PATH_:-/api/stats}
BIN=${BIN:-target/release}
BASELINE=${BASELINE:-}

. bench/lib.sh
need wrk wrk
NGINX=$(nginx_bin)

up=$(free_port); ngx=$(free_port); ngxc=$(free_port); sc=$(free_port); sc10k=$(free_port); scrl=$(free_port)
scoff=$(free_port); scf=$(free_port); upf=$(free_port); scnm=$(free_port)

# The fast upstream: the mock app with no simulated latency, one thread.
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
uppid=$app_pid

mkdir -p "$work"/{body,proxy,fastcgi,uwsgi,scgi,cache}
# nginx's workers drop to an unprivileged user: let them into the temp dirs.
chmod 755 "$work"; chmod 777 "$work"/{body,proxy,fastcgi,uwsgi,scgi,cache}
sed -e "s|@DIR@|$work|g" -e "s|@UPSTREAM@|127.0.0.1:$up|" -e "s|@LISTEN@|127.0.0.1:$ngx|" \
    -e "s|@CACHE_LISTEN@|127.0.0.1:$ngxc|" -e "s|@WORKERS@|$WORKERS|" bench/nginx.conf.in > "$work/nginx.conf"
"$NGINX" -c "$work/nginx.conf" -p "$work" &
ngxpid=$!; pids+=($ngxpid); wait_port "$ngx"; wait_port "$ngxc"

# The sidecar as shipped, access log off (nginx's is off too), rate limits
# off (they would turn a load test into a 429 test).
start_sidecar "$sc" "$up" config/rag-sidecar.toml ENABLE_RATE_LIMIT=False
scpid=$sidecar_pid
curl -fsS "http://127.0.0.1:$sc$PATH_" >/dev/null
idle_rss=$(rss $scpid)

# Whose CPU time each contender's rows report (nginx: its workers; its cache
# loader exits after a minute and the cache manager idles, so neither counts).
cpu_of=([direct]=$uppid [direct-uncached]=$uppid [rag-sidecar]=$scpid [rag-sidecar-cache]=$scpid)
cpu_of[nginx]=$(pgrep -P "$ngxpid" -f "worker process" | tr '\n' ' '); cpu_of[nginx-proxy_cache]=${cpu_of[nginx]}
baseline=()
baseline_cache=()
if [ -n "$BASELINE" ]; then
  scb=$(free_port)
  SIDECAR_BIN=$(realpath "$BASELINE/rag-sidecar") start_sidecar "$scb" "$up" "$(baseline_config)" ENABLE_RATE_LIMIT=False
  cpu_of[rag-sidecar-baseline]=$sidecar_pid; cpu_of[rag-sidecar-baseline-cache]=$sidecar_pid
  curl -fsS "http://127.0.0.1:$scb$PATH_" >/dev/null
  baseline=(rag-sidecar-baseline="http://127.0.0.1:$scb$PATH_")
  baseline_cache=(rag-sidecar-baseline-cache="http://127.0.0.1:$scb/api/search")
fi

# The proxying floor: bare hyper forwarding each client connection's
# requests over an upstream connection of its own (hyper_floor --proxy).
floorp=$(free_port)
"$FLOOR" "127.0.0.1:$floorp" "$WORKERS" --proxy "127.0.0.1:$up" &
floorppid=$!; pids+=($floorppid); wait_port "$floorp"
cpu_of[hyper-floor-proxy]=$floorppid

results="$work/results.txt"
run_rounds "$results" bench/report.lua direct="http://127.0.0.1:$up$PATH_" \
  nginx="http://127.0.0.1:$ngx$PATH_" rag-sidecar="http://127.0.0.1:$sc$PATH_" \
  hyper-floor-proxy="http://127.0.0.1:$floorp$PATH_" "${baseline[@]}"
load_rss=$(rss $scpid)

# Rate limiting on (a limit too high to reject) vs off, same route.
start_sidecar "$scrl" "$up" config/rag-sidecar.toml DEFAULT_RATE_LIMIT="1000000000 per minute"
rl_results="$work/ratelimit.txt"
AB_ROUNDS=${AB_ROUNDS:-9}; AB_DURATION=${AB_DURATION:-3s}
ROUNDS=$AB_ROUNDS DURATION=$AB_DURATION run_rounds "$rl_results" bench/report.lua rate-limit-off="http://127.0.0.1:$sc$PATH_" \
  rate-limit-on="http://127.0.0.1:$scrl$PATH_"

# Retry + circuit-breaker layers on (as shipped) vs off, same route, nothing
# failing: what the resilience layers cost on the happy path.
printf '[retry]\nenabled = false\n[circuit_breaker]\nenabled = false\n' > "$work/off.toml"
start_sidecar "$scoff" "$up" "$work/off.toml" ENABLE_RATE_LIMIT=False
res_results="$work/resilience.txt"
ROUNDS=$AB_ROUNDS DURATION=$AB_DURATION run_rounds "$res_results" bench/report.lua resilience-on="http://127.0.0.1:$sc$PATH_" \
  resilience-off="http://127.0.0.1:$scoff$PATH_"

# Metrics on (as shipped) vs ENABLE_METRICS=False, same route.
start_sidecar "$scnm" "$up" config/rag-sidecar.toml ENABLE_RATE_LIMIT=False ENABLE_METRICS=False
metrics_results="$work/metrics.txt"
ROUNDS=$AB_ROUNDS DURATION=$AB_DURATION run_rounds "$metrics_results" bench/report.lua metrics-on="http://127.0.0.1:$sc$PATH_" \
  metrics-off="http://127.0.0.1:$scnm$PATH_"
# One scrape of /metrics on the loaded sidecar: median of 200.
scrape_ms=$(python3 - "$sc" <<'PY'
import http.client, statistics, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
t = []
for _ in range(200):
    s = time.perf_counter(); c.request("GET", "/metrics"); r = c.getresponse(); body = r.read(); t.append(time.perf_counter() - s)
    assert r.status == 200, r.status
print(f"{statistics.median(t) * 1000:.3f} ms ({len(body.splitlines())} lines)")
PY
)

# The outage: a second app that answers 503 to everything for 10 s, behind
# a sidecar as shipped (rate limits off).
start_app "$upf" --search-latency-ms 0 --rag-latency-ms 0
start_sidecar "$scf" "$upf" config/rag-sidecar.toml LOG_LEVEL=error ENABLE_RATE_LIMIT=False
fault_report=$(python3 bench/fault.py "$scf" "$upf" 10 "$CONNECTIONS" "$PATH_")

# Cache hits: the same POST /api/search answered from nginx's proxy_cache and
# from the sidecar's cache ("direct" is the app computing it every time).
# The floor answers the hit's bytes.
hit_bytes=$(curl -s -X POST -H 'Accept:' -H 'Content-Type: application/json' \
  -d '{"query": "Học máy là gì?", "top_k": 5}' "http://127.0.0.1:$sc/api/search" | wc -c)
floor=$(free_port)
"$FLOOR" "127.0.0.1:$floor" "$WORKERS" "$hit_bytes" &
floorpid=$!; pids+=($floorpid); wait_port "$floor"
cpu_of[hyper-floor]=$floorpid
cache_results="$work/cache.txt"
run_rounds "$cache_results" bench/post.lua direct-uncached="http://127.0.0.1:$up/api/search" \
  nginx-proxy_cache="http://127.0.0.1:$ngxc/api/search" rag-sidecar-cache="http://127.0.0.1:$sc/api/search" \
  hyper-floor="http://127.0.0.1:$floor/api/search" "${baseline_cache[@]}"
# Lighter load (LIGHT connections, short of saturation): the latency a user
# sees, proxied and from the cache.
light="$work/light.txt"
CONNECTIONS=$LIGHT run_rounds "$light" bench/report.lua \
  nginx="http://127.0.0.1:$ngx$PATH_" rag-sidecar="http://127.0.0.1:$sc$PATH_" \
  hyper-floor-proxy="http://127.0.0.1:$floorp$PATH_"
light_cache="$work/light-cache.txt"
CONNECTIONS=$LIGHT run_rounds "$light_cache" bench/post.lua \
  nginx-proxy_cache="http://127.0.0.1:$ngxc/api/search" rag-sidecar-cache="http://127.0.0.1:$sc/api/search" \
  hyper-floor="http://127.0.0.1:$floor/api/search"
hit_header=$(curl -s -D - -o /dev/null -X POST -H 'Accept:' -H 'Content-Type: application/json' \
  -d '{"query": "Học máy là gì?", "top_k": 5}' "http://127.0.0.1:$sc/api/search" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache" {print $2}')
ngx_header=$(curl -s -D - -o /dev/null -X POST -H 'Accept:' -H 'Content-Type: application/json' \
  -d '{"query": "Học máy là gì?", "top_k": 5}' "http://127.0.0.1:$ngxc/api/search" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache" {print $2}')

# Memory with 10 000 cached ~4 KiB answers, on a sidecar whose search route
# may hold that many.
cat > "$work/10k.toml" <<TOML
[[routes]]
name = "search"
cache = { max_items = 10000 }
TOML
start_sidecar "$sc10k" "$up" "$work/10k.toml" ENABLE_RATE_LIMIT=False
sc10kpid=$sidecar_pid
rss_10k_before=$(rss $sc10kpid)
items_10k=$(python3 bench/fill.py "$sc10k" 10000)
rss_10k=$(rss $sc10kpid)

BASELINE_RUN=${BASELINE:+1} CONNS="$CONNECTIONS $LIGHT" python3 - "$results" "$cache_results" "$light" "$idle_rss" "$load_rss" "$rss_10k_before" "$rss_10k" "$items_10k" "$hit_header" "$ngx_header" "$rl_results" "$res_results" "$metrics_results" "$scrape_ms" "$light_cache" <<'PY'
import os, sys, statistics, collections
sys.path.insert(0, "bench")
from tables import table, paired
base = os.environ.get("BASELINE_RUN") == "1"
def ab(path, on, off, what):
    m = table(path, (off, on))
    r, lo, hi = paired(path, on, off)
    print(f"- throughput with {what}: median of the per-round ratios {r:.3f}x of off ({(1 - r) * 100:+.1f} % lower; rounds ranged {lo:.3f}-{hi:.3f}); medians of the columns {m[on][0]/m[off][0]:.3f}x")
c_full, c_light = os.environ["CONNS"].split()
print(f"Proxying (GET /api/stats, default route, not cached; wrk -c{c_full}):\n")
m = table(sys.argv[1], ("direct", "nginx", "rag-sidecar", "hyper-floor-proxy") + (("rag-sidecar-baseline",) if base else ()))
s, n, d, fp = m["rag-sidecar"], m["nginx"], m["direct"], m["hyper-floor-proxy"]
print(f"- throughput sidecar/nginx: {s[0]/n[0]:.2f}x; sidecar/direct: {s[0]/d[0]:.2f}x")
print(f"- p99 sidecar/nginx: {s[2]/n[2]:.2f}x; p50 sidecar/nginx: {s[1]/n[1]:.2f}x")
print(f"- the proxying floor (bare hyper server + client): floor/nginx throughput {fp[0]/n[0]:.2f}x, p99 {fp[2]/n[2]:.2f}x; user CPU per request {s[3]:.1f} µs (sidecar) against the floor's {fp[3]:.1f} and nginx's {n[3]:.1f}")
if base:
    b = m["rag-sidecar-baseline"]
    r, lo, hi = paired(sys.argv[1], "rag-sidecar", "rag-sidecar-baseline")
    print(f"- baseline build: throughput baseline/nginx {b[0]/n[0]:.2f}x, p99 baseline/nginx {b[2]/n[2]:.2f}x; this build/baseline: median of the per-round ratios {r:.3f}x (rounds {lo:.3f}-{hi:.3f})")
idle, loaded, before_10k, after_10k, items_10k, hit_h, ngx_h, rl_path = sys.argv[4:12]
print(f"- sidecar RSS: idle {int(idle)/1024:.1f} MiB, after the load {int(loaded)/1024:.1f} MiB")
print()
print(f"Cache hits (POST /api/search, same body; X-Cache seen: sidecar {hit_h}, nginx {ngx_h}; wrk -c{c_full}):\n")
m = table(sys.argv[2], ("direct-uncached", "nginx-proxy_cache", "rag-sidecar-cache", "hyper-floor") + (("rag-sidecar-baseline-cache",) if base else ()))
s, n, f = m["rag-sidecar-cache"], m["nginx-proxy_cache"], m["hyper-floor"]
print(f"- hit throughput sidecar/nginx proxy_cache: {s[0]/n[0]:.2f}x; p99 {s[2]/n[2]:.2f}x")
print(f"- the floor (bare hyper, the same bytes): sidecar/floor throughput {s[0]/f[0]:.2f}x; user CPU per request {s[3]:.1f} µs against the floor's {f[3]:.1f}")
if base:
    b = m["rag-sidecar-baseline-cache"]
    r, lo, hi = paired(sys.argv[2], "rag-sidecar-cache", "rag-sidecar-baseline-cache")
    print(f"- baseline build: hit throughput baseline/nginx proxy_cache {b[0]/n[0]:.2f}x, p99 {b[2]/n[2]:.2f}x; this build/baseline: median of the per-round ratios {r:.3f}x (rounds {lo:.3f}-{hi:.3f})")
print()
print("Rate limiting on (a limit that never rejects) vs off, GET default route:\n")
ab(rl_path, "rate-limit-on", "rate-limit-off", "rate limiting on")
print()
print("Retry and circuit-breaker layers on (as shipped) vs off, GET default route, nothing failing:\n")
ab(sys.argv[12], "resilience-on", "resilience-off", "retry + circuit on")
print()
print("Metrics on (as shipped) vs ENABLE_METRICS=False, GET default route:\n")
ab(sys.argv[13], "metrics-on", "metrics-off", "metrics on")
print(f"- one GET /metrics on the loaded sidecar (HTTP round trip included, median of 200): {sys.argv[14]}")
print()
print(f"Lighter load (wrk -c{c_light}), proxied:\n")
m = table(sys.argv[3], ("nginx", "rag-sidecar", "hyper-floor-proxy"))
s, n, fp = m["rag-sidecar"], m["nginx"], m["hyper-floor-proxy"]
print(f"- throughput sidecar/nginx: {s[0]/n[0]:.2f}x; p99 {s[2]/n[2]:.2f}x; the proxying floor: p99 {fp[2]/n[2]:.2f}x nginx's")
print()
print(f"Lighter load (wrk -c{c_light}), cache hits:\n")
m = table(sys.argv[15], ("nginx-proxy_cache", "rag-sidecar-cache", "hyper-floor"))
s, n = m["rag-sidecar-cache"], m["nginx-proxy_cache"]
print(f"- hit throughput sidecar/nginx proxy_cache: {s[0]/n[0]:.2f}x; p99 {s[2]/n[2]:.2f}x")
print()
items, mib = items_10k.split()
print(f"- 10 000 cached ~4 KiB answers: {items} items ({mib} MiB of entries), RSS {int(before_10k)/1024:.1f} MiB before, {int(after_10k)/1024:.1f} MiB after")
PY
echo
echo "$fault_report"
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(date -u +%Y-%m-%d); wrk -t${WRK_THREADS:-1} -c$CONNECTIONS (and -c$LIGHT) -d$DURATION x $ROUNDS rounds, $WORKERS workers each, GET $PATH_"
