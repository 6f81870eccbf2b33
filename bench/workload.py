#!/usr/bin/env python3
"""The workload benchmark: what the legacy app's users do, replayed against
each contender in turn, with the same requests at the same times, beside
what an ideal cache could have answered from the same schedule.

The mock app runs with the legacy latencies (search 250 ms, RAG 2 s) and
Gemini's free-tier quota enforced on RAG answers (15 in any 60 s, a sliding
window: beyond it the app answers 429 RESOURCE_EXHAUSTED, as Gemini does).
Arrivals are open-loop at a fixed rate (a request is sent at its time
whether or not the earlier ones have been answered): RATE requests a second,
RAG_SHARE of them RAG questions and the rest searches, drawn from a Zipf
distribution over QUESTIONS questions (Vietnamese and English, a third of
the repeats in NFD form or with stray whitespace); and an upload every
UPLOAD_EVERY seconds, which changes the corpus (every answer carries the
app's corpus version).

Each RAG question's answer is counted as fresh (of the corpus as it was
when the question was sent), from before an upload (an older corpus
version), or none (no 200). The reference is a greedy policy computed from
the same schedule and the app's quota: answer from the cache when it holds
an answer of the current corpus (or a call for it is under way), call
whenever the app's window has room, else answer with an older answer if
one exists, else none. It is what an ideal cache could answer; it never
waits.

Contenders (CONTENDERS, at each rate of RATES): `app` alone; `nginx` with
proxy_cache keyed on the body; `nolimit`, one rag-sidecar with no upstream
limit (it learns one from the app's quota errors); `limit`, one rag-sidecar
with RAG_UPSTREAM_LIMIT="15 per minute"; `limit2`, two such replicas on one
Redis, the requests alternating between them; `nolimit2`, two replicas with
no limit on one Redis (what the fleet learns together: one circuit for the
fleet, not in the default set). Rate limits off, as in bench.sh.

Per contender: the RAG answers fresh / from before an upload / none beside
the reference's, the RAG p95 of the 200s, the app's calls, quota errors at
the app and to clients, circuit 503s, refusals and stale answers, the
sidecars' CPU time and peak RSS. The table goes to the terminal (and to
target/workload.md), the chart to docs/workload.svg.

Knobs (environment): QUEUES (the sidecars' rag upstream_queue, one run of
each sidecar contender per value: `default` is the product's 10s; `make
bench-workload` runs default,4s), DURATION (s per contender, 90), RATES (10,2), RAG_SHARE
(0.25), QUESTIONS (200), UPLOAD_EVERY (s, 30), BIN (target/release),
CONTENDERS (app,nginx,nolimit,limit,limit2 at the first rate; the sidecars
at the others: CONTENDERS_LOW, nolimit,limit,limit2), SVG
(docs/workload.svg). `bench/workload.py --chart-only` draws the chart again
from the last run's figures (target/workload.json).
"""

import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, os.environ.get("BIN", "target/release"))
DURATION = float(os.environ.get("DURATION", "90"))
RATES = [float(r) for r in os.environ.get("RATES", "10,2").split(",")]
RAG_SHARE = float(os.environ.get("RAG_SHARE", "0.25"))
QUESTIONS = int(os.environ.get("QUESTIONS", "200"))
UPLOAD_EVERY = float(os.environ.get("UPLOAD_EVERY", "30"))
CONTENDERS = os.environ.get("CONTENDERS", "app,nginx,nolimit,limit,limit2").split(",")
CONTENDERS_LOW = os.environ.get("CONTENDERS_LOW", "nolimit,limit,limit2").split(",")
# The rag route's upstream_queue for the sidecars, one run of each sidecar
# contender per value ("default": the product's default, 10s).
QUEUES = os.environ.get("QUEUES", "default").split(",")
# The app's quota: RAG calls in any window of this many seconds.
QUOTA, QUOTA_WINDOW, RAG_LATENCY = 15, 60.0, 2.0
SVG = os.path.join(ROOT, os.environ.get("SVG", "docs/workload.svg"))
SEED = 20261202

TOPICS_VI = ["học máy", "học sâu", "mạng nơ-ron", "xử lý ngôn ngữ tự nhiên", "thị giác máy tính",
             "dữ liệu lớn", "điện toán đám mây", "an ninh mạng", "chuỗi khối", "trí tuệ nhân tạo"]
