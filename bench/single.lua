-- POST /api/logs/<app_id>: one event per request, each with a unique event_id.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_common.lua")

function request()
   local stem = next_stem()
   return wrk.format("POST", nil, nil, event_json(stem, counter))
end
