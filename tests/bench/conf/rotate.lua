-- wrk script (appended to report.lua): every request carries the next key pair from WRK_CRED_FILE
-- (one "client_id<TAB>secret" per line), each one WRK_CRED_REPEAT times in a row, so with repeat 1 every
-- request presents a credential the gateway has never seen.
local ids, secrets = {}, {}
for line in io.lines(os.getenv("WRK_CRED_FILE")) do
  local id, secret = line:match("^([^\t]+)\t([^\t]+)$")
  if id then ids[#ids + 1] = id; secrets[#secrets + 1] = secret end
end
local rep = tonumber(os.getenv("WRK_CRED_REPEAT") or "1") or 1
local n = 0
request = function()
  local i = math.floor(n / rep) % #ids + 1
  n = n + 1
  return wrk.format("GET", "/", {["accessKey"] = ids[i], ["secretKey"] = secrets[i]})
end