TOPICS_EN = ["vector databases", "embeddings", "retrieval augmented generation", "transformers",
             "fine-tuning", "prompt engineering", "tokenization", "attention", "RLHF", "quantization"]
FORMS_VI = ["{} là gì?", "Giải thích {} cho người mới bắt đầu", "Ứng dụng của {} trong y tế",
            "So sánh {} với thống kê truyền thống", "Lịch sử phát triển của {}"]
FORMS_EN = ["What is {}?", "Explain {} to a beginner", "How does {} work?",
            "Pros and cons of {}", "{} in production: what can go wrong?"]


def questions():
    qs = [f.format(t) for t in TOPICS_VI for f in FORMS_VI]
    qs += [f.format(t) for t in TOPICS_EN for f in FORMS_EN]
    # The long tail: asked once.
    qs += [f"Câu hỏi hiếm số {i} về {TOPICS_VI[i % 10]}" for i in range(400)]
    return qs


def zipf_weights(n, s=1.1):
    return [1.0 / (k ** s) for k in range(1, n + 1)]


def variant(q, rng):
    """A repeat as users type it: NFD, or stray whitespace."""
    if rng.random() < 0.5:
        return unicodedata.normalize("NFD", q)
    return "  " + q.replace(" ", "   ", 1) + " "


def schedule(rate):
    """The requests, the same for every contender at one rate:
    (time, kind, question)."""
    rng = random.Random(SEED)
    qs = questions()
    rng.shuffle(qs)
    qs = qs[:QUESTIONS]
    w = zipf_weights(len(qs))
    out = []
    seen = set()
    n = int(DURATION * rate)
    for i in range(n):
        kind = "rag" if rng.random() < RAG_SHARE else "search"
        q = rng.choices(qs, w)[0]
        repeat = (kind, q) in seen
        seen.add((kind, q))
        if repeat and rng.random() < 1 / 3:
            q = variant(q, rng)
        out.append((i / rate + rng.random() * 0.01, kind, q))
    t = UPLOAD_EVERY
    while t < DURATION:
        out.append((t, "upload", f"doc-{int(t)}.txt"))
        t += UPLOAD_EVERY
    out.sort()
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


class Procs:
    def __init__(self):
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="workload-")

    def start(self, args, env=None, cwd=None):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env, cwd=cwd or self.dir)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_app(ps):
    port = free_port()
    ps.start([os.path.join(BIN, "mock-legacy-app"), "--listen", f"127.0.0.1:{port}",
              "--threads", "2", "--search-latency-ms", "250", "--rag-latency-ms", "2000",
              "--quota", str(QUOTA), "--quota-window-ms", str(int(QUOTA_WINDOW * 1000))])
    wait_port(port)
    return port


