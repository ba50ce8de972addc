-- Keep this replica's live stream leases alive for another lease ttl. A lease already released or
-- expired stays gone: a renewal never brings one back.
-- KEYS[1] the tenant's stream leases   ARGV[1] lease ttl (ms)   ARGV[2..] lease ids
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now_ms then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1)
end
return 1
