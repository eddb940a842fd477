-- wrk script (appended to report.lua): the mix operators run, exact in every 60 requests.
-- Request i (counted per wrk thread) is kind i % 20 on route i % 3, so every route gets every kind equally:
--   kind 0:      "Bearer WRK_MIX_WRONG", a well-formed token of a real credential with a wrong secret (5 %)
--   kind 10:     no credential at all (5 %)
--   other kinds: "Bearer WRK_MIX_TOKEN", the cached valid token (90 %)
-- over the comma-separated paths in WRK_MIX_PATHS (3 protected routes). The 60 requests are formatted once in
-- init(), so a request costs wrk a table index. response() counts statuses per thread (wrk then reads every
-- response's headers and body: more work for wrk, on its own core, none for the gateway); done() prints them
-- after the RESULT line as: STATUSES {"200":n,"401":n,...}
local valid = "Bearer " .. os.getenv("WRK_MIX_TOKEN")
local wrong = "Bearer " .. os.getenv("WRK_MIX_WRONG")
local paths = {}
for path in string.gmatch(os.getenv("WRK_MIX_PATHS"), "[^,]+") do paths[#paths + 1] = path end

local cycle = {}
local n = 0
statuses = {}

init = function(args)
  for i = 0, 59 do
    local kind = i % 20
    local headers = {}
    if kind == 0 then
      headers["Authorization"] = wrong
    elseif kind ~= 10 then
      headers["Authorization"] = valid
    end
    cycle[i + 1] = wrk.format("GET", paths[i % #paths + 1], headers)
  end
end

request = function()
  n = n % 60 + 1
  return cycle[n]
end

response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local threads = {}
setup = function(thread)
  threads[#threads + 1] = thread
end

local report_done = done
done = function(summary, latency, requests)
  report_done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do
    parts[#parts + 1] = string.format('"%d":%d', status, count)
  end
  table.sort(parts)
  io.write("STATUSES {" .. table.concat(parts, ",") .. "}\n")
end
