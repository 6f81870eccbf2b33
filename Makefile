# rag-sidecar: `make run` to try it, `make test` to check it.
# Builds use -j2: the project's machines have two cores.

CARGO ?= cargo
JOBS  ?= 2
# Where `make run` puts the mock app and the sidecar.
MOCK_ADDR ?= 127.0.0.1:5000
LISTEN    ?= 127.0.0.1:5003

.PHONY: all build release run test setup lint unit bench bench-workload bench-alloc profile fuzz chaos soak clean

all: build

# Both binaries, rag-sidecar and mock-legacy-app (the mock-app workspace
# member), side by side in target/debug (target/release).
build:
	$(CARGO) build -j$(JOBS) --bins

release:
	$(CARGO) build -j$(JOBS) --release --bins

## Start the mock legacy app and the sidecar in front of it (Ctrl-C stops both).
run:
	@echo "make run: building the sidecar and the mock app (the first build takes a few minutes; later ones seconds)"
	$(CARGO) build -j$(JOBS) --bins
	MOCK_ADDR=$(MOCK_ADDR) LISTEN=$(LISTEN) scripts/run.sh target/debug

## Install what the tests need when missing (scripts/setup.sh, the list
## .ci/run uses too), lint, then every test (unit, integration, real
## processes), each binary run even when another fails.
test: setup lint unit

setup:
	scripts/setup.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -j$(JOBS) --all-targets --workspace -- -D warnings

# Benches are compiled by clippy --all-targets above and run by `make bench`.
# The tests build the mock themselves (tests/common/mod.rs, mock_bin).
unit:
	CARGO=$(CARGO) JOBS=$(JOBS) scripts/test.sh

## Throughput/latency against nginx and a direct connection (installs wrk,
## nginx), cache-hit cost at 1 000 vs 100 000 entries, the memory of an idle
## connection, instructions per request of the optional layers (callgrind),
## what tracing costs (off, exporting at 0.01 and at 1.0), then
## the criterion benches of the cache's, limiter's and metrics'
## hot paths and of a /metrics scrape. The floor the tables compare with,
## a bare hyper server, is examples/hyper_floor.rs.
bench: release
	$(CARGO) build -j$(JOBS) --release --example hyper_floor
	bench/bench.sh
	bench/hit_scale.sh
	bench/idle_conns.sh
	bench/instructions.sh
	bench/allocs.sh
	bench/traces.sh
	bench/stream.sh
	bench/workload.sh
	$(CARGO) bench -j$(JOBS) --bench cache --bench rate_limit --bench metrics -- --warm-up-time 1 --measurement-time 3

## The allocator, measured: glibc's, mimalloc and jemalloc builds side by
## side (bench/alloc.sh; three release builds, then wrk rounds and RSS).
bench-alloc:
	bench/alloc.sh

## The workload benchmark alone (bench/workload.sh): the legacy app's
## users replayed open-loop at 10 and 2 requests/s against the app alone,
## nginx proxy_cache, a rag-sidecar with no limit set (learned), one with
## the limit and two on Redis with it, the RAG answers counted fresh / from
## before an upload / none beside a greedy reference policy computed from
## the same schedule; table in target/workload.md, chart in docs/workload.svg.
bench-workload: release
	bench/workload.sh

## Where the sidecar's CPU time per request goes, by crate (perf samples
## under the bench's load, proxied and cache hits; installs linux-perf).
profile:
	$(CARGO) build -j$(JOBS) --profile profiling --bins
	bench/profile.sh

## The chaos runs at full size (CHAOS=full): tests/chaos.rs, faults of 10 s
## under 32 clients, table in target/chaos.md; tests/chaos_fleet.rs, three
## sidecars with uploads while Redis is killed and restarted, table in
## target/chaos-fleet.md (`make test` runs both at test size); then the
## app-down comparison with nginx (bench/outage.sh).
chaos: release
	CHAOS=full $(CARGO) test -j$(JOBS) --release --test chaos --test chaos_fleet -- --nocapture
	bench/outage.sh

## About a million searches with new cache keys from 100 000 client
## addresses; RSS must stay under its stated bound and throughput must not
## decay (bench/soak.sh).
soak: release
	bench/soak.sh

## Fuzz the pure parsers (fuzz/fuzz_targets) for FUZZ_SECONDS each, with
## cargo-fuzz (installed when missing). This machine has only the stable
## toolchain; cargo-fuzz's -Z flags are enabled with RUSTC_BOOTSTRAP=1.
## A crash is saved in fuzz/artifacts/<target>/ and fails the run; it then
## becomes a regression test.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = dotenv config_toml rate_limit_string cache_key retry_after quota_match cache_directives
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t fuzz/seeds/$$t; \
	  CARGO_BUILD_JOBS=$(JOBS) RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t fuzz/corpus/$$t fuzz/seeds/$$t \
	    -- -max_total_time=$(FUZZ_SECONDS); \
	done

clean:
	$(CARGO) clean
