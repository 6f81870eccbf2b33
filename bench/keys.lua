-- Searches over KEYS distinct questions (KEYS is set by the script that
-- loads this one). FILL = true walks them in order, so each is asked at
-- least once (a miss that becomes an entry); otherwise each request picks
-- one at random (a hit once all are cached). The reporter is report.lua's.
dofile("bench/report.lua")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n, i = KEYS or 1000, 0
request = function()
  local k
  if FILL then
    i = i + 1
    k = (i - 1) % n + 1
  else
    k = math.random(n)
  end
  return wrk.format(nil, nil, nil, '{"query": "benchmark question ' .. k .. '", "top_k": 5}')
end
