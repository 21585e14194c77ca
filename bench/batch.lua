-- POST /api/logs/<app_id>/batch: `per_request` events (a JSON array) per request,
-- every one with a unique event_id "<prefix>-<thread>-<request>-<index>".
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_common.lua")

function request()
   local stem = next_stem()
   local events = {}
   for i = 1, per_request do
      events[i] = event_json(stem .. "-" .. i, counter * per_request + i)
   end
   return wrk.format("POST", nil, nil, "[" .. table.concat(events, ",") .. "]")
end
