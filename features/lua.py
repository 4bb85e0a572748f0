"""The Redis commit script: checks guards, then applies a whole batch's writes atomically.

One EVALSHA per batch. If any guard fails (a shopper or product changed since it was read, a
partition's offset moved: another writer got there first) nothing is written and the failed
guard's index is returned; the caller re-reads and re-plans. Otherwise shopper and product
states, the "applied" markers and the partition offsets are written together with the
commutative product and query statistics (and the clicks per query word, ``qv``), so a
worker killed at any moment leaves either all of a batch or none of it. A commit that writes
product attributes also sets the shard's catalog generation (``cg``) to their etag, which is
random per commit: a reader keeps the catalog it read for as long as ``cg`` has not changed.

``bump`` repeats :func:`features.decay.bump` operation for operation (same IEEE doubles, same
``pow``), so Redis and the memory store agree bit for bit. Keys are built from the prefixes in
:mod:`features.keys` and the shard's tag; the script touches keys it derives (query texts), all
in its shard's slot, so on a cluster it runs where that slot lives.

Cost is dominated by the number of ``redis.call``s, so statistics are read with MGET and written
with MSET in chunks, a query's evidence with one HMGET and one HSET per query text (and word),
markers and query texts go to one hash per time bucket, and the many small
records (item and query operations, markers, guards) travel as newline-separated text (ids never
hold whitespace; a stored query text holds single spaces only).

ARGV: 1 h_item, 2 h_query, 3 qi_ttl_ms, 4 user_ttl_ms, 5 marker hash, 6 its expiry (unix s),
7 text hash, 8 previous text hash, 9 its expiry, 10 pending ttl_ms, 11-17 text sections (guards,
items, queries, query_items, markers, offsets, impressions), 18-21 counts of users, products,
documents, price fields, 22 duplicates skipped (a metric), 23 h_burst (query clicks' short
half-life), 24 the shard's hash tag (features.keys.Shards; '' with one shard), then those
(key, value) / (field, delta) pairs; KEYS[1] is the shard's ``stats`` key (it routes the call to
the shard's node on a cluster). An impressions line is
``t\tpid pid ...``: one per shown result.
"""

from __future__ import annotations

import hashlib
from string import Template

from features import keys, query_item

