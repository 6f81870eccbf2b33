#!/usr/bin/env bash
# Streamed answers (text/event-stream) through the cache:
# 1. time to first byte and to last byte of a streamed miss (the app sends
#    EVENTS events, one every INTERVAL_MS) against a streamed hit of the same
#    answer, alternating miss and hit ROUNDS times, medians;
# 2. the memory of READERS clients following one stream at once (they join
#    the first request's stream: one upstream call): the sidecar's RSS before
#    and at the peak, per reader.
# On 127.0.0.1, bounded in count and time. Knobs: EVENTS (10), INTERVAL_MS
# (20), ROUNDS (15), READERS (100), BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-10}
INTERVAL_MS=${INTERVAL_MS:-20}
ROUNDS=${ROUNDS:-15}
READERS=${READERS:-100}
BIN=${BIN:-target/release}
. bench/lib.sh

up=$(free_port); sc=$(free_port)
start_app "$up" --rag-latency-ms 0
: > "$work/stream.toml"
start_sidecar "$sc" "$up" "$work/stream.toml" ENABLE_RATE_LIMIT=False
curl -fsS "http://127.0.0.1:$sc/healthz" >/dev/null

python3 - "$sc" "$sidecar_pid" "$up" "$EVENTS" "$INTERVAL_MS" "$ROUNDS" "$READERS" <<'PY'
import http.client, json, statistics, sys, threading, time

port, pid, up = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
events, interval, rounds, readers = (int(x) for x in sys.argv[4:8])
headers = {
    "Accept": "text/event-stream",
    "Content-Type": "application/json",
    "X-Mock-Stream-Events": str(events),
    "X-Mock-Stream-Interval-Ms": str(interval),
}

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def ask(q):
    """(x-cache, seconds to the first body byte, to the last, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.perf_counter()
    c.request("POST", "/api/rag/query", json.dumps({"query": q, "top_k": 2}), headers)
    r = c.getresponse()
    first = r.read1(65536) if hasattr(r, "read1") else r.read(1)
    t_first = time.perf_counter() - t
    rest = r.read()
    t_last = time.perf_counter() - t
    c.close()
    assert r.status == 200, r.status
    return r.getheader("X-Cache"), t_first, t_last, first + rest

miss_first, miss_last, hit_first, hit_last = [], [], [], []
for i in range(rounds):
    q = f"streamed question {i}"
    x, f, l, body = ask(q)
    assert x == "MISS", x
    miss_first.append(f); miss_last.append(l)
    for _ in range(50):  # stored when the stream ended: poll until it is
        x2, f2, l2, body2 = ask(q)
        if x2 == "HIT":
            break
        time.sleep(0.01)
    assert x2 == "HIT" and body2 == body, x2
    hit_first.append(f2); hit_last.append(l2)

ms = lambda xs: statistics.median(xs) * 1000
print(f"streamed answer of {events} events, one every {interval} ms ({len(body)} bytes), {rounds} rounds, medians:")
print(f"  miss: first byte {ms(miss_first):.2f} ms, last byte {ms(miss_last):.2f} ms")
print(f"  hit:  first byte {ms(hit_first):.2f} ms, last byte {ms(hit_last):.2f} ms")
print(f"  hit/miss: first byte {ms(hit_first) / ms(miss_first):.3f}x, last byte {ms(hit_last) / ms(miss_last):.4f}x")

# READERS clients on one long stream: all join the first one's.
long_headers = dict(headers, **{"X-Mock-Stream-Events": "50", "X-Mock-Stream-Interval-Ms": "100"})
time.sleep(0.5)
before = rss()
peak = [before]
done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
statuses, caches = [], []
def reader():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/api/rag/query", json.dumps({"query": "one stream for all", "top_k": 2}), long_headers)
    r = c.getresponse()
    caches.append(r.getheader("Cache-Status"))
    r.read()
    statuses.append(r.status)
    c.close()
threads = [threading.Thread(target=reader) for _ in range(readers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
done.set()
c = http.client.HTTPConnection("127.0.0.1", up); c.request("GET", "/__mock/stats")
stats = json.loads(c.getresponse().read())
assert all(s == 200 for s in statuses), statuses
collapsed = sum(1 for x in caches if x and x.endswith("collapsed"))
print(f"{readers} clients on one stream of 50 events (5 s): {collapsed} joined it; the app's streamed RAG calls in all: "
      f"{stats['by_path'].get('/api/rag/query')} ({rounds} of them the rounds above); "
      f"RSS {before/1024:.1f} MiB before, {peak[0]/1024:.1f} MiB at the peak: {(peak[0] - before) / readers:.1f} KiB per reader")
PY
