-- POST /api/otlp/<app_id>/v1/logs: `per_request` log records per request, as one protobuf
-- ExportLogsServiceRequest (the body a Python or Collector exporter sends).
--
-- bench/run.py writes the body once with opentelemetry-proto's own classes (argument 8: its
-- file) and gives each record an attribute "bench.id" holding a fixed-width placeholder
-- (argument 9). Every request replaces the placeholders with ids of exactly that width,
-- "<prefix>-<thread>-<request>-<index>" padded with "_", so every protobuf length prefix
-- stays valid and every record is unique (its event_id is a hash of the record).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_common.lua")

local common_init = init

function init(args)
   common_init(args)
   local file = assert(io.open(args[8], "rb"))
   template = file:read("*a")
   file:close()
   placeholder = args[9]
   wrk.headers["Content-Type"] = "application/x-protobuf"
end

function request()
   local stem = next_stem()
   local index = 0
   local body = string.gsub(template, placeholder, function()
      index = index + 1
      local id = stem .. "-" .. index
      assert(#id <= #placeholder, "an id is wider than the placeholder: widen OTLP_ID_PLACEHOLDER in run.py")
      return id .. string.rep("_", #placeholder - #id)
   end)
   return wrk.format("POST", nil, nil, body)
end
