-- Keep this replica's stream leases alive for another lease ttl: every one it names is a stream
-- still open here, so one Redis lost (a restart, an outage longer than the ttl) is put back.
-- The replica stops naming a lease before it releases it; on one connection the release then
-- always follows the renewal, so a released lease is not brought back.
-- KEYS[1..] the lease sets these leases are in (one per level)   ARGV[1] lease ttl (ms)
-- ARGV[2..] lease ids
local expiry = now_ms + tonumber(ARGV[1])
for _, leases in ipairs(KEYS) do
  for i = 2, #ARGV do
    redis.call('ZADD', leases, expiry, ARGV[i])
  end
  redis.call('PEXPIREAT', leases, expiry + 1)
end
return 1
