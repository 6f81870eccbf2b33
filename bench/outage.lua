-- Outage comparison load: 20 search questions in turn (all cached before the
-- outage); counts each status. Run with -t1.
counts = {}
local n = 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
request = function()
  n = n + 1
  return wrk.format("POST", "/api/search", { ["Content-Type"] = "application/json" },
    string.format('{"query": "outage question %d", "top_k": 3}', n % 20))
end
response = function(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
done = function(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for s, c in pairs(t:get("counts")) do table.insert(parts, s .. "=" .. c) end
  end
  io.write(string.format("STATUSES requests=%d p99_us=%d errors=%d %s\n", summary.requests,
    latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, " ")))
end
