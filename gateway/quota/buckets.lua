-- Shared by every quota script (prepended when the script is loaded): the server's clock and
-- token-bucket arithmetic. A bucket is a hash {l = level, t = time of that level}; an absent key
-- is a full bucket, so a key may expire as soon as it would be full again.

-- TIME is the server's clock, so replicas whose clocks disagree still agree on every bucket.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local today = math.floor(tonumber(clock[1]) / 86400)

local function fmt(x)
  return string.format('%.17g', x)
end

-- The level refilled up to now, and the time it is valid at. A clock that stepped back refills
-- nothing until it passes the saved time again: it never mints tokens.
local function level_of(key, capacity, rate)
  local saved = redis.call('HMGET', key, 'l', 't')
  if not saved[1] then
    return capacity, now
  end
  local level, stamp = tonumber(saved[1]), tonumber(saved[2])
  if now > stamp then
    level = level + (now - stamp) * rate
    stamp = now
  end
  if level > capacity then
    level = capacity
  end
  return level, stamp
end

local function save(key, level, stamp, capacity, rate)
  if level >= capacity then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'l', fmt(level), 't', fmt(stamp))
  -- Idle until full again, the key says nothing an absent key would not.
  local full_in = (capacity - level) / rate + (stamp - now)
  redis.call('PEXPIRE', key, math.ceil(full_in * 1000) + 1)
end

-- Take `amount` from a bucket (give back when negative): a give-back never lifts it past its
-- capacity; a take may leave it below zero (debt, which refill pays off).
local function adjust(key, capacity, rate, amount)
  local level, stamp = level_of(key, capacity, rate)
  level = level - amount
  if level > capacity then
    level = capacity
  end
  save(key, level, stamp, capacity, rate)
end
