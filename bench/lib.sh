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
# The configuration a baseline build runs with: its own checkout's shipped
# file (BASELINE=<checkout>/target/release), else the built-in defaults (an
# older build refuses the keys a newer file adds).
baseline_config() {
  local own; own=$(realpath -m "$BASELINE/../../config/rag-sidecar.toml")
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
