-- Keep this replica's stream leases alive for another lease ttl: every one it names is a stream
-- still open here, so one Redis lost (a restart, an outage longer than the ttl) is put back.
-- The replica stops naming a lease before it releases it; on one connection the release then
-- always follows the renewal, so a released lease is not brought back.
-- KEYS[1] the tenant's stream leases   ARGV[1] lease ttl (ms)   ARGV[2..] lease ids
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIREAT', KEYS[1], expiry + 1)
return 1
