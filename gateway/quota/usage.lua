-- A read-only view of one tenant on the server's clock.
-- KEYS[1..n] the buckets   KEYS[n+1] tokens today   KEYS[n+2..] lease sets
-- ARGV[1] n   ARGV[2..] one group per bucket, amount unused
-- Returns {tokens today, levels..., active streams per lease set...}
local n = tonumber(ARGV[1])
local reply = {0}
local counted = redis.call('HMGET', KEYS[n + 1], 'd', 'n')
if tonumber(counted[1]) == today then
  reply[1] = tonumber(counted[2])
end
local at, g = 2, nil
for i = 1, n do
  g, at = group(at)
  reply[1 + i] = fmt((level_of(KEYS[i], g)))
end
for j = n + 2, #KEYS do
  reply[#reply + 1] = redis.call('ZCOUNT', KEYS[j], '(' .. now_ms, '+inf')
end
return reply
