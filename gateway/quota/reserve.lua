-- One admission decision, all or nothing: one request from each request bucket, the token cost
-- from each token bucket and, when asked, a stream lease.
-- KEYS[1..n]  the tenant's buckets               KEYS[n+1]  its stream leases (sorted set,
--                                                            member = lease id, score = expiry ms)
-- ARGV[1] n   ARGV[2] lease id ('' = none)   ARGV[3] max streams   ARGV[4] lease ttl (ms)
-- ARGV[5..]   per bucket: capacity, refill, window (s), cost
-- Returns {allowed 1|0, refused by (bucket index, -1 streams, 0 none), wait (s), levels after...}
local n = tonumber(ARGV[1])
local levels, stamps, specs = {}, {}, {}
local rejected, wait = 0, 0
for i = 1, n do
  local at = 5 + (i - 1) * 4
  local capacity, cost = tonumber(ARGV[at]), tonumber(ARGV[at + 3])
  local rate = tonumber(ARGV[at + 1]) / tonumber(ARGV[at + 2])
  levels[i], stamps[i] = level_of(KEYS[i], capacity, rate)
  specs[i] = {capacity, rate, cost}
  if levels[i] < cost then
    local needed = (cost - levels[i]) / rate
    if rejected == 0 or needed > wait then
      rejected, wait = i, needed
    end
  end
end

local leases = KEYS[n + 1]
if rejected == 0 and ARGV[2] ~= '' then
  -- Leases of a replica that died without releasing them expire here.
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  if redis.call('ZCARD', leases) >= tonumber(ARGV[3]) then
    rejected = -1
  end
end

if rejected == 0 then
  for i = 1, n do
    local capacity, rate, cost = specs[i][1], specs[i][2], specs[i][3]
    if cost > 0 then
      levels[i] = levels[i] - cost
      save(KEYS[i], levels[i], stamps[i], capacity, rate)
    end
  end
  if ARGV[2] ~= '' then
    redis.call('ZADD', leases, now_ms + tonumber(ARGV[4]), ARGV[2])
    local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', leases, tonumber(last[2]) + 1)
  end
end

local reply = {rejected == 0 and 1 or 0, rejected, fmt(wait)}
for i = 1, n do
  reply[3 + i] = fmt(levels[i])
end
return reply
