#!/usr/bin/env bash
# Starts the mock legacy app (with its realistic latencies: search 250 ms,
# RAG answer 2 s) and rag-sidecar in front of it, prints curl lines to try,
# and stops both on Ctrl-C. Used by `make run`.
set -euo pipefail
bin=${1:-target/debug}
MOCK_ADDR=${MOCK_ADDR:-127.0.0.1:5000}
LISTEN=${LISTEN:-127.0.0.1:5003}

"$bin/mock-legacy-app" --listen "$MOCK_ADDR" &
mock=$!
trap 'kill $mock 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/${MOCK_ADDR%:*}/${MOCK_ADDR##*:}") 2>/dev/null && break
  sleep 0.1
done

cat <<MSG

  mock legacy app : http://$MOCK_ADDR
  rag-sidecar     : http://$LISTEN   (config: config/rag-sidecar.toml)
  Ctrl-C here stops both.

  Try, in another terminal:
    curl -s http://$LISTEN/healthz
    curl -s http://$LISTEN/readyz
    curl -s -X POST http://$LISTEN/api/search -H 'Content-Type: application/json' \\
         -d '{"query": "Học máy là gì?", "top_k": 3}'
    # the same question again, with stray spaces: X-Cache: HIT, at once
    curl -s -i -X POST http://$LISTEN/api/search -H 'Content-Type: application/json' \\
         -d '{"query": "  Học máy là gì? ", "top_k": 3}'
    curl -s -X POST http://$LISTEN/api/rag/query -H 'Content-Type: application/json' \\
         -d '{"query": "What is RAG?", "top_k": 5, "language": "auto"}'
    curl -s -F file=@README.md http://$LISTEN/api/upload
    curl -s http://$LISTEN/api/documents
    curl -s -i http://$LISTEN/api/stats -H 'X-Mock-Status: 503'      # the app failing
    curl -s -i http://$LISTEN/api/stats -H 'X-Mock-Delay-Ms: 40000'  # past the 30 s timeout: 504
    $bin/rag-sidecar check-config --config config/rag-sidecar.toml

MSG

"$bin/rag-sidecar" --config config/rag-sidecar.toml --listen "$LISTEN" --upstream "http://$MOCK_ADDR"
