"""The tables of the bench scripts (bench.sh, alloc.sh): wrk's RESULT lines
("NAME RESULT requests=.. duration_us=.. p50_us=.. p99_us=.. errors=..
wrk_cpu=.. [user_us=.. sys_us=..]", one per run, from lib.sh's run_rounds)
as a Markdown table of medians, and the per-round ratios of two
contenders."""
import collections
import statistics


def table(path, names):
    """Prints the table of `names` (in that order); returns each one's
    median (requests/s, p50 ms, p99 ms[, user µs per request])."""
    rows = collections.defaultdict(list)
    for line in open(path):
        name, _, *kv = line.split()
        rows[name].append(dict(x.split("=") for x in kv))
    med = {}
    cpu = all("user_us" in r for n in names for r in rows[n])
    print("| contender | requests/s (median) | p50 ms | p99 ms | errors | runs | wrk's CPU |" + (" CPU µs/request, user + kernel (median) |" if cpu else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else ""))
    for name in names:
        runs = rows[name]
        rps = statistics.median(int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in runs)
        p50 = statistics.median(int(r["p50_us"]) for r in runs) / 1000
        p99 = statistics.median(int(r["p99_us"]) for r in runs) / 1000
        errs = sum(int(r["errors"]) for r in runs)
        med[name] = (rps, p50, p99) + ((statistics.median(float(r["user_us"]) for r in runs),) if cpu else ())
        wrk = statistics.median(float(r["wrk_cpu"]) for r in runs)
        line = f"| {name} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {errs} | {len(runs)} | {wrk:.2f} |"
        if cpu:
            u = statistics.median(float(r["user_us"]) for r in runs)
            k = statistics.median(float(r["sys_us"]) for r in runs)
            line += f" {u:.1f} + {k:.1f} = {u + k:.1f} |"
        print(line)
    print()
    return med


def paired(path, a, b):
    """Median and range of the per-round ratios a/b: the two ran back to
    back in each round, so machine drift between rounds cancels out."""
    rows = collections.defaultdict(list)
    for line in open(path):
        name, _, *kv = line.split()
        r = dict(x.split("=") for x in kv)
        rows[name].append(int(r["requests"]) / (int(r["duration_us"]) / 1e6))
    ratios = sorted(x / y for x, y in zip(rows[a], rows[b]))
    return statistics.median(ratios), ratios[0], ratios[-1]
