-- One attempt's decision, on Redis's clock: its route bucket (if it has
-- one), then its key's quota shared by weight among the clients asking.
-- The quota rule is `Fair::decide` in fair.rs, step by step; read it there.
--
-- KEYS[1] the quota's theoretical arrival time; KEYS[2] the hash of its
-- clients ("share cap_interval cap_tat tat seen waiting" per client name);
-- KEYS[3] the route bucket's, when the call has one.
-- ARGV: interval, tolerance (µs), client, share, cap interval (µs, 0: no
-- cap), asking window (µs), least come-back margin (µs), then the route bucket's
-- interval and tolerance.
-- Returns {1, 0}: a slot is taken, go now; {0, w}: ask again in w µs.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local name, share, cap = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local asking_us, come_back = tonumber(ARGV[6]), tonumber(ARGV[7])
local keep_ms = math.ceil(asking_us / 1000) + 60000

-- The route bucket: a slot now, or ask again when it has one.
local route_tat
if KEYS[3] then
  local r_interval, r_tolerance = tonumber(ARGV[8]), tonumber(ARGV[9])
  route_tat = math.max(tonumber(redis.call('GET', KEYS[3])) or now, now)
  if route_tat - r_tolerance > now then
    return {0, route_tat - r_tolerance - now}
  end
  route_tat = route_tat + r_interval
end

local clients = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local f = {}
  for v in string.gmatch(flat[i + 1], '%S+') do f[#f + 1] = tonumber(v) end
  clients[flat[i]] = {share = f[1], cap = f[2], cap_tat = f[3], tat = f[4], seen = f[5], waiting = f[6]}
end
local me = clients[name]
if not me then
  me = {cap_tat = 0, tat = 0, waiting = 0}
  clients[name] = me
end
me.share, me.cap, me.seen = share, cap, now

local function save()
  redis.call('HSET', KEYS[2], name, string.format('%.17g %d %d %d %d %d',
    me.share, me.cap, me.cap_tat, me.tat, me.seen, me.waiting))
  redis.call('PEXPIRE', KEYS[2], keep_ms)
end

if cap > 0 and me.cap_tat > now then
  save()
  return {0, me.cap_tat - now}
end

local asking = 0
for _, c in pairs(clients) do
  if c.seen ~= 0 and c.seen + asking_us >= now then asking = asking + c.share end
end
local ratio = math.max(asking / me.share, 1)
local my_interval = math.floor(interval * ratio + 0.5)
local my_lead = math.max(math.floor(tolerance / ratio + 0.5), my_interval) + my_interval

local function wait(until_t)
  me.waiting = math.max(me.waiting, until_t + math.max(come_back, interval))
  save()
  return {0, until_t - now}
end

local quota_tat = tonumber(redis.call('GET', KEYS[1])) or 0
local free_at = quota_tat - tolerance
if free_at > now then return wait(free_at) end

local after = math.max(quota_tat, now) + interval
if after > now + tolerance then
  local mine = math.max(me.tat, now)
  for other, c in pairs(clients) do
    if other ~= name and c.waiting >= now and math.max(c.tat, now) < mine then
      return wait(after - tolerance)
    end
  end
end

redis.call('SET', KEYS[1], string.format('%d', after), 'PX', math.ceil((after - now) / 1000) + keep_ms)
me.tat = math.min(math.max(me.tat, now) + my_interval, now + my_lead)
me.waiting = 0
if cap > 0 then me.cap_tat = math.max(me.cap_tat, now) + cap end
save()
if route_tat then
  redis.call('SET', KEYS[3], string.format('%d', route_tat), 'PX', math.ceil((route_tat - now) / 1000) + 1000)
end
return {1, 0}
