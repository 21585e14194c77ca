-- POST /api/logs/<app_id>: one event per request, each with a unique event_id.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_common.lua")

-- After the deadline a connection sends nothing more: its next request waits an hour.
function delay()
   if deadline and now() >= deadline then return 3600000 end
   return 0
end

function request()
   local stem = next_stem()
   return wrk.format("POST", nil, nil, event_json(stem, counter))
end
