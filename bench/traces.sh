#!/usr/bin/env bash
# What tracing costs (issue 22): the sidecar as shipped (no collector: the
# trace context is only passed on), exporting at a sample ratio of 0.01, and
# exporting every request (1.0), side by side over one fast mock app, wrk
# alternating between them round by round, in one run; the collector is
# nginx answering 200 to every POST /v1/traces (cheap, so the sidecar's own
# cost is what is measured). BASELINE=DIR adds DIR/rag-sidecar (the build
# before tracing) as "before": "off" against "before" is the cost of
# propagating the header. Prints the table of medians, each contender's
# per-round throughput ratio to "off" (or "before"), and the spans each
# exporting sidecar exported and dropped (rag_sidecar_trace_spans_total).
# Knobs: ROUNDS (9), DURATION (3s), CONNECTIONS (32), WORKERS (2), BASELINE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-9}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-32}
BIN=${BIN:-target/release}
BASELINE=${BASELINE:-}
. bench/lib.sh
need wrk wrk
NGINX=$(nginx_bin)

up=$(free_port); sink=$(free_port)
start_app "$up" --search-latency-ms 0 --rag-latency-ms 0
# The collector: reads each export and answers 200 with no body.
mkdir -p "$work/body"; chmod 755 "$work"; chmod 777 "$work/body"
cat > "$work/sink.conf" <<CONF
worker_processes 1;
pid $work/sink.pid;
error_log $work/sink-error.log warn;
daemon off;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $work/body;
    server {
        listen 127.0.0.1:$sink;
        client_max_body_size 64m;
        client_body_buffer_size 4m;
        location = /v1/traces { return 200; }
    }
}
CONF
"$NGINX" -c "$work/sink.conf" -p "$work" &
pids+=($!); wait_port "$sink"

contenders=(); names=()
add() { # add NAME [VAR=VALUE...]
  local name=$1 port; port=$(free_port); shift
  start_sidecar "$port" "$up" config/rag-sidecar.toml ENABLE_RATE_LIMIT=False "$@"
  cpu_of[$name]=$sidecar_pid; ports[$name]=$port
  contenders+=("$name=http://127.0.0.1:$port/api/stats"); names+=("$name")
}
declare -A ports=()
if [ -n "$BASELINE" ]; then
  port=$(free_port)
  SIDECAR_BIN=$(realpath "$BASELINE/rag-sidecar") start_sidecar "$port" "$up" "$(baseline_config)" ENABLE_RATE_LIMIT=False
  cpu_of[before]=$sidecar_pid
  contenders+=("before=http://127.0.0.1:$port/api/stats"); names+=(before)
fi
add off
add ratio-0.01 OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
add ratio-1.0 OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=1.0

run_rounds "$work/rounds.txt" bench/report.lua "${contenders[@]}"

for n in ratio-0.01 ratio-1.0; do
  curl -fsS "http://127.0.0.1:${ports[$n]}/metrics" | awk -v n="$n" '/^rag_sidecar_trace_spans_total/ {print n, $0}'
done > "$work/spans.txt"

python3 - "$work/rounds.txt" "$work/spans.txt" "${names[@]}" <<'PY'
import sys
sys.path.insert(0, "bench")
from tables import table, paired
rounds, spans, names = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"Tracing's cost: GET /api/stats through the sidecar, wrk -c{__import__('os').environ.get('CONNECTIONS', '32')}, alternating rounds:\n")
table(rounds, names)
print("| contender | throughput / off, per round: median (range) |")
print("|---|---:|")
for n in names:
    if n == "off":
        continue
    m, lo, hi = paired(rounds, n, "off")
    print(f"| {n} | {m:.3f} ({lo:.3f}–{hi:.3f}) |")
print()
print("Spans at the end of the run (rag_sidecar_trace_spans_total):\n")
for line in open(spans):
    print("   ", line.strip())
PY
