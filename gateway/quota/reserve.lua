-- One admission decision, all or nothing: one request from each request bucket, the token cost
-- from each token bucket (rate limits and budgets of every level) and, when asked, a lease in
-- the stream lease set of every level that caps streams.
-- KEYS[1..n]  the buckets     KEYS[n+1..n+m]  lease sets (sorted sets, member = lease id,
--                                             score = expiry ms)
-- ARGV[1] n   ARGV[2] lease id ('' = none)   ARGV[3] m   ARGV[4] lease ttl (ms)
-- ARGV[5..]   one group per bucket (buckets.lua), amount = its cost; then m caps, one per set
-- Returns {allowed 1|0, refused (a refusing bucket's index, -j for lease set j, 0 none), levels
--          after..., warnings crossed ('i:j')...}; which refusing bucket waits longest is the
--          caller's sum.
local n, m = tonumber(ARGV[1]), tonumber(ARGV[3])
local groups, levels, stamps, warned = {}, {}, {}, {}
local refused, at = 0, 5
for i = 1, n do
  local g
  g, at = group(at)
  groups[i] = g
  levels[i], stamps[i], warned[i] = level_of(KEYS[i], g)
  if levels[i] < g.amount then
    refused = i
  end
end

if refused == 0 and ARGV[2] ~= '' then
  for j = 1, m do
    local leases = KEYS[n + j]
    -- Leases of a replica that died without releasing them expire here.
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
    if redis.call('ZCARD', leases) >= tonumber(ARGV[at + j - 1]) then
      refused = -j
      break
    end
  end
end

local warnings = {}
if refused == 0 then
  for i = 1, n do
    local g = groups[i]
    if g.amount > 0 then
      levels[i] = levels[i] - g.amount
      save(KEYS[i], g, levels[i], stamps[i], crossed(i, g, levels[i], warned[i], warnings))
    end
  end
  if ARGV[2] ~= '' then
    for j = 1, m do
      local leases = KEYS[n + j]
      redis.call('ZADD', leases, now_ms + tonumber(ARGV[4]), ARGV[2])
      local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
      redis.call('PEXPIREAT', leases, tonumber(last[2]) + 1)
    end
  end
end

local reply = {refused == 0 and 1 or 0, refused}
for i = 1, n do
  reply[2 + i] = fmt(levels[i])
end
for _, warning in ipairs(warnings) do
  reply[#reply + 1] = warning
end
return reply
