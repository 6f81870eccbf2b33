# Shared by the bench scripts (sourced): installing a missing tool from
# Debian, free ports, waiting for a port, and a work directory whose
# processes (appended to `pids`) are killed on exit.

apt_updated=
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
nginx_bin() { # the nginx binary, installing nginx-light when missing
  [ -x /usr/sbin/nginx ] || need nginx nginx-light
  if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; else command -v nginx; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }  # rss PID -> KiB
wait_port() { # wait_port PORT — up to 30 s (a program under valgrind starts slowly)
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; exit 1
}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The binaries under test ($BIN, set by each script before these run).
start_app() { # start_app PORT [ARG...] — the mock app, one thread; its pid in $app_pid
  local port=$1; shift
  "$BIN/mock-legacy-app" --listen "127.0.0.1:$port" --threads 1 "$@" >/dev/null &
  app_pid=$!; pids+=("$app_pid"); wait_port "$port"
}
# The configuration another build runs with: its own checkout's shipped
# file (DIR=<checkout>/target/release), else the built-in defaults (an
# older build refuses the keys a newer file adds). DIR defaults to
# $BASELINE.
baseline_config() { # baseline_config [DIR]
  local own; own=$(realpath -m "${1:-$BASELINE}/../../config/rag-sidecar.toml")
  if [ -f "$own" ]; then echo "$own"; else : > "$work/baseline.toml"; echo "$work/baseline.toml"; fi
}
start_sidecar() { # start_sidecar PORT APP_PORT CONFIG [VAR=VALUE...] — its pid in $sidecar_pid
  # Run from the work directory, so no .env in the checkout is read; the
  # variables given override LOG_LEVEL=warn and NUM_THREADS=${WORKERS:-2}.
  local port=$1 app=$2 config; config=$(realpath "$3"); shift 3
  # SIDECAR_BIN (an absolute path) runs another build instead of $BIN's.
  local exe=${SIDECAR_BIN:-$PWD/$BIN/rag-sidecar}
  (cd "$work" && exec env LOG_LEVEL=warn NUM_THREADS="${WORKERS:-2}" "$@" "$exe" \
      --config "$config" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$app") &
  sidecar_pid=$!; pids+=("$sidecar_pid"); wait_port "$port"
}

# Rounds of wrk against several contenders, alternating (who goes first
# rotates each round), one RESULT line per run appended to RESULTS. Reads
# ROUNDS, DURATION, CONNECTIONS, WRK_THREADS (1), `clk` (CLK_TCK) and the
# associative array `cpu_of` (contender -> the PIDs whose CPU time it is
# charged: user_us/sys_us per request). Every line also carries wrk's own
# CPU share of one core (wrk_cpu, user + kernel over the run's wall time):
# near 1.0 per wrk thread, wrk would be the ceiling rather than the
# contender.
clk=$(getconf CLK_TCK)
declare -A cpu_of=()
ticks() { # ticks PIDS -> "user system" clock ticks, summed
  for p in $1; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u += $1; s += $2} END {print u, s}'
}
run_rounds() { # run_rounds RESULTS SCRIPT NAME=URL...
  local out=$1 script=$2; shift 2
  local -A url=(); local order=()
  local threads=${WRK_THREADS:-1}
  for kv in "$@"; do url[${kv%%=*}]=${kv#*=}; order+=("${kv%%=*}"); done
  for c in "${order[@]}"; do wrk -t"$threads" -c"$CONNECTIONS" -d1s -s "$script" "${url[$c]}" >/dev/null; done  # warm-up
  for r in $(seq "$ROUNDS"); do
    for c in "${order[@]}"; do
      local pids_of=${cpu_of[$c]:-} t0= line
      [ -n "$pids_of" ] && t0=$(ticks "$pids_of")
      # wrk's own CPU: bash's `time` of the run (user and kernel seconds).
      local TIMEFORMAT='%U %S'
      { time wrk -t"$threads" -c"$CONNECTIONS" -d"$DURATION" -s "$script" "${url[$c]}" > "$work/wrk.out"; } 2> "$work/wrk.time"
      local wrk_s; wrk_s=$(awk '{print $1 + $2}' "$work/wrk.time")
      line=$(grep '^RESULT' "$work/wrk.out")
      line="$line $(echo "$wrk_s ${line#*duration_us=}" | awk '{printf "wrk_cpu=%.2f", $1 / ($2 / 1e6)}')"
      if [ -n "$pids_of" ]; then
        line="$line $(echo "$t0 $(ticks "$pids_of") ${line#*requests=}" | awk -v hz="$clk" \
          '{printf "user_us=%.2f sys_us=%.2f", ($3 - $1) * 1e6 / hz / $5, ($4 - $2) * 1e6 / hz / $5}')"
      fi
      echo "$c $line" >> "$out"
      echo "round $r/$ROUNDS $c: $line" >&2
    done
    order=("${order[@]:1}" "${order[0]}")   # rotate who goes first
  done
}

send_requests() { # send_requests PORT N KIND: N sequential requests on one keep-alive
  # connection, each a 200; KIND hit: the same POST /api/search every time (all
  # hits but the first), else GET /api/stats (default route, not cached)
  python3 - "$1" "$2" "$3" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
search = '{"query": "Học máy là gì?", "top_k": 5}'.encode()
for _ in range(int(sys.argv[2])):
    if sys.argv[3] == "hit":
        c.request("POST", "/api/search", search, {"Content-Type": "application/json"})
    else:
        c.request("GET", "/api/stats")
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}
