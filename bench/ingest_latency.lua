-- wrk script for bench/ingest.py: POST pre-built feedback batches, each request
-- with its own Idempotency-Key (as a labeling tool should send), and collect the
-- server's own time (Server-Timing) of every answer.
--   wrk -t1 -c16 -d15s -s bench/ingest_latency.lua http://127.0.0.1:PORT -- DIR RUN
-- RUN makes the keys unique across runs; DIR holds `token` (a labeler key) and `bodies.jsonl` (one JSON body a line).
-- The summary is one line: WRK {"requests", "non_201", "p50_ms", "p99_ms", ...}.
local bodies, token, counter, run = {}, nil, 0, "run"
thread_id = 0
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local dir = args[1]
  run = args[2] or run
  local f = io.open(dir .. "/token", "r"); token = f:read("*l"); f:close()
  local i = 0
  for line in io.lines(dir .. "/bodies.jsonl") do i = i + 1; bodies[i] = line end
  server_ms = {}
  failures = 0
end

function request()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
    ["Idempotency-Key"] = string.format("wrk-%s-%d-%d", run, thread_id, counter),
  }
  return wrk.format("POST", "/v1/feedback-batches", headers, body)
end

function response(status, headers, body)
  if status ~= 201 then failures = failures + 1 end
  local timing = headers["server-timing"] or headers["Server-Timing"]
  if timing then
    local dur = string.match(timing, "dur=([%d%.]+)")
    if dur then server_ms[#server_ms + 1] = tonumber(dur) end
  end
end

function done(summary, latency, requests)
  local all, bad = {}, 0
  for _, t in ipairs(threads) do
    for _, v in ipairs(t:get("server_ms")) do all[#all + 1] = v end
    bad = bad + t:get("failures")
  end
  table.sort(all)
  local function q(p) if #all == 0 then return -1 end return all[math.min(#all, math.floor(#all * p) + 1)] end
  io.write(string.format(
    'WRK {"requests": %d, "errors": %d, "non_201": %d, "seconds": %.3f, "p50_ms": %.2f, "p90_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, "server_p50_ms": %.2f, "server_p99_ms": %.2f}\n',
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status,
    bad, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    q(0.5), q(0.99)))
end
