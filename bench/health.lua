-- GET /health: the HTTP ceiling of the same gunicorn. No request() function, so wrk
-- sends its pre-built request (the cheapest client side); responses are still counted.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_common.lua")
wrk.method = "GET"
