-- GCRA over any number of buckets at once, on Redis's clock. ARGV[1] is the
-- longest acceptable wait (µs); then for each key its emission interval and
-- burst tolerance (µs). Returns {1, wait} (slot reserved after `wait` µs)
-- or {0, wait} (refused; a slot would be free in `wait` µs).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local tau = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  tats[i] = tat
  local w = tat - tau - now
  if w > wait then wait = w end
end
if wait > max_wait then return {0, wait} end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local new_tat = math.max(tats[i], now + wait) + interval
  redis.call('SET', key, string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
end
return {1, wait}
