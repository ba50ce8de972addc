-- Undo one admission that never reached upstream: one request back on each request bucket, its
-- reserved tokens on each token bucket (never past capacity), its stream lease released; nothing
-- counted for today. Once per request, by settle's own marker: after a settle it changes nothing
-- (and a settle after it changes nothing), but the lease goes either way.
-- KEYS[1..n] the buckets   KEYS[n+1] this request's settled marker   KEYS[n+2] stream leases
-- ARGV[1] n   ARGV[2] lease id ('' = none)   ARGV[3] marker ttl (ms)
-- ARGV[4..]   per bucket: capacity, refill, window (s), amount given back
-- Returns 1, or 0 when this request was already settled or refunded.
local n = tonumber(ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[n + 2], ARGV[2])
end
if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[3]) then
  return 0
end
for i = 1, n do
  local at = 4 + (i - 1) * 4
  local capacity, back = tonumber(ARGV[at]), tonumber(ARGV[at + 3])
  if back > 0 then
    adjust(KEYS[i], capacity, tonumber(ARGV[at + 1]) / tonumber(ARGV[at + 2]), -back)
  end
end
return 1
