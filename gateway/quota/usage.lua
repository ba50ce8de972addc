-- A read-only view of one tenant on the server's clock.
-- KEYS[1..n] the buckets   KEYS[n+1] the ledger's day   KEYS[n+2..] lease sets
-- ARGV[1] n   ARGV[2..] one group per bucket, amount unused
-- Returns {tokens today (the ledger's, every key and agent), levels..., active streams per
-- lease set...}
local n = tonumber(ARGV[1])
local reply = {0}
local ledger = redis.call('HGETALL', KEYS[n + 1])
for i = 1, #ledger, 2 do
  if string.sub(ledger[i], -2) == '|t' then
    reply[1] = reply[1] + tonumber(ledger[i + 1])
  end
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
