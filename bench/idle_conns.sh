#!/usr/bin/env bash
# What an idle client connection costs the sidecar: N connections that each
# send one request, read the answer and stay open (keep-alive, idle), then
# the RSS before and after, per connection; and that past max_connections a
# new connection is closed at once. On 127.0.0.1, bounded in count and time.
# Knobs: CONNS (2000), BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-2000}
BIN=${BIN:-target/release}
. bench/lib.sh

up=$(free_port); sc=$(free_port)
start_app "$up"
printf 'max_connections = %d\nheader_read_timeout = "120s"\n' "$((CONNS + 100))" > "$work/conns.toml"
start_sidecar "$sc" "$up" "$work/conns.toml" ENABLE_RATE_LIMIT=False
scpid=$sidecar_pid
curl -fsS "http://127.0.0.1:$sc/healthz" >/dev/null

python3 - "$sc" "$scpid" "$CONNS" <<'PY'
import socket, sys, time
port, pid, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
time.sleep(0.5)
before = rss()
held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:40]
    held.append(s)
time.sleep(0.5)
after = rss()
print(f"{n} idle keep-alive connections: RSS {before/1024:.1f} MiB before, {after/1024:.1f} MiB after: "
      f"{(after - before) / n:.1f} KiB per connection")
for s in held:
    s.close()
PY
