#!/usr/bin/env python3
"""Fault scenario for `make bench`: the app answers 503 to everything for
DURATION seconds while wrk loads the sidecar. Reports the upstream attempts
per client request (what retries and the circuit make of an outage), when the
circuit opened, and how fast requests fail once it is open.

usage: fault.py SIDECAR_PORT MOCK_PORT DURATION_S CONNECTIONS PATH
"""
import http.client
import json
import statistics
import subprocess
import sys
import time

sc, mock, duration, conns, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]


def call(port, method, p, body=None):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    c.request(method, p, body, {"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def upstream_requests():
    return json.loads(call(mock, "GET", "/__mock/stats")[1])["requests"]


call(mock, "POST", "/__mock/stats/reset")
call(sc, "POST", "/api/circuit-breakers/reset")
call(mock, "POST", "/__mock/faults", json.dumps({"status": 503}))
start = time.monotonic()
wrk = subprocess.Popen(
    ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", "bench/report.lua", f"http://127.0.0.1:{sc}{path}"],
    stdout=subprocess.PIPE, text=True)
opened = None
while wrk.poll() is None:
    if opened is None:
        states = json.loads(call(sc, "GET", "/api/circuit-breakers")[1])
        if states["upstream"]["state"] == "open":
            opened = time.monotonic() - start
    time.sleep(0.01)
result = dict(kv.split("=") for kv in next(l for l in wrk.stdout.read().splitlines() if l.startswith("RESULT")).split()[1:])
attempts = upstream_requests()
# Fail-fast latency once open: sequential requests on one keep-alive connection.
c = http.client.HTTPConnection("127.0.0.1", int(sc), timeout=30)
lat, statuses = [], set()
for _ in range(500):
    t = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    lat.append((time.perf_counter() - t) * 1e6)
    statuses.add(r.status)
c.close()
call(mock, "DELETE", "/__mock/faults")
call(sc, "POST", "/api/circuit-breakers/reset")

requests = int(result["requests"])
print(f"Outage (the app answers 503 to everything for {duration} s, wrk -c{conns}, GET {path}):\n")
print("| figure | value |")
print("|---|---:|")
print(f"| client requests | {requests:,} |")
print(f"| upstream attempts | {attempts:,} |")
print(f"| upstream attempts per client request | {attempts / requests:.4f} |")
print(f"| circuit open after | {opened * 1000:.0f} ms |" if opened is not None else "| circuit open after | never |")
print(f"| wrk p50 / p99 over the outage | {int(result['p50_us']) / 1000:.3f} / {int(result['p99_us']) / 1000:.3f} ms |")
print(f"| one request once open (median of 500, sequential) | {statistics.median(lat):.0f} µs, status {sorted(statuses)} |")
