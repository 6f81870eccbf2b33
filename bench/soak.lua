-- Soak load: every request a new search question (a new cache key) from one
-- of 100 000 client addresses (X-Forwarded-For, the sidecar trusts the
-- loopback peer). SOAK_OFFSET makes each wrk run's questions new.
dofile("bench/report.lua")
local n = tonumber(os.getenv("SOAK_OFFSET") or "0")
request = function()
  n = n + 1
  local c = n % 100000
  local ip = string.format("10.%d.%d.%d", math.floor(c / 65536), math.floor(c / 256) % 256, c % 256)
  local body = string.format('{"query": "soak question %d", "top_k": 3}', n)
  return wrk.format("POST", "/api/search",
    { ["Content-Type"] = "application/json", ["X-Forwarded-For"] = ip }, body)
end
