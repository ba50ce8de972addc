-- Undo one admission that never reached upstream: one request back on each request bucket, its
-- reserved tokens on each token bucket (never past capacity), its stream lease released; nothing
-- counted for today or in the ledger. Once per request, by settle's own marker: after a settle
-- it changes nothing (and a settle after it changes nothing), but the lease goes either way.
-- KEYS[1..n] the buckets   KEYS[n+1] this request's settled marker   KEYS[n+2..] lease sets
-- ARGV[1] n   ARGV[2] lease id ('' = none)   ARGV[3] marker ttl (ms)
-- ARGV[4..]   one group per bucket, amount = what it gets back
-- Returns 1, or 0 when this request was already settled or refunded.
local n = tonumber(ARGV[1])
if ARGV[2] ~= '' then
  for j = n + 2, #KEYS do
    redis.call('ZREM', KEYS[j], ARGV[2])
  end
end
if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[3]) then
  return 0
end
local unused, at, g = {}, 4, nil
for i = 1, n do
  g, at = group(at)
  if g.amount > 0 then
    adjust(i, KEYS[i], g, -g.amount, unused)
  end
end
return 1
