-- Heist rate limit + quotas: GCRA (generic cell rate algorithm) and total/daily quotas in one atomic step.
-- Clock: Redis TIME (microseconds), so every uvicorn worker and host agrees on "now".
--
-- KEYS[1]  GCRA theoretical arrival time (TAT) of the client, microseconds
-- KEYS[2]  total admitted requests of the client
-- KEYS[3]  prefix of the per-UTC-day counter (the day number is appended here)
-- ARGV[1]  emission interval T in microseconds (1e6 / rate); 0 = no rate limit
-- ARGV[2]  burst B (requests that may arrive at once)
-- ARGV[3]  cost of this request (1)
-- ARGV[4]  total quota, -1 = none
-- ARGV[5]  daily quota, -1 = none
--
-- Returns {allowed, reason, retry_after_us, remaining, reset_us, total_left, daily_left}
--   reason: 0 ok, 1 rate limited, 2 total quota used up, 3 daily quota used up
--   retry_after_us: -1 when waiting does not help (total quota)
--   total_left / daily_left: -1 when that quota is not set
--
-- GCRA (as in redis-cell / throttled): tat = max(TAT, now); new_tat = tat + T*cost;
-- allow_at = new_tat - T*B; admit iff allow_at <= now, then TAT := new_tat.
-- remaining = floor((now - allow_at) / T); retry_after = allow_at - now; reset = TAT - now.

local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local qtotal = tonumber(ARGV[4])
local qdaily = tonumber(ARGV[5])

local day = math.floor(sec / 86400)
local dkey = KEYS[3] .. string.format('%d', day)
local day_reset = (day + 1) * 86400000000 - now

local total_left = -1
local daily_left = -1
if qtotal >= 0 then total_left = qtotal - tonumber(redis.call('GET', KEYS[2]) or '0') end
if qdaily >= 0 then daily_left = qdaily - tonumber(redis.call('GET', dkey) or '0') end

if qtotal >= 0 and total_left < cost then
  return {0, 2, -1, 0, 0, total_left, daily_left}
end
if qdaily >= 0 and daily_left < cost then
  return {0, 3, day_reset, 0, day_reset, total_left, daily_left}
end

local remaining = -1
local reset = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - interval * burst
  if allow_at > now then
    return {0, 1, allow_at - now, 0, tat - now, total_left, daily_left}
  end
  local ttl_ms = math.floor((new_tat - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
  remaining = math.floor((now - allow_at) / interval)
  reset = new_tat - now
end

if qtotal >= 0 then
  redis.call('INCRBY', KEYS[2], cost)
  total_left = total_left - cost
end
if qdaily >= 0 then
  redis.call('INCRBY', dkey, cost)
  redis.call('EXPIRE', dkey, 2 * 86400)
  daily_left = daily_left - cost
end
return {1, 0, 0, remaining, reset, total_left, daily_left}
