"""The Lua scripts of the run queue (:mod:`genx_ray.store._queue`) and of concurrency keys
(:mod:`genx_ray.store._concurrency`): the queue's keys all under its one hash tag, a key's two
sets under theirs, so each call touches one Redis Cluster slot. Run like every script of the
catalogue (:class:`genx_ray.store._scripts.Script`: by SHA, loaded on first use).
"""

from __future__ import annotations

from genx_ray.store._scripts import Script

# -- the run queue (genx_ray.store._queue): every key under its tag, one slot --------------------

# KEYS[1]: the queue's tag (keys.QUEUE). ARGV: worker, count, now ms.
# Takes up to count entries: most urgent priority first; within it, the tenant with the lowest
# virtual time (raised to the priority's clock if behind), advanced by 1/weight per entry.
# Returns {entry, queued (us), priority, tenant, ...}.
QUEUE_TAKE = Script("""
local base, worker, want, now = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
local got = 0
for p = 1, 5 do
  local ready = base .. ':ready:' .. p
  local clock_key = base .. ':clock:' .. p
  while got < want do
    local top = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
    if #top == 0 then break end
    local tenant, vt = top[1], tonumber(top[2])
    local clock = tonumber(redis.call('GET', clock_key) or '0')
    if vt < clock then vt = clock end
    local q = base .. ':q:' .. p .. ':' .. tenant
    local e = redis.call('ZPOPMIN', q)
    if #e == 0 then
      redis.call('ZREM', ready, tenant)
    else
      got = got + 1
      out[#out + 1] = e[1]; out[#out + 1] = e[2]; out[#out + 1] = p; out[#out + 1] = tenant
      redis.call('ZADD', base .. ':taken', now, e[1])
      redis.call('HSET', base .. ':owner', e[1], worker)
      redis.call('SADD', base .. ':held:' .. worker, e[1])
      redis.call('SADD', base .. ':holders', worker)
      redis.call('SET', clock_key, tostring(vt))
      if redis.call('ZCARD', q) == 0 then
        redis.call('ZREM', ready, tenant)
      else
        local wk = base .. ':weights'
        local w = tonumber(redis.call('HGET', wk, tenant) or redis.call('HGET', wk, '*') or '1')
        redis.call('ZADD', ready, vt + 1 / w, tenant)
      end
    end
  end
end
return out
""")

# KEYS[1]: the queue's tag. ARGV: entries. Forgets each (its run was claimed or handed back).
QUEUE_ACK = Script("""
local base = KEYS[1]
for i = 1, #ARGV do
  local owner = redis.call('HGET', base .. ':owner', ARGV[i])
  if owner then
    local held = base .. ':held:' .. owner
    redis.call('SREM', held, ARGV[i])
    if redis.call('SCARD', held) == 0 then redis.call('SREM', base .. ':holders', owner) end
    redis.call('HDEL', base .. ':owner', ARGV[i])
  end
  redis.call('ZREM', base .. ':taken', ARGV[i])
end
return #ARGV
""")

# KEYS[1]: the queue's tag. ARGV: worker taking over, now ms, count, then the entries to take
# over (if still held by someone) or, with none, a dead worker's name in ARGV[4] prefixed '@'.
# Returns the entries taken over.
QUEUE_TAKE_OVER = Script("""
local base, me, now, want = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries = {}
if string.sub(ARGV[4], 1, 1) == '@' then
  entries = redis.call('SRANDMEMBER', base .. ':held:' .. string.sub(ARGV[4], 2), want)
else
  for i = 4, #ARGV do entries[#entries + 1] = ARGV[i] end
end
local out = {}
for _, entry in ipairs(entries) do
  local owner = redis.call('HGET', base .. ':owner', entry)
  if owner and owner ~= me then
    local held = base .. ':held:' .. owner
    redis.call('SREM', held, entry)
    if redis.call('SCARD', held) == 0 then redis.call('SREM', base .. ':holders', owner) end
    redis.call('HSET', base .. ':owner', entry, me)
    redis.call('SADD', base .. ':held:' .. me, entry)
    redis.call('SADD', base .. ':holders', me)
    redis.call('ZADD', base .. ':taken', now, entry)
    out[#out + 1] = entry
  end
end
return out
""")

# KEYS[1]: the queue's tag. ARGV: how many. The entries at the head of the queue, roughly in
# the order they will be taken (most urgent first, each tenant's first few), without taking them.
QUEUE_PEEK = Script("""
local base, want = KEYS[1], tonumber(ARGV[1])
local out = {}
for p = 1, 5 do
  for _, tenant in ipairs(redis.call('ZRANGE', base .. ':ready:' .. p, 0, want - 1)) do
    for _, e in ipairs(redis.call('ZRANGE', base .. ':q:' .. p .. ':' .. tenant, 0, want - 1)) do
      out[#out + 1] = e
      if #out >= want then return out end
    end
  end
end
return out
""")

# KEYS[1]: the queue's tag. Returns {priority, tenant, depth, oldest queued (us), ...}.
QUEUE_STATE = Script("""
local base = KEYS[1]
local out = {}
for p = 1, 5 do
  for _, tenant in ipairs(redis.call('ZRANGE', base .. ':ready:' .. p, 0, -1)) do
    local q = base .. ':q:' .. p .. ':' .. tenant
    local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
    if #first > 0 then
      out[#out + 1] = p; out[#out + 1] = tenant
      out[#out + 1] = redis.call('ZCARD', q); out[#out + 1] = first[2]
    end
  end
end
return out
""")


# -- concurrency keys (genx_ray.store._concurrency): a key's two sets, one slot -----------------

# KEYS: holders, waiting. ARGV: member, limit, now ms, entry, queued us.
# 1: admitted (or already); 0: over the limit, the entry filed under waiting.
CONC_ADMIT = Script("""
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[4])
  return 1
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[4])
return 0
""")

# KEYS: holders, waiting. ARGV: limit. The waiting entries there is room for (left in place:
# removed once back on the run queue), and how many wait in all.
CONC_ROOM = Script("""
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local out = {redis.call('ZCARD', KEYS[2])}
if room > 0 then
  for _, e in ipairs(redis.call('ZRANGE', KEYS[2], 0, room - 1, 'WITHSCORES')) do
    out[#out + 1] = e
  end
end
return out
""")
