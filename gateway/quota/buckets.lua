-- Shared by every quota script (prepended when the script is loaded): the server's clock and
-- bucket arithmetic. A bucket is a hash {l = level, t = its clock at that level, w = warnings
-- given this period}; an absent key is a full bucket, so a key may expire once it would be full.
--
-- Every bucket comes as one group of arguments (redis.py's `_group`), read by `group`:
--   a rate limit:  capacity, refill, window (s), -1, amount
--   a budget:      capacity, capacity, 1, its period's index, amount, ms to the end of that
--                  period, ms of the longest such period, warn_at fractions ('0.8,0.95' or '')
-- (whole numbers all but the fractions: they pack and parse cheaply). A rate limit refills
-- `refill` per `window` on the server's clock; a budget refills its capacity once per period
-- (its clock is the period's index), so the same arithmetic carries a budget's debt into the
-- next period. `amount` is the script's own (a cost, a give-back, unused).

-- TIME is the server's clock, so replicas whose clocks disagree still agree on every rate limit.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function fmt(x)
  return string.format('%.17g', x)
end

-- The group starting at ARGV[at], and where the next one starts.
local function group(at)
  local g = {
    capacity = tonumber(ARGV[at]), rate = tonumber(ARGV[at + 1]) / tonumber(ARGV[at + 2]),
    at = tonumber(ARGV[at + 3]), amount = tonumber(ARGV[at + 4]), ends_ms = 0, warns = '',
  }
  if g.at < 0 then
    g.at = now
    return g, at + 5
  end
  g.ends_ms, g.unit_ms, g.warns = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6]), ARGV[at + 7]
  return g, at + 8
end

-- The level refilled up to the bucket's clock, the clock it is valid at, and the warnings given
-- in this period. A clock that stepped back refills nothing until it passes the saved one
-- again: it never mints.
local function level_of(key, g)
  local saved = redis.call('HMGET', key, 'l', 't', 'w')
  if not saved[1] then
    return g.capacity, g.at, 0
  end
  local level, stamp, warned = tonumber(saved[1]), tonumber(saved[2]), tonumber(saved[3]) or 0
  if g.at > stamp then
    level = level + (g.at - stamp) * g.rate
    stamp = g.at
    warned = 0
  end
  if level > g.capacity then
    level = g.capacity
  end
  return level, stamp, warned
end

local function save(key, g, level, stamp, warned)
  if level >= g.capacity and warned == 0 then
    redis.call('DEL', key)
    return
  end
  if g.warns ~= '' then
    redis.call('HSET', key, 'l', fmt(level), 't', fmt(stamp), 'w', warned)
  else
    redis.call('HSET', key, 'l', fmt(level), 't', fmt(stamp))
  end
  -- Idle until full again, the key says nothing an absent key would not.
  if g.ends_ms > 0 then
    local periods = math.max(1, math.ceil((g.capacity - level) / g.capacity))
    redis.call('PEXPIRE', key, g.ends_ms + (periods - 1) * g.unit_ms + 1)
  else
    local full_in = (g.capacity - level) / g.rate + (stamp - now)
    redis.call('PEXPIRE', key, math.ceil(full_in * 1000) + 1)
  end
end

-- Each warn_at fraction of bucket `i` crossed for the first time this period, as 'i:j' (the
-- j-th fraction) in `out`; returns how many are given now. In the script that moves the level,
-- so exactly one call, on one replica, reports a crossing.
local function crossed(i, g, level, warned, out)
  if g.warns == '' then
    return warned
  end
  local used, j = (g.capacity - level) / g.capacity, 0
  for fraction in string.gmatch(g.warns, '[^,]+') do
    j = j + 1
    if j > warned and used >= tonumber(fraction) then
      out[#out + 1] = i .. ':' .. j
      warned = j
    end
  end
  return warned
end

-- Take `amount` from bucket `i` (give back when negative): a give-back never lifts it past its
-- capacity; a take may leave it below zero (debt, which refill pays off).
local function adjust(i, key, g, amount, out)
  local level, stamp, warned = level_of(key, g)
  level = level - amount
  if level > g.capacity then
    level = g.capacity
  end
  save(key, g, level, stamp, crossed(i, g, level, warned, out))
  return level
end
