#!/usr/bin/env bash
# The app down for DURATION, compared in one run: nginx with proxy_cache and
# its stale-on-error setting (proxy_cache_use_stale error timeout http_5xx)
# vs rag-sidecar, both in front of the same mock app, both caching the same
# 20 search questions for 1 s, both warmed before the app is killed. Each is
# then loaded for DURATION (wrk -t1 -c50) with the app down; the table counts
# the statuses each answered. Used by `make chaos` (after the chaos test).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DURATION=${DURATION:-10s}
. bench/lib.sh
need wrk wrk
NGINX=$(nginx_bin)

up=$(free_port); ngx=$(free_port); sc=$(free_port)
start_app "$up" --search-latency-ms 5
mock=$app_pid
mkdir -p "$work"/{body,proxy,fastcgi,uwsgi,scgi,cache}
chmod 755 "$work"; chmod 777 "$work"/{body,proxy,fastcgi,uwsgi,scgi,cache}
cat > "$work/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log crit;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    upstream app { server 127.0.0.1:$up; keepalive 128; }
    client_body_temp_path $work/body; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
    proxy_cache_path $work/cache levels=1:2 keys_zone=rag:16m max_size=256m inactive=60m use_temp_path=off;
    server {
        listen 127.0.0.1:$ngx;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
            proxy_cache rag;
            proxy_cache_methods POST;
            proxy_cache_key "\$request_uri|\$request_body";
            proxy_cache_valid 200 1s;
            proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;
        }
    }
}
NGINX
"$NGINX" -c "$work/nginx.conf" -p "$work" & pids+=($!); wait_port "$ngx"
cat > "$work/sc.toml" <<TOML
[rate_limit]
enabled = false
[circuit_breaker]
timeout = "3s"
[[routes]]
name = "search"
timeout = "1s"
cache = { ttl = "1s" }
TOML
start_sidecar "$sc" "$up" "$work/sc.toml" LOG_LEVEL=error NUM_THREADS=2
for port in $ngx $sc; do
  for i in $(seq 0 19); do
    curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' \
      -d "{\"query\": \"outage question $i\", \"top_k\": 3}" "http://127.0.0.1:$port/api/search"
  done
done
sleep 1.2   # every entry is now expired: only stale serving can answer
kill -9 "$mock"
echo "| contender (app down for $DURATION) | requests | statuses | connection errors | p99 ms |"
echo "|---|---:|---|---:|---:|"
for c in nginx:$ngx rag-sidecar:$sc; do
  line=$(wrk -t1 -c50 -d"$DURATION" -s bench/outage.lua "http://127.0.0.1:${c#*:}/" | grep '^STATUSES')
  req=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<< "$line")
  p99=$(sed 's/.*p99_us=\([0-9]*\).*/\1/' <<< "$line")
  errs=$(sed 's/.*errors=\([0-9]*\).*/\1/' <<< "$line")
  st=$(tr ' ' '\n' <<< "$line" | grep -E '^[0-9]{3}=' | sort | tr '\n' ' ')
  echo "| ${c%%:*} | $req | ${st% } | $errs | $(awk -v u="$p99" 'BEGIN {printf "%.2f", u/1000}') |"
done
echo
echo "machine: $(nproc) cores; $(date -u +%Y-%m-%d); wrk -t1 -c50 -d$DURATION each, the app killed (SIGKILL) after warming"
