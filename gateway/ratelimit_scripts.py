"""The Redis scripts behind rate limits and quotas: each is one atomic step, timed by Redis's own clock.

No Redis module is needed (managed Redis works). Both scripts hand out units in leases: a caller asks for
`want` units and gives back the `back` units of its previous lease it did not use.
"""

from __future__ import annotations

# GCRA. KEYS[1] holds the theoretical arrival time (TAT) in microseconds of Redis TIME; it expires when the
# allowance is whole again. ARGV: emission interval (µs per unit, may be fractional), window (µs), units
# wanted, units given back. Returns {granted, remaining, µs until the allowance is whole, µs until the next
# unit when fewer than wanted were granted}.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
tat = tat - back * interval
if tat < now then tat = now end
local free = math.floor((now + window - tat) / interval)
local grant = math.max(0, math.min(want, free))
tat = tat + grant * interval
local ahead = tat - now
if ahead > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(ahead / 1000) + 1)
else
  redis.call('DEL', KEYS[1])
end
local retry = 0
if grant < want then retry = math.max(0, ahead + interval - window) end
return {grant, math.floor((window - ahead) / interval), math.ceil(ahead), math.ceil(retry)}
"""

# A quota period's count. KEYS[1] holds the units granted in the period. ARGV: limit, units wanted, units
# given back, seconds to keep the key, and the count to start from when the key is missing ('' when the
# caller has not read it from Postgres yet: the script then answers {-1, 0} and changes nothing).
# Returns {granted, remaining}.
QUOTA = """
local used = tonumber(redis.call('GET', KEYS[1]))
if used == nil then
  if ARGV[5] == '' then return {-1, 0} end
  used = tonumber(ARGV[5])
end
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
used = math.max(0, used - tonumber(ARGV[3]))
local grant = math.max(0, math.min(want, limit - used))
used = used + grant
redis.call('SET', KEYS[1], string.format('%d', used), 'EX', tonumber(ARGV[4]))
return {grant, math.max(0, limit - used)}
"""
