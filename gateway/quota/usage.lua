-- A read-only view of one tenant on the server's clock.
-- KEYS[1..n] the buckets   KEYS[n+1] stream leases   KEYS[n+2] tokens today
-- ARGV[1] n   ARGV[2..] one group per bucket, amount unused
-- Returns {active streams, tokens today, levels...}
local n = tonumber(ARGV[1])
local reply = {redis.call('ZCOUNT', KEYS[n + 1], '(' .. now_ms, '+inf'), 0}
local counted = redis.call('HMGET', KEYS[n + 2], 'd', 'n')
if tonumber(counted[1]) == today then
  reply[2] = tonumber(counted[2])
end
for i = 1, n do
  reply[2 + i] = fmt((level_of(KEYS[i], group(2 + (i - 1) * GROUP))))
end
return reply