def start_sidecar(ps, app, redis=None, limit=True, queue="default"):
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "LOG_LEVEL": "warn", "NUM_THREADS": "2",
           "ENABLE_RATE_LIMIT": "False"}
    if limit:
        env["RAG_UPSTREAM_LIMIT"] = f"{QUOTA} per minute"
    if redis:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis}/0"
    conf = os.path.join(ps.dir, f"sidecar-{port}.toml")
    with open(conf, "w") as f:
        if queue != "default":
            f.write(f'[[routes]]\nname = "rag"\nupstream_queue = "{queue}"\n')
    p = ps.start([os.path.join(BIN, "rag-sidecar"), "--config", conf,
                  "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{app}"], env=env)
    wait_port(port)
    if redis:
        for _ in range(200):
            try:
                if get_json(port, "/api/cache/stats").get("redis_connected"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
    return port, p.pid


def start_redis(ps):
    port = free_port()
    ps.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no"])
    wait_port(port)
    return port


def start_nginx(ps, app):
    port = free_port()
    d = ps.dir
    # nginx's workers drop to an unprivileged user: let them into the dirs.
    os.chmod(d, 0o755)
    for sub in ("body", "proxy", "cache", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
        os.chmod(os.path.join(d, sub), 0o777)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream app {{ server 127.0.0.1:{app}; keepalive 64; }}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=rag:16m max_size=256m inactive=60m use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        client_body_buffer_size 64k;
        location ~ ^/api/(search|rag/query)$ {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
            proxy_cache rag;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1h;
        }}
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else shutil.which("nginx")
    ps.start([nginx, "-c", conf, "-p", d])
    wait_port(port)
    return port


def get_json(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return json.loads(body)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def send(port, item):
    """One request: (kind, status, latency s, corpus version, x-cache, quota
    error, circuit open)."""
    _, kind, q = item
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        if kind == "upload":
            c.request("POST", f"/api/upload?filename={q}", b"x" * 2000,
                      {"Content-Type": "application/octet-stream"})
        else:
            path = "/api/search" if kind == "search" else "/api/rag/query"
            body = json.dumps({"query": q, "top_k": 3}, ensure_ascii=False).encode()
            c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        status, x_cache = r.status, r.getheader("X-Cache") or ""
        c.close()
    except OSError as e:
        return kind, 0, time.perf_counter() - t, None, str(e), False, False
    latency = time.perf_counter() - t
    version, quota = None, False
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            version = doc.get("corpus_version")
    except ValueError:
        pass
    text = data[:400].decode("utf-8", "replace")
    if status == 429 or "RESOURCE_EXHAUSTED" in text or "Resource exhausted" in text:
        quota = True
    circuit = status == 503 and "Circuit breaker OPEN" in text
    return kind, status, latency, version, x_cache, quota, circuit


def normalize(q):
    """The question as the cache keys it: NFC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", q).split())


def reference(plan):
    """The greedy reference policy's RAG answers on `plan`: (fresh, from
    before an upload, none, calls)."""
    uploads = [t for t, kind, _ in plan if kind == "upload"]
    calls = []          # when each call to the app left
    answers = {}        # question -> (corpus version, ready at)
    fresh = old = none = 0
    for t, kind, q in plan:
        if kind != "rag":
            continue
        key = normalize(q)
        version = sum(1 for u in uploads if u < t)
        have = answers.get(key)
        if have and have[0] == version:
            # A hit, or a call for it under way (coalesced): fresh.
            fresh += 1
            continue
        calls = [c for c in calls if c > t - QUOTA_WINDOW]
        if len(calls) < QUOTA:
            calls.append(t)
            answers[key] = (version, t + RAG_LATENCY)
            fresh += 1
        elif have and have[1] <= t:
            old += 1
        else:
            none += 1
    used = sum(1 for t, kind, _ in plan if kind == "rag")
    return {"fresh": fresh, "old": old, "none": none, "rag": used}


def run(name, ports, ps, pids, app, plan):
    records = [None] * len(plan)
    uploads = []  # (time answered, corpus version after it)
    lock = threading.Lock()
    cpu0 = {p: cpu_seconds(p) for p in pids}
    start = time.perf_counter() + 0.5

    def fire(i, item):
        port = ports[i % len(ports)]
        sent = time.perf_counter() - start
        rec = send(port, item)
        records[i] = (sent,) + rec
        if item[1] == "upload" and rec[1] == 200:
            with lock:
                uploads.append(time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=400) as pool:
        for i, item in enumerate(plan):
            delay = start + item[0] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(fire, i, item)
    stats = get_json(app, "/__mock/stats")
    cpu = sum(cpu_seconds(p) - cpu0[p] for p in pids)
    rss = [peak_rss_kib(p) for p in pids]
    uploads.sort()
    answered = [r for r in records if r and r[1] != "upload"]
    # An answer is from before an upload when its version is older than the
    # number of uploads answered before it was sent (the app's version
    # counts uploads).
    def owed(sent):
        return sum(1 for u in uploads if u < sent)
    old = [r for r in answered if r[4] is not None and r[2] == 200 and r[4] < owed(r[0])]
    rag = [r for r in answered if r[1] == "rag"]
    rag_fresh = sum(1 for r in rag if r[2] == 200 and r[4] is not None and r[4] >= owed(r[0]))
    rag_old = sum(1 for r in rag if r[2] == 200 and r[4] is not None and r[4] < owed(r[0]))
    old_stale = sum(1 for r in old if r[5] == "STALE")
    lat = sorted(r[3] for r in answered if r[2] == 200)
    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")
    by_kind = {k: sorted(r[3] for r in answered if r[1] == k and r[2] == 200) for k in ("search", "rag")}
    return {
        "name": name,
        "requests": len(answered),
        "ok": len(lat),
        "p50": pct(50), "p95": pct(95), "p99": pct(99),
        "search_calls": stats["by_path"].get("/api/search", 0),
        "rag_calls": stats["by_path"].get("/api/rag/query", 0),
        "quota_at_app": stats.get("quota_errors", 0),
        "quota_to_clients": sum(1 for r in answered if r[6]),
        "refused": sum(1 for r in answered if r[2] == 503),
        "stale": sum(1 for r in answered if r[5] == "STALE"),
        "old_fresh": len(old) - old_stale,
        "old_stale": old_stale,
        "rag_p95": (lambda l: l[min(len(l) - 1, int(0.95 * len(l)))] * 1000 if l else float("nan"))(by_kind["rag"]),
        "errors": sum(1 for r in answered if r[2] == 0 or (r[2] >= 500 and r[2] != 503)),
        "rag": len(rag), "rag_fresh": rag_fresh, "rag_old": rag_old,
        "rag_none": len(rag) - rag_fresh - rag_old,
        "circuit_503": sum(1 for r in answered if r[7]),
        "cpu": cpu if pids else None,
        "rss": max(rss) / 1024 if rss else None,
        "latencies": by_kind,
        "uploads": len(uploads),
    }


SHORT = {
    "the app alone": "app alone",
    "nginx proxy_cache": "nginx cache",
    "rag-sidecar, no limit set (learned)": "sidecar, learned",
    "rag-sidecar, 15 per minute": "sidecar, 15/min",
    "rag-sidecar x2 on Redis, 15 per minute": "sidecar x2, 15/min",
    "rag-sidecar x2 on Redis, no limit set (learned)": "sidecar x2, learned",
    "reference": "reference",
}


CONTENDER_NAMES = {
    "app": "the app alone",
    "nginx": "nginx proxy_cache",
    "nolimit": "rag-sidecar, no limit set (learned)",
    "limit": "rag-sidecar, 15 per minute",
    "limit2": "rag-sidecar x2 on Redis, 15 per minute",
    "nolimit2": "rag-sidecar x2 on Redis, no limit set (learned)",
}


def contender(which, rate, queue="default"):
    plan = schedule(rate)
    ps = Procs()
    try:
        app = start_app(ps)
        pids = []
        if which == "app":
            ports = [app]
        elif which == "nginx":
            ports = [start_nginx(ps, app)]
        elif which in ("limit", "nolimit"):
            port, pid = start_sidecar(ps, app, limit=which == "limit", queue=queue)
            ports, pids = [port], [pid]
        else:
            redis = start_redis(ps)
            limit = which == "limit2"
            a, pa = start_sidecar(ps, app, redis, limit=limit, queue=queue)
            b, pb = start_sidecar(ps, app, redis, limit=limit, queue=queue)
            ports, pids = [a, b], [pa, pb]
        r = run(CONTENDER_NAMES[which], ports, ps, pids, app, plan)
        r["rate"] = rate
        r["key"] = which
        if queue != "default":
            r["queue"] = queue
        return r
    finally:
        ps.cleanup()


def table(results):
    rates = sorted({r["rate"] for r in results}, reverse=True)
    lines = [
        f"{DURATION:.0f} s of open-loop arrivals per contender, {RAG_SHARE:.0%} of them RAG questions and the rest "
        f"searches (Zipf over {QUESTIONS} questions, a third of the repeats in NFD or with stray whitespace), "
        f"an upload every {UPLOAD_EVERY:g} s; the app: search 250 ms, RAG 2 s, Gemini quota {QUOTA} RAG calls "
        f"in any {QUOTA_WINDOW:.0f} s. RAG answers: fresh / from before an upload / none, beside the greedy "
        f"reference computed from the same schedule.",
    ]
    for rate in rates:
        ref = reference(schedule(rate))
        lines += [
            "",
            f"At {rate:g} requests/s ({ref['rag']} RAG questions):",
            "",
            "| contender | RAG fresh | from before an upload | none | fresh / reference | RAG p95 ms (200s) | app calls: RAG | app calls: search | quota errors at the app | quota errors to clients | circuit 503s | refused (503) | stale answers | p50 ms (all) | sidecar CPU s | sidecar peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| reference (greedy, ideal cache) | {ref['fresh']} | {ref['old']} | {ref['none']} | 1.00 | – | – | – | 0 | 0 | 0 | – | – | – | – | – |",
        ]
        for r in (r for r in results if r["rate"] == rate):
            cpu = f"{r['cpu']:.1f}" if r["cpu"] is not None else "–"
            rss = f"{r['rss']:.1f}" if r["rss"] is not None else "–"
            share = r["rag_fresh"] / ref["fresh"] if ref["fresh"] else float("nan")
            name = r["name"] + (f", queue {r['queue']}" if r.get("queue") else "")
            lines.append(
                f"| {name} | {r['rag_fresh']} | {r['rag_old']} | {r['rag_none']} | {share:.2f} | "
                f"{r['rag_p95']:.0f} | {r['rag_calls']} | {r['search_calls']} | {r['quota_at_app']} | "
                f"{r['quota_to_clients']} | {r['circuit_503']} | {r['refused']} | {r['stale']} | {r['p50']:.1f} | "
                f"{cpu} | {rss} |"
            )
    return "\n".join(lines)


def chart(results, work):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("gnuplot missing: no chart", file=sys.stderr)
        return
    rates = sorted({r["rate"] for r in results}, reverse=True)
    panels = []
    for i, rate in enumerate(rates):
        ref = reference(schedule(rate))
        path = os.path.join(work, f"answers{i}.dat")
        with open(path, "w") as f:
            f.write(f"\"reference\" {ref['fresh']} {ref['old']} {ref['none']}\n")
            for r in (r for r in results if r["rate"] == rate):
                label = SHORT.get(r["name"], r["name"]) + (f", q {r['queue']}" if r.get("queue") else "")
                f.write(f"\"{label}\" {r['rag_fresh']} {r['rag_old']} {r['rag_none']}\n")
        panels.append(f"""
set title 'RAG answers at {rate:g} requests/s ({ref['rag']} questions)'
plot '{path}' using 2:xtic(1) title 'fresh' lc rgb '#2a9d8f', '' using 3 title 'from before an upload' lc rgb '#e9c46a', '' using 4 title 'none' lc rgb '#e76f51'
""")
    script = f"""
set terminal svg size {620 * len(rates) + 40},520 dynamic noenhanced font 'sans,11' background '#ffffff'
set output '{SVG}'
set multiplot layout 1,{len(rates)} title 'Workload: {DURATION:.0f} s per contender, open-loop, Zipf questions, Gemini quota {QUOTA} in any {QUOTA_WINDOW:.0f} s'
set style data histograms
set style histogram rowstacked
set style fill solid 0.85 border -1
set boxwidth 0.7
set xtics scale 0 rotate by -25
set ylabel 'RAG questions'
set key top right
set yrange [0:*]
set grid ytics
{"".join(panels)}
unset multiplot
"""
    subprocess.run([gnuplot], input=script.encode(), check=True)
    print(f"chart: {os.path.relpath(SVG, ROOT)}")


def main():
    saved = os.path.join(ROOT, "target/workload.json")
    if sys.argv[1:] == ["--chart-only"]:
        # Draws the chart again from the last run's figures.
        with open(saved) as f:
            results = json.load(f)
    else:
        results = []
        for i, rate in enumerate(RATES):
            for queue in QUEUES:
                for which in CONTENDERS if i == 0 else CONTENDERS_LOW:
                    if which in ("app", "nginx") and queue != QUEUES[0]:
                        continue
                    print(f"running: {CONTENDER_NAMES[which]} at {rate:g}/s, queue {queue} "
                          f"({DURATION:.0f} s)...", file=sys.stderr, flush=True)
                    results.append(contender(which, rate, queue))
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        with open(saved, "w") as f:
            json.dump(results, f)
    text = table(results)
    print(text)
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target/workload.md"), "w") as f:
        f.write(text + "\n")
    work = tempfile.mkdtemp(prefix="workload-chart-")
    try:
        chart(results, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
