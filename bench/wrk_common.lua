-- Shared by health.lua, single.lua and batch.lua (loaded with dofile).
--
-- Arguments after `--` on the wrk command line:
--   1 api key ("-" for none)   2 id prefix   3 folder for accepted-id files ("-" for none)
--   4 events per request       5 event_name  6 expected status (200 or 202)
--   7 deadline, epoch seconds ("-" for none): from then on no connection sends another
--     request (see `delay` below), so the requests in flight finish and
--     every request the server handled is counted: accepted == stored exactly.
--
-- Every thread numbers its requests (thread id + per-thread counter), so each event id
-- is unique across the run: "<prefix>-<thread>-<request>-<index>". Each thread writes the
-- ids the server acknowledged (read from the 202 body) to "<folder>/accepted-<thread>.txt",
-- and counts responses by status. `done` prints one line: BENCH_WRK_JSON {...}.

local threads = {}

-- A wall clock with sub-millisecond resolution (os.time() has whole seconds only).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local timespec = ffi.new("bench_timespec")
function now()
   ffi.C.clock_gettime(0, timespec)  -- CLOCK_REALTIME, comparable with Python's time.time()
   return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) / 1e9
end

function setup(thread)
   table.insert(threads, thread)
   thread:set("tid", #threads)
end

function init(args)
   api_key = args[1] or "-"
   prefix = args[2] or "bench"
   out_dir = args[3] or "-"
   per_request = tonumber(args[4] or "1")
   event_name = args[5] or "bench"
   expected = tonumber(args[6] or "202")
   deadline = tonumber(args[7] or "-")  -- nil when "-"
   first_at = 0      -- when this thread built its first request
   last_at = 0       -- when it received its last response
   counter = 0
   ok = 0            -- responses with the expected status
   other = 0         -- any other status
   acked_events = 0  -- events the server said it accepted (ids in 202 bodies)
   statuses = {}
   first_error = ""
   wrk.headers["Content-Type"] = "application/json"
   if api_key ~= "-" then wrk.headers["X-API-Key"] = api_key end
   if out_dir ~= "-" then
      ids_file = io.open(out_dir .. "/accepted-" .. tid .. ".txt", "w")
      ids_file:setvbuf("full", 65536)
   end
end

-- "<prefix>-<thread>-<request>" : the stem of this request's event ids.
function next_stem()
   if first_at == 0 then first_at = now() end
   counter = counter + 1
   return prefix .. "-" .. tid .. "-" .. counter
end

function event_json(id, n)
   return '{"event_name":"' .. event_name .. '","event_id":"' .. id ..
      '","level":"info","user_id":"u' .. (n % 1000) ..
      '","session":"s' .. (n % 97) .. '","properties":{"page":"/pricing","button":"signup","ms":' ..
      (n % 500) .. ',"ok":true,"tags":["a","b"]}}'
end

function response(status, headers, body)
   last_at = now()
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
   if status ~= expected then
      other = other + 1
      if first_error == "" and body then first_error = string.sub(body, 1, 300) end
      return
   end
   ok = ok + 1
   if status ~= 202 or not body then return end
   local list = string.match(body, '"event_ids"%s*:%s*%[(.-)%]')
   if list then
      for id in string.gmatch(list, '"([^"]+)"') do
         acked_events = acked_events + 1
         if ids_file then ids_file:write(id, "\n") end
      end
   else
      local id = string.match(body, '"event_id"%s*:%s*"([^"]+)"')
      if id then
         acked_events = acked_events + 1
         if ids_file then ids_file:write(id, "\n") end
      end
   end
end

local function json_string(s)
   s = string.gsub(s, '[%c"\\]', function(c)
      if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
      return string.format("\\u%04x", string.byte(c))
   end)
   return '"' .. s .. '"'
end

function done(summary, latency, requests)
   local total_ok, total_other, total_acked, codes, err = 0, 0, 0, {}, ""
   local first, last = 0, 0
   for _, thread in ipairs(threads) do
      local f, l = thread:get("first_at") or 0, thread:get("last_at") or 0
      if f > 0 and (first == 0 or f < first) then first = f end
      if l > last then last = l end
      total_ok = total_ok + (thread:get("ok") or 0)
      total_other = total_other + (thread:get("other") or 0)
      total_acked = total_acked + (thread:get("acked_events") or 0)
      local s = thread:get("statuses") or {}
      for code, n in pairs(s) do codes[code] = (codes[code] or 0) + n end
      local e = thread:get("first_error") or ""
      if err == "" then err = e end
   end
   local parts = {}
   for code, n in pairs(codes) do table.insert(parts, json_string(code) .. ":" .. n) end
   local p = function(q) return latency:percentile(q) / 1000 end
   local e = summary.errors
   io.write("BENCH_WRK_JSON {",
      '"duration_s":', summary.duration / 1e6,
      ',"requests":', summary.requests,
      ',"bytes":', summary.bytes,
      ',"ok":', total_ok,
      ',"other":', total_other,
      ',"acked_events":', total_acked,
      ',"statuses":{', table.concat(parts, ","), "}",
      ',"socket_errors":{"connect":', e.connect, ',"read":', e.read, ',"write":', e.write,
      ',"timeout":', e.timeout, "}",
      ',"latency_ms":{"mean":', latency.mean / 1000, ',"max":', latency.max / 1000,
      ',"p50":', p(50), ',"p90":', p(90), ',"p99":', p(99), ',"p999":', p(99.9), "}",
      ',"first_request_at":', string.format("%.6f", first),
      ',"last_response_at":', string.format("%.6f", last),
      ',"first_error":', json_string(err),
      "}\n")
end

-- After the deadline a connection sends nothing more: its next request waits an hour.
function delay()
   if deadline and now() >= deadline then return 3600000 end
   return 0
end
