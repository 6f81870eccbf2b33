# rag-sidecar: `make run` to try it, `make test` to check it.
# Builds use -j2: the project's machines have two cores.

CARGO ?= cargo
JOBS  ?= 2
# Where `make run` puts the mock app and the sidecar.
MOCK_ADDR ?= 127.0.0.1:5000
LISTEN    ?= 127.0.0.1:5003

.PHONY: all build release run test lint unit bench clean

all: build

build:
	$(CARGO) build -j$(JOBS) --bins

release:
	$(CARGO) build -j$(JOBS) --release --bins

## Start the mock legacy app and the sidecar in front of it (Ctrl-C stops both).
run: build
	MOCK_ADDR=$(MOCK_ADDR) LISTEN=$(LISTEN) scripts/run.sh target/debug

## Lint, then every test (unit, integration, real processes).
test: lint unit

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -j$(JOBS) --all-targets -- -D warnings

# Benches are compiled by clippy --all-targets above and run by `make bench`.
unit:
	$(CARGO) test -j$(JOBS) --lib --bins --tests

## Throughput/latency against nginx and a direct connection (installs wrk,
## nginx), instructions per request of the optional layers (callgrind), then
## the criterion benches of the cache's, limiter's and metrics'
## hot paths and of a /metrics scrape.
bench: release
	bench/bench.sh
	bench/instructions.sh
	$(CARGO) bench -j$(JOBS) --bench cache --bench rate_limit --bench metrics -- --warm-up-time 1 --measurement-time 3

clean:
	$(CARGO) clean
