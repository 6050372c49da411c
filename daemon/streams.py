"""Redis stream primitives: consumer groups, reads, the fenced atomic publish+ack, leases.

No math here: entries go in and out as raw field maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

Fields = dict[bytes, bytes]

# One atomic write per batch: lease check (fencing), idempotency probe, outputs, dead
# letters, acks. KEYS = lease, output, dead_letter, input_1..input_k.
# ARGV = token, group, maxlen, probe_stream_index, probe_id, n_out, (symbol, data)*,
#        n_dead, (n_fields, field, value, ...)*, then per input: n_ids, ids...
COMMIT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local group, maxlen = ARGV[2], ARGV[3]
local probe = tonumber(ARGV[4])
if probe > 0 then
  local p = redis.call('XPENDING', KEYS[3 + probe], group, ARGV[5], ARGV[5], 1)
  if #p == 0 then return 0 end
end
local pos = 6
local n_out = tonumber(ARGV[pos]); pos = pos + 1
for i = 1, n_out do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'symbol', ARGV[pos], 'data', ARGV[pos + 1])
  pos = pos + 2
end
local n_dead = tonumber(ARGV[pos]); pos = pos + 1
for i = 1, n_dead do
  local nf = tonumber(ARGV[pos]); pos = pos + 1
  local args = {KEYS[3], 'MAXLEN', '~', maxlen, '*'}
  for j = 1, 2 * nf do args[#args + 1] = ARGV[pos]; pos = pos + 1 end
  redis.call('XADD', unpack(args))
end
for s = 4, #KEYS do
  local n_ids = tonumber(ARGV[pos]); pos = pos + 1
  local args = {KEYS[s], group}
  for j = 1, n_ids do
    args[#args + 1] = ARGV[pos]; pos = pos + 1
    if #args >= 502 then redis.call('XACK', unpack(args)); args = {KEYS[s], group} end
  end
  if #args > 2 then redis.call('XACK', unpack(args)) end
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
# so an empty read returns each stream's last entry id, to wait on with XREAD BLOCK.
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

COMMITTED = 1
ALREADY_COMMITTED = 0
LEASE_LOST = -1


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    entry_id: str
    fields: Fields
    deliveries: int = 1


@dataclass(slots=True)
class Commit:
    """What one batch writes: outputs, dead letters, and the entries to ack."""

    outputs: list[tuple[bytes, bytes]]  # (symbol, msgpack data)
    dead: list[dict[bytes, bytes]]
    acks: dict[str, list[str]]  # input stream -> entry ids


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamIO:
    """The Redis side of one partition: its input streams, output, dead letters, lease."""

    def __init__(
        self,
        redis: Any,
        *,
        inputs: Sequence[str],
        output: str,
        dead_letter: str,
        group: str,
        consumer: str,
        lease_key: str,
        output_maxlen: int,
        handback_key: str = "",
    ) -> None:
        self.redis = redis
        self.inputs = tuple(inputs)
        self.output = output
        self.dead_letter = dead_letter
        self.group = group
        self.consumer = consumer
        self.lease_key = lease_key
        self.handback_key = handback_key or lease_key + ":handback"
        self.output_maxlen = output_maxlen
        self._commit = redis.register_script(COMMIT_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._read = redis.register_script(READ_LUA)

    # ---- groups and reads ----------------------------------------------------------------

    async def ensure_groups(self) -> None:
        for stream in self.inputs:
            try:
                await self.redis.xgroup_create(stream, self.group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_new(self, token: str, count: int, block_ms: int) -> list[Entry] | None:
        """New entries for this consumer, waiting up to `block_ms` for some; None when the
        lease `token` no longer holds the partition (nothing was delivered then)."""
        keys = [self.lease_key, *self.inputs]
        args = [token, self.group, self.consumer, count]
        reply = await self._read(keys=keys, args=args)
        if isinstance(reply, list) and int(reply[0]) == 0 and block_ms > 0:
            tails = {s: _s(i) for s, i in zip(self.inputs, reply[1:], strict=True)}
            # No side effect: only waits until an entry newer than what the group has seen.
            await self.redis.xread(tails, count=1, block=block_ms)
            reply = await self._read(keys=keys, args=args)
        if not isinstance(reply, list):
            return None  # -1: the lease is gone
        return _script_entries(reply[1]) if int(reply[0]) == 1 else []

    async def groups_missing(self) -> bool:
        """Whether the group is missing on any input (Redis restarted empty, or deleted)."""
        for stream in self.inputs:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                return True  # no such key
            if not any(_s(g["name"]) == self.group for g in groups):
                return True
        return False

    async def read_own_pending(self, count: int, after: dict[str, str]) -> list[Entry]:
        """This consumer's pending entries after the given ids (one stream at a time)."""
        for stream in self.inputs:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {stream: after.get(stream, "0")}, count=count
            )
            entries = _entries(reply)
            if entries:
                return entries
        return []

    async def most_deliveries_pending(self, count: int, after: dict[str, str]) -> int:
        """Highest delivery count among our next `count` pending entries (XPENDING: a peek
        that, unlike a read, delivers nothing and counts nothing)."""
        for stream in self.inputs:
            low = after.get(stream)
            rows = await self.redis.xpending_range(
                stream, self.group, min="(" + low if low else "-", max="+", count=count,
                consumername=self.consumer,
            )
            if rows:
                return max(int(r["times_delivered"]) for r in rows)
        return 0

    async def claim_all_pending(self) -> int:
        """Take over entries pending on other consumers (we hold the lease: they are gone)."""
        claimed = 0
        for stream in self.inputs:
            low = "-"
            while True:
                rows = await self.redis.xpending_range(
                    stream, self.group, min=low, max="+", count=1000
                )
                ids = [_s(r["message_id"]) for r in rows if _s(r["consumer"]) != self.consumer]
                if ids:
                    # JUSTID: taking ownership is no delivery (the read of our pending entries
                    # that follows is one), so a restart counts once towards MAX_DELIVERIES.
                    # (XAUTOCLAIM JUSTID would do, but redis-py drops its cursor.)
                    taken = await self.redis.xclaim(
                        stream, self.group, self.consumer, min_idle_time=0, message_ids=ids,
                        justid=True,
                    )
                    claimed += len(taken)
                if len(rows) < 1000:
                    break
                low = "(" + _s(rows[-1]["message_id"])
        return claimed

    async def delivery_counts(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        rows = await self.redis.xpending_range(
            stream, self.group, min=ids[0], max=ids[-1], count=len(ids) + 16
        )
        return {_s(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def history_boundary(self, stream: str) -> str | None:
        """The last entry whose bar is part of the acknowledged history (inclusive)."""
        groups = await self.redis.xinfo_groups(stream)
        info = next((g for g in groups if _s(g["name"]) == self.group), None)
        if info is None:
            return None
        summary = await self.redis.xpending(stream, self.group)
        if summary and int(summary["pending"]) > 0:
            lowest = _s(summary["min"])
            ms, seq = (int(x) for x in lowest.split("-"))
            if seq > 0:
                return f"{ms}-{seq - 1}"
            return f"{ms - 1}-18446744073709551615" if ms > 0 else None
        return _s(info["last-delivered-id"])

    async def scan_history_backwards(
        self, stream: str, boundary: str, chunk: int = 10_000
    ) -> Any:
        """Yield chunks of (id, fields), newest first, from `boundary` back to the start."""
        upper = boundary
        while True:
            rows = await self.redis.xrevrange(stream, max=upper, min="-", count=chunk)
            if not rows:
                return
            yield [(_s(i), f) for i, f in rows]
            if len(rows) < chunk:
                return
            upper = "(" + _s(rows[-1][0])

    # ---- the atomic write ----------------------------------------------------------------

    async def commit(self, token: str, commit: Commit) -> int:
        args: list[Any] = [token, self.group, self.output_maxlen]
        probe = next(
            ((i + 1, ids[0]) for i, s in enumerate(self.inputs) if (ids := commit.acks.get(s))),
            (0, ""),
        )
        args.extend(probe)
        args.append(len(commit.outputs))
        for symbol, data in commit.outputs:
            args.extend((symbol, data))
        args.append(len(commit.dead))
        for fields in commit.dead:
            args.append(len(fields))
            for k, v in fields.items():
                args.extend((k, v))
        for stream in self.inputs:
            ids = commit.acks.get(stream, [])
            args.append(len(ids))
            args.extend(ids)
        keys = [self.lease_key, self.output, self.dead_letter, *self.inputs]
        return int(await self._commit(keys=keys, args=args))

    # ---- the lease -----------------------------------------------------------------------

    async def acquire_lease(self, token: str, lease_ms: int) -> bool:
        return bool(await self._acquire(keys=[self.lease_key], args=[token, lease_ms]))

    async def renew_lease(self, token: str, lease_ms: int) -> bool:
        return bool(await self._renew(keys=[self.lease_key], args=[token, lease_ms]))

    async def release_lease(self, token: str) -> None:
        await self._release(keys=[self.lease_key], args=[token])

    async def request_handback(self, token: str, ttl_ms: int) -> None:
        """Ask the current holder (which only stands in for us) to hand the partition back."""
        await self.redis.set(self.handback_key, token, px=ttl_ms)

    async def handback_requested(self) -> bool:
        return bool(await self.redis.exists(self.handback_key))

    async def lease_holder(self) -> str | None:
        value = await self.redis.get(self.lease_key)
        return _s(value) if value is not None else None


def _script_entries(reply: Any) -> list[Entry]:
    """Entries from an XREADGROUP reply passed through a script: [[stream, [[id, [f, v,
    ...]], ...]], ...] (some emulations flatten it to [stream, rows, stream, rows, ...])."""
    if reply and isinstance(reply[0], bytes | str):
        pairs = list(zip(reply[0::2], reply[1::2], strict=True))
    else:
        pairs = [(item[0], item[1]) for item in reply or ()]
    out: list[Entry] = []
    for stream, rows in pairs:
        name = _s(stream)
        for entry_id, flat in rows or ():
            flat = flat or []
            out.append(Entry(name, _s(entry_id), dict(zip(flat[0::2], flat[1::2], strict=True))))
    return out


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, rows in items:
        name = _s(stream)
        for entry_id, fields in rows:
            # A pending entry deleted from the stream (XDEL/trim) comes back with no fields.
            out.append(Entry(name, _s(entry_id), fields if fields is not None else {}))
    return out
