#!/usr/bin/env bash
# The workload benchmark (`make bench-workload`, also in `make bench`): see
# bench/workload.py. Installs nginx, gnuplot and redis-server from Debian
# when missing; writes the table to target/workload.md and the chart to
# docs/workload.svg. Knobs: DURATION (s per contender, 120), SEARCH_RATE,
# RAG_RATE, UPLOAD_EVERY, CONTENDERS, BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
. bench/lib.sh
nginx_bin >/dev/null
need gnuplot gnuplot-nox
need redis-server redis-server
BIN=$BIN QUEUES=${QUEUES:-default,4s} python3 bench/workload.py
