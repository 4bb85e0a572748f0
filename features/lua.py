"""The Redis commit script: checks guards, then applies a whole batch's writes atomically.

One EVALSHA per batch. If any guard fails (a shopper or product changed since it was read, an
event's "applied" marker or a partition's offset moved: another worker got there first) nothing is
written and the failed guard's index is returned; the caller re-reads and re-plans. Otherwise the
shopper/product states, the "applied" markers and the partition offsets are written together with
the commutative product and query statistics, so a worker killed at any moment leaves either all
of a batch or none of it.

``bump`` repeats :func:`features.decay.bump` operation for operation (same IEEE doubles, same
``pow``), so Redis and the memory store agree bit for bit. Keys are built from the prefixes in
:mod:`features.keys`; the script touches keys it derives (query texts), so it needs a single
Redis node (or a cluster with one slot per deployment), as documented in the README.

ARGV: h_item h_query qi_ttl_ms text_ttl_ms dedup_ttl_ms, then eight counts, then the sections
guards (key mode expected), sets (key value ttl_ms), hincr (key field delta), items (pid kind t),
queries (query_id text), query_items (query_id pid kind t), markers (key), offsets (key value).
"""

from __future__ import annotations

from string import Template

from features import keys

_SOURCE = Template(r"""
local h_item, h_query = tonumber(ARGV[1]), tonumber(ARGV[2])
local qi_ttl, text_ttl, dedup_ttl = ARGV[3], ARGV[4], ARGV[5]
local counts = {}
for i = 1, 8 do counts[i] = tonumber(ARGV[5 + i]) end
local pos = 14

local function take(n)
  local start = pos
  pos = pos + n
  return start
end

-- 1. guards
local g0 = take(3 * counts[1])
for i = 0, counts[1] - 1 do
  local k, mode, expected = ARGV[g0 + 3 * i], ARGV[g0 + 3 * i + 1], ARGV[g0 + 3 * i + 2]
  local current
  if mode == 'e' then current = redis.call('GETRANGE', k, 0, 7)
  else current = redis.call('GET', k) or '' end
  if current ~= expected then return {i} end
end

local cache, dirty, ttl_of = {}, {}, {}
local function load(k, n)
  local s = cache[k]
  if s == nil then
    local raw = redis.call('GET', k)
    s = {}
    if raw then
      local v = {struct.unpack('<' .. string.rep('d', n), raw)}
      for i = 1, n do s[i] = v[i] end
    else
      for i = 1, n do s[i] = 0 end
    end
    cache[k] = s
  end
  dirty[k] = n
  return s
end

local function bump(s, n, slot, t, h)
  local t_ref = s[1]
  if t > t_ref then
    local f = 2 ^ (-(t - t_ref) / h)
    for i = 2, n + 1 do s[i] = s[i] * f end
    s[1] = t
    s[slot + 1] = s[slot + 1] + 1
  else
    s[slot + 1] = s[slot + 1] + 1 * 2 ^ (-(t_ref - t) / h)
  end
end

local function query_item(text, pid, kind, t)
  local k = '${QUERY_ITEM}' .. pid .. ':' .. text
  bump(load(k, 4), 3, kind, t, h_query)
  ttl_of[k] = qi_ttl
  local kt = '${QUERY_TOTAL}' .. text
  bump(load(kt, 4), 3, kind, t, h_query)
  ttl_of[kt] = qi_ttl
end

-- 2. shopper and product states, product documents
local s0 = take(3 * counts[2])
for i = 0, counts[2] - 1 do
  local k, v, ttl = ARGV[s0 + 3 * i], ARGV[s0 + 3 * i + 1], ARGV[s0 + 3 * i + 2]
  if ttl == '0' then redis.call('SET', k, v) else redis.call('SET', k, v, 'PX', ttl) end
end

-- 3. category price sums
local c0 = take(3 * counts[3])
for i = 0, counts[3] - 1 do
  redis.call('HINCRBY', ARGV[c0 + 3 * i], ARGV[c0 + 3 * i + 1], ARGV[c0 + 3 * i + 2])
end

-- 4. product statistics
local i0 = take(3 * counts[4])
for i = 0, counts[4] - 1 do
  local kind, t = tonumber(ARGV[i0 + 3 * i + 1]), tonumber(ARGV[i0 + 3 * i + 2])
  local s = load('${ITEM}' .. ARGV[i0 + 3 * i], 10)
  bump(s, 4, kind, t, h_item)
  s[kind + 5] = s[kind + 5] + 1
  if kind ~= 4 and t > s[10] then s[10] = t end
end

-- 5. queries: remember the text, release clicks that waited for it
local q0 = take(2 * counts[5])
local texts = {}
for i = 0, counts[5] - 1 do
  local qid, text = ARGV[q0 + 2 * i], ARGV[q0 + 2 * i + 1]
  redis.call('SET', '${QUERY_TEXT}' .. qid, text, 'PX', text_ttl)
  texts[qid] = text
  local pk = '${QUERY_PENDING}' .. qid
  local waiting = redis.call('LRANGE', pk, 0, -1)
  for _, entry in ipairs(waiting) do
    local pid, kind, t = string.match(entry, '^(%S+)\t(%d)\t(%S+)$$')
    query_item(text, pid, tonumber(kind), tonumber(t))
  end
  if #waiting > 0 then redis.call('DEL', pk) end
end

-- 6. query-product evidence, or wait for the query's text
local x0 = take(4 * counts[6])
for i = 0, counts[6] - 1 do
  local qid, pid, kind, t = ARGV[x0 + 4 * i], ARGV[x0 + 4 * i + 1], ARGV[x0 + 4 * i + 2], ARGV[x0 + 4 * i + 3]
  local text = texts[qid]
  if text == nil then
    text = redis.call('GET', '${QUERY_TEXT}' .. qid)
    if text then texts[qid] = text end
  end
  if text then
    query_item(text, pid, tonumber(kind), tonumber(t))
  else
    local pk = '${QUERY_PENDING}' .. qid
    redis.call('RPUSH', pk, pid .. '\t' .. kind .. '\t' .. t)
    redis.call('PEXPIRE', pk, text_ttl)
  end
end

for k, n in pairs(dirty) do
  local s = cache[k]
  local packed = struct.pack('<' .. string.rep('d', n), unpack(s, 1, n))
  local ttl = ttl_of[k]
  if ttl then redis.call('SET', k, packed, 'PX', ttl) else redis.call('SET', k, packed) end
end

-- 7. "applied" markers, 8. partition offsets, counters
local m0 = take(counts[7])
for i = 0, counts[7] - 1 do redis.call('SET', ARGV[m0 + i], '1', 'PX', dedup_ttl) end
local o0 = take(2 * counts[8])
for i = 0, counts[8] - 1 do redis.call('SET', ARGV[o0 + 2 * i], ARGV[o0 + 2 * i + 1]) end
if counts[7] > 0 then redis.call('HINCRBY', '${STATS}', 'applied', counts[7]) end
return 0
""")

COMMIT = _SOURCE.substitute(
    QUERY_ITEM=keys.QUERY_ITEM,
    QUERY_TOTAL=keys.QUERY_TOTAL,
    ITEM=keys.ITEM,
    QUERY_TEXT=keys.QUERY_TEXT,
    QUERY_PENDING=keys.QUERY_PENDING,
    STATS=keys.STATS,
)
