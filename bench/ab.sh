#!/usr/bin/env bash
# This build against another, alone: bench/builds.sh with the two, for
# cache hits (POST /api/search, same body) and proxied requests
# (GET /api/stats). A longer look than bench.sh's BASELINE rounds when
# those straddle 1.0. On 127.0.0.1, bounded in rounds and time.
# Usage: BASELINE=<dir holding the other rag-sidecar> bash bench/ab.sh
# Knobs: ROUNDS (12), DURATION (3s), CONNECTIONS (50), BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BASELINE:?set BASELINE to the directory of the other build}"
export ROUNDS=${ROUNDS:-12} DURATION=${DURATION:-3s} CONNECTIONS=${CONNECTIONS:-50}
BIN=${BIN:-target/release}
for what in hits proxied; do
  WHAT=$what bash bench/builds.sh new="$BIN" old="$BASELINE"
done
