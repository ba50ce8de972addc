-- Settle one request once: debit (or refund) the difference between its actual and reserved
-- tokens on each token bucket (rate limits and budgets), and add it to the usage ledger: one
-- hash per tenant and day in quota.timezone, fields '<key>|<agent>|<r i o t e>' (requests,
-- input, output, total and estimated tokens). In the same call, so the ledger is what was
-- charged, to the token (and /v1/usage's tokens_today, read from it, too).
-- KEYS[1..n] the token buckets   KEYS[n+1] this request's settled marker
-- KEYS[n+2] the ledger's day
-- ARGV[1] n   ARGV[2] delta   ARGV[3] actual tokens   ARGV[4] marker ttl (ms)
-- ARGV[5] ledger field prefix ('<key>|<agent>|')   ARGV[6] input   ARGV[7] output
-- ARGV[8] estimated   ARGV[9] ledger ttl (ms)   ARGV[10..] one group per bucket, amount unused
-- Returns {1, k, the k token buckets' levels after (none when nothing moved), warnings crossed
-- ('i:j')...}, or {0} when this request was already settled.
local n = tonumber(ARGV[1])
if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[4]) then
  return {0}
end

local delta = tonumber(ARGV[2])
local warnings, reply = {}, {1, 0}
if delta ~= 0 then
  reply[2] = n
  local at, g = 10, nil
  for i = 1, n do
    g, at = group(at)
    reply[2 + i] = fmt(adjust(i, KEYS[i], g, delta, warnings))
  end
end

local ledger, field = KEYS[n + 2], ARGV[5]
redis.call('HINCRBY', ledger, field .. 'r', 1)
for name, amount in pairs({t = ARGV[3], i = ARGV[6], o = ARGV[7], e = ARGV[8]}) do
  if amount ~= '0' then
    redis.call('HINCRBY', ledger, field .. name, amount)
  end
end
redis.call('PEXPIRE', ledger, ARGV[9])

for _, warning in ipairs(warnings) do
  reply[#reply + 1] = warning
end
return reply
