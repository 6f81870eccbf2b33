"""Fills a sidecar's search cache: N distinct POST /api/search (~4 KiB
answers each), then prints "ITEMS MIB" of the search namespace (and a line
on stderr). Used by bench.sh and alloc.sh. Usage: fill.py PORT [N]"""
import http.client
import json
import sys

port, n = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
conn = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    body = json.dumps({"query": f"benchmark question {i}", "top_k": 32})
    conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
conn.request("GET", "/api/cache/stats")
ns = json.loads(conn.getresponse().read())["namespaces"]["search"]
print(f"filled: {ns['items']} items, {ns['bytes']/1048576:.1f} MiB of entries", file=sys.stderr)
print(ns["items"], round(ns["bytes"] / 1048576, 1))
