"""Lua scripts that make each RedisStore write one atomic step on the server.

All scripts take the same KEYS, in this order (see redis_store.py for the layout):
    KEYS[1] meta   KEYS[2] tokens   KEYS[3] turns   KEYS[4] reqs   KEYS[5] draft

A turn item in the `turns` LIST starts with a fixed binary header that Lua reads with `struct`
(Redis's bundled cmsgpack rejects msgpack bin/str8 types, so the scripts never parse msgpack):
    <i4 start> <i4 end> <u2 len(request_id)> request_id bytes, then msgpack [role, text, meta]

Results are {code, value} pairs, never Lua errors, so that Python maps them to typed exceptions:
    1 = ok (value: new version), -1 = no such session, -2 = version conflict (value: stored
    version), -3 = truncate_to beyond the stored tokens (value: stored token count).
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_HELPERS = r"""
local function rid_of(item)
  local _, _, n = struct.unpack('<i4i4I2', item)
  if n == 0 then return nil end
  return string.sub(item, 11, 10 + n)
end

local function push_turns(first_arg, count)
  local base = redis.call('LLEN', KEYS[3])
  for i = 0, count - 1 do
    local item = ARGV[first_arg + i]
    redis.call('RPUSH', KEYS[3], item)
    local rid = rid_of(item)
    if rid then redis.call('HSET', KEYS[4], rid, base + i) end
  end
end

local function apply_ttl()
  local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
  for i = 1, 5 do
    if ttl and ttl ~= '' then
      redis.call('PEXPIRE', KEYS[i], tonumber(ttl) * 1000)
    else
      redis.call('PERSIST', KEYS[i])
    end
  end
end

local function set_meta(first_arg)
  for i = first_arg, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
"""

# ARGV: token_bytes, n_turns, turn items..., then meta field/value pairs.
CREATE = _HELPERS + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return {-4, 0} end
-- leftovers of an expired or half-deleted session must not leak into the new one
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if #ARGV[1] > 0 then redis.call('SET', KEYS[2], ARGV[1]) end
local n_turns = tonumber(ARGV[2])
push_turns(3, n_turns)
set_meta(3 + n_turns)
apply_ttl()
return {1, tonumber(redis.call('HGET', KEYS[1], 'version'))}
"""

# Cut turns whose end lies past `cut` from the tail of the list, and repoint (or remove) the
# request-id index entries of the dropped turns.
_DROP_TURNS = r"""
local function drop_turns_after(cut)
  local dropped = {}
  while true do
    local item = redis.call('LINDEX', KEYS[3], -1)
    if not item then break end
    local _, stop = struct.unpack('<i4i4', item)
    if stop <= cut then break end
    redis.call('RPOP', KEYS[3])
    local rid = rid_of(item)
    if rid then dropped[rid] = true end
  end
  local len = redis.call('LLEN', KEYS[3])
  local lost = {}
  local any = false
  for rid in pairs(dropped) do
    local idx = redis.call('HGET', KEYS[4], rid)
    if idx and tonumber(idx) >= len then
      redis.call('HDEL', KEYS[4], rid)
      lost[rid] = true
      any = true
    end
  end
  if not any then return end
  -- rare: an earlier turn of the same request survives; point the index back at it
  local items = redis.call('LRANGE', KEYS[3], 0, -1)
  for i = #items, 1, -1 do
    local rid = rid_of(items[i])
    if rid and lost[rid] then
      redis.call('HSET', KEYS[4], rid, i - 1)
      lost[rid] = nil
    end
  end
end
"""

# ARGV: expected_version, truncate_to, token_bytes, now, n_turns, turn items..., meta pairs.
COMMIT = _HELPERS + _DROP_TURNS + r"""
local stored = redis.call('HGET', KEYS[1], 'version')
if not stored then return {-1, 0} end
stored = tonumber(stored)
if stored ~= tonumber(ARGV[1]) then return {-2, stored} end
local num = tonumber(redis.call('HGET', KEYS[1], 'num_tokens'))
local cut = tonumber(ARGV[2])
if cut > num then return {-3, num} end
if cut < num then
  if cut == 0 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('SET', KEYS[2], redis.call('GETRANGE', KEYS[2], 0, cut * 4 - 1))
  end
  drop_turns_after(cut)
end
if #ARGV[3] > 0 then redis.call('APPEND', KEYS[2], ARGV[3]) end
local n_turns = tonumber(ARGV[5])
push_turns(6, n_turns)
set_meta(6 + n_turns)
redis.call('HSET', KEYS[1], 'version', stored + 1, 'updated', ARGV[4],
           'num_tokens', cut + #ARGV[3] / 4)
apply_ttl()
return {1, stored + 1}
"""

# ARGV: version, blob. The blob inherits the session's remaining TTL.
PUT_DRAFT = r"""
local stored = redis.call('HGET', KEYS[1], 'version')
if not stored or tonumber(stored) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[5], 'version', ARGV[1], 'blob', ARGV[2])
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[5], pttl) else redis.call('PERSIST', KEYS[5]) end
return 1
"""
