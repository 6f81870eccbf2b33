-- The same search question every time: a cache hit after the first.
-- The reporter is report.lua's (wrk runs from the repository root).
dofile("bench/report.lua")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"query": "Học máy là gì?", "top_k": 5}'
