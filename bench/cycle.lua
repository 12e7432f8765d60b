-- wrk script: cycles through the request paths listed (one a line) in the file named
-- after `--`. With T threads (second argument) thread i takes the paths i, i+T, i+2T...
-- so two threads never ask for the same path at once (edge coalesces identical
-- in-flight misses, which would flatter it). At the end one line "BENCHJSON {...}" sums
-- the run up for bench/run.py.

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("offset", counter)
  table.insert(threads, thread)
end

function init(args)
  local threads_total = tonumber(args[2]) or 1
  local mine = ((offset or 1) - 1) % threads_total
  local all, requests = {}, {}
  for line in io.lines(args[1]) do
    if #line > 0 then
      table.insert(all, line)
    end
  end
  for i, line in ipairs(all) do
    if (i - 1) % threads_total == mine or #all < threads_total then
      table.insert(requests, wrk.format("GET", line))
    end
  end
  count = #requests
  prepared = requests
  index = 0
end

function request()
  index = index % count + 1
  return prepared[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
