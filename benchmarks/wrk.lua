-- Load script for wrk (Debian's wrk 4.x, LuaJIT), driven by benchmarks/wrk.py.
-- POSTs a small JSON event; pins each wrk thread (one connection each) to one address from BENCH_ADDRS
-- ("host:port,host:port,..."), so a target with one execution environment per connection is driven the
-- way Lambda drives environments: never two invocations at once on one environment.
-- Collects the X-Lambdalet-Duration-Ms header (the bootstrap's own time as the agent measures it) and
-- prints one machine-readable line "WRKJSON {...}" at the end.

wrk.method = "POST"
wrk.body = '{"bench": true, "payload": "0123456789abcdef"}'
wrk.headers["Content-Type"] = "application/json"

local threads = {}
local targets = {}
for host, port in string.gmatch(os.getenv("BENCH_ADDRS") or "", "([^,:]+):(%d+)") do
  targets[#targets + 1] = { host, port }
end

function setup(thread)
  if #targets > 0 then
    local pick = targets[(#threads % #targets) + 1]
    thread.addr = wrk.lookup(pick[1], pick[2])[1]
  end
  threads[#threads + 1] = thread
end

durations = {}
ndurations = 0
statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local value = headers["X-Lambdalet-Duration-Ms"] or headers["x-lambdalet-duration-ms"]
  if value then
    ndurations = ndurations + 1
    durations[ndurations] = tonumber(value)
  end
end

function done(summary, latency, requests)
  local merged = {}
  local codes = {}
  for _, thread in ipairs(threads) do
    local list = thread:get("durations")
    local n = thread:get("ndurations")
    for i = 1, n do merged[#merged + 1] = string.format("%.4f", list[i]) end
    for code, count in pairs(thread:get("statuses")) do codes[code] = (codes[code] or 0) + count end
  end
  local parts = {}
  for code, count in pairs(codes) do parts[#parts + 1] = string.format('"%d": %d', code, count) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %.1f, "p90": %.1f, "p99": %.1f, "p999": %.1f, "mean": %.1f, "max": %.1f}, ' ..
    '"statuses": {%s}, "duration_ms": [%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max,
    table.concat(parts, ", "), table.concat(merged, ",")))
end
