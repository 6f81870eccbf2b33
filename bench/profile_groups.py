"""Groups `perf report --sort dso,sym` lines (read on stdin) into the kernel
and groups of user-space code, and prints each group's share of the samples
and of the measured CPU time per request. Used by bench/profile.sh.

argv: NAME REQUESTS SECONDS CPU_US_PER_REQUEST
"""

import collections
import re
import sys

# Crate (first path segment of a Rust symbol) -> group. Everything the
# design card's HTTP stack and runtime do per request, whoever calls it.
GROUPS = {
    "hyper": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "hyper_util": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "http": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "httparse": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "bytes": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "http_body": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "http_body_util": "HTTP stack: hyper, hyper-util, http, httparse, bytes, http-body",
    "tokio": "runtime: tokio, mio",
    "mio": "runtime: tokio, mio",
    "tower": "tower, tower-http",
    "tower_http": "tower, tower-http",
    "tower_service": "tower, tower-http",
    "tower_layer": "tower, tower-http",
    "rag_sidecar": "rag-sidecar's own code",
    "sha2": "cache key: sha2, serde_json, unicode-normalization, percent-encoding",
    "serde_json": "cache key: sha2, serde_json, unicode-normalization, percent-encoding",
    "serde_core": "cache key: sha2, serde_json, unicode-normalization, percent-encoding",
    "unicode_normalization": "cache key: sha2, serde_json, unicode-normalization, percent-encoding",
    "percent_encoding": "cache key: sha2, serde_json, unicode-normalization, percent-encoding",
    "quick_cache": "cache store: quick_cache",
}
LIBC_ALLOC = ("malloc", "free", "_int_", "consolidate", "realloc", "calloc")


def group(dso: str, sym: str) -> str:
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libc"):
        if any(x in sym for x in LIBC_ALLOC):
            return "malloc/free (glibc)"
        if "mem" in sym:
            return "memcpy/memcmp (glibc)"
        return "other libc (syscall wrappers)"
    if dso.startswith("[vdso"):
        return "clock reads (vdso)"
    # jemalloc (the default allocator) is linked into the binary, its
    # symbols prefixed.
    if sym.startswith(("_rjem_", "je_", "_rjem_je_")):
        return "malloc/free (jemalloc)"
    s = sym.lstrip("<")
    if "::" in s:
        crate = s.split("::")[0].split(" as ")[0].lstrip("&").strip()
        return GROUPS.get(crate, "other Rust crates (core, alloc, std, futures, ...)")
    return "other"


def main() -> None:
    name, requests, seconds, cpu_us = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    share = collections.Counter()
    for line in sys.stdin:
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if m:
            share[group(m.group(2), m.group(3))] += float(m.group(1))
    total = sum(share.values()) or 1.0
    print(f"\n{name}: {requests / seconds:,.0f} requests/s and {cpu_us:.2f} µs CPU per "
          f"request (user + kernel) without perf; shares from a second run under perf\n")
    print("| where | share of the sidecar's CPU | µs per request |")
    print("|---|---:|---:|")
    for g, p in share.most_common():
        print(f"| {g} | {p / total * 100:.1f} % | {p / total * cpu_us:.2f} |")


if __name__ == "__main__":
    main()
