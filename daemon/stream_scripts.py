"""The Lua scripts behind the stream primitives (`daemon.streams`): the fenced read, the
batch's atomic write, and the partition lease. Each checks the lease in the same atomic step
as what it does (CONTRACT section 9)."""

from __future__ import annotations

# One atomic write per batch: lease check (fencing), idempotency probe, outputs, dead
# letters, acks. A script that fails halfway keeps what it wrote (Redis has no rollback), so
# everything that could fail is checked before the first write: the output and dead-letter
# keys are streams (or absent), and no command gets more arguments than Lua's unpack takes
# (a dead letter's fields are capped by `daemon.wire.dead_letter_fields`).
# KEYS = lease, output, dead_letter, input_1..input_k.
# ARGV = token, group, maxlen, probe_stream_index, probe_id,
#        n_out, symbols (concatenated), their lengths ("3 4 ..."), data (concatenated), their
#        lengths, n_dead, (n_fields, field, value, ...)*, then per input: its ids ("1-0 2-0").
# A batch's outputs travel as four arguments rather than two per output: packing thousands
# of small arguments costs the client more than the script spends cutting them apart. The
# output is trimmed once per batch, not on each XADD (the same `MAXLEN ~`, 10% less of
# Redis's time in the script).
COMMIT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local group, maxlen = ARGV[2], ARGV[3]
local probe = tonumber(ARGV[4])
if probe > 0 then
  local p = redis.call('XPENDING', KEYS[3 + probe], group, ARGV[5], ARGV[5], 1)
  if #p == 0 then return 0 end
end
local n_out = tonumber(ARGV[6])
for k = 2, 3 do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE key ' .. KEYS[k] .. ' holds a ' .. t .. ', not a stream')
  end
end
if n_out > 0 then
  local symbols, data = ARGV[7], ARGV[9]
  local sp, dp, lens = 1, 1, {}
  for x in string.gmatch(ARGV[8], '%d+') do lens[#lens + 1] = tonumber(x) end
  local i = 0
  for x in string.gmatch(ARGV[10], '%d+') do
    i = i + 1
    local sl, dl = lens[i], tonumber(x)
    redis.call('XADD', KEYS[2], '*',
      'symbol', string.sub(symbols, sp, sp + sl - 1), 'data', string.sub(data, dp, dp + dl - 1))
    sp, dp = sp + sl, dp + dl
  end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', maxlen)
end
local pos = 11
local n_dead = tonumber(ARGV[pos]); pos = pos + 1
for i = 1, n_dead do
  local nf = tonumber(ARGV[pos]); pos = pos + 1
  local args = {KEYS[3], 'MAXLEN', '~', maxlen, '*'}
  for j = 1, 2 * nf do args[#args + 1] = ARGV[pos]; pos = pos + 1 end
  redis.call('XADD', unpack(args))
end
for s = 4, #KEYS do
  local args = {KEYS[s], group}
  for id in string.gmatch(ARGV[pos], '%S+') do
    args[#args + 1] = id
    if #args >= 502 then redis.call('XACK', unpack(args)); args = {KEYS[s], group} end
  end
  if #args > 2 then redis.call('XACK', unpack(args)) end
  pos = pos + 1
end
return 1
"""

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

ACQUIRE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Reads of new entries are fenced like the writes: XREADGROUP '>' moves the group's cursor,
# and entries delivered to an instance that has lost its lease would be stranded on its
# consumer (the new owner claimed the pending ones when it took over). Scripts cannot block,
# so an empty read returns each stream's last entry id, to wait on with XREAD BLOCK. Where the
# client can hold a transaction (not Redis Cluster), `StreamIO` reads the same way with WATCH
# and MULTI/EXEC instead, which spares Redis turning the reply into Lua tables and back.
# KEYS = lease, input_1..input_k. ARGV = token, group, consumer, count.
# Returns -1 (lease lost), {1, xreadgroup reply}, or {0, last id per input ('0-0' if empty)}.
READ_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local args = {'XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS'}
for i = 2, #KEYS do args[#args + 1] = KEYS[i] end
for i = 2, #KEYS do args[#args + 1] = '>' end
local reply = redis.call(unpack(args))
if reply and #reply > 0 then return {1, reply} end
local tails = {0}
for i = 2, #KEYS do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  tails[#tails + 1] = (#last > 0) and last[1][1] or '0-0'
end
return tails
"""