_SOURCE = Template(r"""
local h_item, h_query, h_burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[23])
local qi_ttl, user_ttl = ARGV[3], ARGV[4]
local marker_hash, marker_expiry = ARGV[5], ARGV[6]
local text_hash, old_text_hash, text_expiry, pending_ttl = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local tag = ARGV[24]  -- the owner shard's hash tag ('' with one shard): every key derived below carries it
local CHUNK = 500

local function mget(list)
  local out = {}
  for i = 1, #list, CHUNK do
    local part = redis.call('MGET', unpack(list, i, math.min(i + CHUNK - 1, #list)))
    for j = 1, #part do out[i + j - 1] = part[j] end
  end
  return out
end

-- 1. guards: "key\tmode\texpected\n"; mode e compares the etag prefix, v the whole value
local g_keys, g_modes, g_expected = {}, {}, {}
for k, mode, expected in string.gmatch(ARGV[11], '([^\t\n]+)\t(%a)\t([^\t\n]*)\n') do
  g_keys[#g_keys + 1] = k
  g_modes[#g_modes + 1] = mode
  g_expected[#g_expected + 1] = expected
end
if #g_keys > 0 then
  local current = mget(g_keys)
  for i = 1, #g_keys do
    local v = current[i] or ''
    if g_modes[i] == 'e' then v = string.sub(v, 1, ${ETAG}) end
    if v ~= g_expected[i] then return {i - 1} end
  end
end

-- 2. shopper and product states, product documents, category price sums
local pos = 25
local n_users, n_products, n_docs, n_fields = tonumber(ARGV[18]), tonumber(ARGV[19]),
  tonumber(ARGV[20]), tonumber(ARGV[21])
for i = 1, n_users do
  redis.call('SET', ARGV[pos], ARGV[pos + 1], 'PX', user_ttl)
  pos = pos + 2
end
local last = pos + 2 * (n_products + n_docs) - 1
for i = pos, last, 2 * CHUNK do
  redis.call('MSET', unpack(ARGV, i, math.min(i + 2 * CHUNK - 1, last)))
end
if n_products > 0 then  -- a new catalog generation: the products' etag, random per commit
  redis.call('SET', '${CATALOG_GENERATION}' .. tag, string.sub(ARGV[pos + 1], 1, ${ETAG}))
end
pos = last + 1
for i = 1, n_fields do
  redis.call('HINCRBY', '${CATEGORY_PRICES}' .. tag, ARGV[pos], ARGV[pos + 1])
  pos = pos + 2
end

-- Fixed-layout statistics, loaded once per batch with MGET, written back with MSET / SET PX.
local states, sizes, order = {}, {}, {}
local function want(k, n)
  if sizes[k] == nil then
    sizes[k] = n
    order[#order + 1] = k
  end
end
local function load_all()
  local raw = mget(order)
  for i, k in ipairs(order) do
    local n, s = sizes[k], {}
    local stored = raw[i] and math.min(n, math.floor(#raw[i] / 8)) or 0  -- older, shorter layouts
    if stored > 0 then
      local v = {struct.unpack('<' .. string.rep('d', stored), raw[i])}
      for j = 1, stored do s[j] = v[j] end
    end
    for j = stored + 1, n do s[j] = 0 end
    states[k] = s
  end
end

-- One decayed group of a state: s[at] its reference time, s[at + 1 .. at + n] its sums (``at``
-- defaults to 1: the state's first group). features.query_item keeps a second group at 5.
local function bump(s, n, slot, t, h, at)
  at = at or 1
  local t_ref = s[at]
  if t > t_ref then
    local f = 2 ^ (-(t - t_ref) / h)
    for i = at + 1, at + n do s[i] = s[i] * f end
    s[at] = t
    s[at + slot] = s[at + slot] + 1
  else
    s[at + slot] = s[at + slot] + 1 * 2 ^ (-(t_ref - t) / h)
  end
end

-- 3. read everything the statistics need: items, query texts, waiting clicks, query-products
local items = {}
for pid, kind, t in string.gmatch(ARGV[12], '(%S+)\t(%d)\t(%S+)\n') do
  local k = '${ITEM}' .. tag .. pid
  want(k, 10)
  items[#items + 1] = {k, tonumber(kind), tonumber(t)}
end
local shown = {}
for t, pids in string.gmatch(ARGV[17], '(%S+)\t([^\n]+)\n') do
  local tn = tonumber(t)
  for pid in string.gmatch(pids, '%S+') do
    local k = '${ITEM}' .. tag .. pid
    want(k, 10)
    shown[#shown + 1] = {k, tn}
  end
end
local queries, texts = {}, {}
for qid, text in string.gmatch(ARGV[13], '(%S+)\t([^\t\n]+)\n') do
  queries[#queries + 1] = {qid, text}
end
local clicks, unknown = {}, {}
for qid, pid, kind, t in string.gmatch(ARGV[14], '(%S+)\t(%S+)\t(%d)\t(%S+)\n') do
  clicks[#clicks + 1] = {qid, pid, kind, t}
  unknown[#unknown + 1] = qid
end
for _, q in ipairs(queries) do texts[q[1]] = q[2] end
if #unknown > 0 then
  for i = 1, #unknown, CHUNK do
    local part = {unpack(unknown, i, math.min(i + CHUNK - 1, #unknown))}
    local found = redis.call('HMGET', text_hash, unpack(part))
    local older = redis.call('HMGET', old_text_hash, unpack(part))
    for j, qid in ipairs(part) do
      if texts[qid] == nil then texts[qid] = found[j] or older[j] or nil end
    end
  end
end
local waiting = {}
if #queries > 0 then
  local pkeys = {}
  for i, q in ipairs(queries) do pkeys[i] = '${QUERY_PENDING}' .. tag .. q[1] end
  local raw = mget(pkeys)
  local done = {}
  for i, q in ipairs(queries) do
    if raw[i] then
      for pid, kind, t in string.gmatch(raw[i], '(%S+)\t(%d)\t(%S+)\n') do
        waiting[#waiting + 1] = {q[2], pid, tonumber(kind), tonumber(t)}
      end
      done[#done + 1] = pkeys[i]
    end
  end
  if #done > 0 then redis.call('DEL', unpack(done)) end
end
local joined = {}
for _, c in ipairs(clicks) do
  local text = texts[c[1]]
  if text then
    joined[#joined + 1] = {text, c[2], tonumber(c[3]), tonumber(c[4])}
  else
    local pk = '${QUERY_PENDING}' .. tag .. c[1]
    redis.call('APPEND', pk, c[2] .. '\t' .. c[3] .. '\t' .. c[4] .. '\n')
    redis.call('PEXPIRE', pk, pending_ttl)
  end
end
-- Query evidence: one hash per query text (and per "_word"), a field per product and the field
-- '${TOTAL}' for the query's totals; loaded with one HMGET per hash, written back with HSET.
local h_states, h_fields, h_order = {}, {}, {}
local function hwant(h, f)
  local fs = h_fields[h]
  if fs == nil then
    fs = {}
    h_fields[h] = fs
    h_states[h] = {}
    h_order[#h_order + 1] = h
  end
  if h_states[h][f] == nil then
    h_states[h][f] = false  -- loaded below
    fs[#fs + 1] = f
  end
end
local function decode6(raw)
  local s = {0, 0, 0, 0, 0, 0}
  local stored = raw and math.min(6, math.floor(#raw / 8)) or 0  -- older, shorter layouts
  if stored > 0 then
    local v = {struct.unpack('<' .. string.rep('d', stored), raw)}
    for j = 1, stored do s[j] = v[j] end
  end
  return s
end
local function hload_all()
  for _, h in ipairs(h_order) do
    local fs, st = h_fields[h], h_states[h]
    for i = 1, #fs, CHUNK do
      local part = redis.call('HMGET', h, unpack(fs, i, math.min(i + CHUNK - 1, #fs)))
      for j = 1, #part do st[fs[i + j - 1]] = decode6(part[j]) end
    end
  end
end
-- A stored text is "key word word ... @context ...": the interaction counts under the key, each
-- "_word" and each context key as it is (features.query_item.evidence_keys), for the product and
-- in the key's totals.
local function qi_keys(list)
  for _, e in ipairs(list) do
    local hs, ws, prefix = {}, {}, ''
    for part in string.gmatch(e[1], '%S+') do
      local h
      if prefix ~= '' and string.sub(part, 1, 1) == '${CONTEXT}' then
        h = '${QUERY_EVIDENCE}' .. tag .. part
      else
        h = '${QUERY_EVIDENCE}' .. tag .. prefix .. part
        if prefix ~= '' then ws[#ws + 1] = part end
        prefix = '${WORD}'
      end
      hwant(h, e[2])
      hwant(h, '${TOTAL}')
      hs[#hs + 1] = h
    end
    e[5] = hs
    e[6] = ws
  end
end
qi_keys(waiting)
qi_keys(joined)
load_all()
hload_all()

-- 4. apply: product statistics, then query texts (releasing waiting clicks), then the clicks
for _, op in ipairs(items) do
  local s, kind, t = states[op[1]], op[2], op[3]
  bump(s, 4, kind, t, h_item)
  s[kind + 5] = s[kind + 5] + 1
  if kind ~= 4 and t > s[10] then s[10] = t end
end
for _, op in ipairs(shown) do
  local s = states[op[1]]
  bump(s, 4, 4, op[2], h_item)
  s[9] = s[9] + 1
end
if #queries > 0 then
  local fields = {}
  for _, q in ipairs(queries) do
    fields[#fields + 1] = q[1]
    fields[#fields + 1] = q[2]
  end
  for i = 1, #fields, 2 * CHUNK do
    redis.call('HSET', text_hash, unpack(fields, i, math.min(i + 2 * CHUNK - 1, #fields)))
  end
  redis.call('EXPIREAT', text_hash, text_expiry)
end
local word_clicks = {}
for _, list in ipairs({waiting, joined}) do
  for _, e in ipairs(list) do
    for _, h in ipairs(e[5]) do
      for _, s in ipairs({h_states[h][e[2]], h_states[h]['${TOTAL}']}) do
        bump(s, 3, e[3], e[4], h_query)
        if e[3] == 1 then bump(s, 1, 1, e[4], h_burst, 5) end  -- clicks, short half-life
      end
    end
    if e[3] == 1 then
      for _, w in ipairs(e[6]) do word_clicks[w] = (word_clicks[w] or 0) + 1 end
    end
  end
end
for w, n in pairs(word_clicks) do redis.call('ZINCRBY', '${QUERY_WORDS}' .. tag, n, w) end

-- 5. write statistics back
local mset = {}
for _, k in ipairs(order) do
  mset[#mset + 1] = k
  mset[#mset + 1] = struct.pack('<' .. string.rep('d', sizes[k]), unpack(states[k], 1, sizes[k]))
end
for i = 1, #mset, 2 * CHUNK do
  redis.call('MSET', unpack(mset, i, math.min(i + 2 * CHUNK - 1, #mset)))
end
for _, h in ipairs(h_order) do
  local fv, st = {}, h_states[h]
  for _, f in ipairs(h_fields[h]) do
    fv[#fv + 1] = f
    fv[#fv + 1] = struct.pack('<dddddd', unpack(st[f], 1, 6))
  end
  for i = 1, #fv, 2 * CHUNK do
    redis.call('HSET', h, unpack(fv, i, math.min(i + 2 * CHUNK - 1, #fv)))
  end
  redis.call('PEXPIRE', h, qi_ttl)  -- the query's expiry (features.keys.query_evidence)
end

-- 6. "applied" markers (one hash per time bucket), partition offsets, counters
local markers = {}
for m in string.gmatch(ARGV[15], '(%S+)\n') do
  markers[#markers + 1] = m
  markers[#markers + 1] = '1'
end
for i = 1, #markers, 2 * CHUNK do
  redis.call('HSET', marker_hash, unpack(markers, i, math.min(i + 2 * CHUNK - 1, #markers)))
end
if #markers > 0 then
  redis.call('EXPIREAT', marker_hash, marker_expiry)
  redis.call('HINCRBY', '${STATS}' .. tag, '${STATS_APPLIED}', #markers / 2)
end
for k, v in string.gmatch(ARGV[16], '(%S+)\t(%S+)\n') do redis.call('SET', k, v) end
if ARGV[22] ~= '0' then redis.call('HINCRBY', '${STATS}' .. tag, '${STATS_DUPLICATES}', ARGV[22]) end
return 0
""")

ETAG = 12

COMMIT = _SOURCE.substitute(
    ETAG=ETAG,
    CATEGORY_PRICES=keys.CATEGORY_PRICES,
    CATALOG_GENERATION=keys.CATALOG_GENERATION,
    QUERY_EVIDENCE=keys.QUERY_EVIDENCE,
    TOTAL=keys.QUERY_TOTAL_FIELD,
    QUERY_WORDS=keys.QUERY_WORDS,
    ITEM=keys.ITEM,
    QUERY_PENDING=keys.QUERY_PENDING,
    STATS=keys.STATS,
    STATS_APPLIED=keys.STATS_APPLIED,
    STATS_DUPLICATES=keys.STATS_DUPLICATES,
    WORD=query_item.WORD,
    CONTEXT=query_item.CONTEXT,
)
SHA = hashlib.sha1(COMMIT.encode()).hexdigest()  # EVALSHA's name for it
