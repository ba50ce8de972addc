-- Settle one request once: debit (or refund) the difference between its actual and reserved
-- tokens on each token bucket, and count its tokens for today (UTC, by the server's clock).
-- KEYS[1..n] the token buckets   KEYS[n+1] this request's settled marker   KEYS[n+2] tokens today
-- ARGV[1] n   ARGV[2] delta   ARGV[3] actual tokens   ARGV[4] marker ttl (ms)
-- ARGV[5..]   per bucket: capacity, refill, window (s)
-- Returns 1, or 0 when this request id was already settled (nothing changes).
local n = tonumber(ARGV[1])
if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[4]) then
  return 0
end

local delta = tonumber(ARGV[2])
if delta ~= 0 then
  for i = 1, n do
    local at = 5 + (i - 1) * 3
    adjust(KEYS[i], tonumber(ARGV[at]), tonumber(ARGV[at + 1]) / tonumber(ARGV[at + 2]), delta)
  end
end

local counted = KEYS[n + 2]
if tonumber(redis.call('HGET', counted, 'd')) == today then
  redis.call('HINCRBY', counted, 'n', ARGV[3])
else
  redis.call('HSET', counted, 'd', today, 'n', ARGV[3])
end
redis.call('PEXPIRE', counted, 2 * 86400 * 1000)
return 1
