"""Redis stream primitives: consumer groups, reads, the fenced atomic publish+ack, leases.

No math here: entries go in and out as raw field maps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from daemon.entries import (
    Commit,
    Entry,
    EntryBatch,
    as_str,
    entries_of,
    id_key,
    read_batch,
    row_ids,
)
from daemon.partitions import PartitionKeys
from daemon.stream_scripts import ACQUIRE_LUA, COMMIT_LUA, READ_LUA, RELEASE_LUA, RENEW_LUA

COMMITTED = 1
ALREADY_COMMITTED = 0
LEASE_LOST = -1

# A watched read starts over when the lease key changed between WATCH and EXEC (the holder's
# own renewal touches it too); after this many tries in a row, the script reads instead.
WATCH_TRIES = 3
_CHANGED = object()


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
        self._raw: Any = None  # see _raw_client
        # Bumped each time the consumer group had vanished (Redis lost its data) and was
        # created again: a batch read before then can no longer be probed or acked.
        self.group_epoch = 0

    @classmethod
    def for_partition(
        cls, redis: Any, keys: PartitionKeys, *, group: str, consumer: str, output_maxlen: int
    ) -> StreamIO:
        """The partition's keys as `partition_keys` lays them out."""
        return cls(
            redis,
            inputs=keys.inputs,
            output=keys.output,
            dead_letter=keys.dead_letter,
            group=group,
            consumer=consumer,
            lease_key=keys.lease_key,
            output_maxlen=output_maxlen,
            handback_key=keys.handback_key,
        )

    # ---- groups and reads ----------------------------------------------------------------

    async def ensure_groups(self) -> None:
        for stream in self.inputs:
            try:
                await self.redis.xgroup_create(stream, self.group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def recreate_groups(self) -> None:
        """The group vanished (Redis restarted without its data, or a manual delete)."""
        await self.ensure_groups()
        self.group_epoch += 1

    async def read_new(self, token: str, count: int, block_ms: int) -> EntryBatch | None:
        """New entries for this consumer, waiting up to `block_ms` for some; None when the
        lease `token` no longer holds the partition (nothing was delivered then)."""
        read = await self._read_fenced(token, count)
        if read is not None and not read[0] and block_ms > 0:
            # No side effect: only waits until an entry newer than what the group has seen.
            await self.redis.xread(read[1], count=1, block=block_ms)
            read = await self._read_fenced(token, count)
        return None if read is None else read[0]

    async def _read_fenced(
        self, token: str, count: int
    ) -> tuple[EntryBatch, dict[str, str]] | None:
        """XREADGROUP '>' only while `token` holds the lease, and each input's last entry id
        as of that read (what an empty read waits on); None when the lease is not ours.

        Where the client allows it (not Redis Cluster), the lease is WATCHed and the read
        runs in MULTI/EXEC: an XREADGROUP reply passed through a script costs Redis twice
        the read itself (Lua tables built and turned back; BENCHMARKS.md)."""
        raw = self._raw_client()
        if raw is not None:
            for _ in range(WATCH_TRIES):
                read = await self._read_watched(raw, token, count)
                if read is not _CHANGED:
                    return read  # type: ignore[return-value]
        reply = await self._read(
            keys=[self.lease_key, *self.inputs], args=[token, self.group, self.consumer, count]
        )
        if not isinstance(reply, list):
            return None  # -1: the lease is gone
        if int(reply[0]) == 1:
            return read_batch(reply[1]), {}
        return EntryBatch(), {s: as_str(i) for s, i in zip(self.inputs, reply[1:], strict=True)}

    async def _read_watched(self, raw: Any, token: str, count: int) -> Any:
        try:
            async with raw.pipeline(transaction=True) as pipe:
                await pipe.watch(self.lease_key)
                holder = await pipe.get(self.lease_key)
                if holder is None or as_str(holder) != token:
                    return None
                pipe.multi()
                pipe.execute_command(
                    "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count,
                    "STREAMS", *self.inputs, *(">",) * len(self.inputs),
                )
                for stream in self.inputs:
                    pipe.execute_command("XREVRANGE", stream, "+", "-", "COUNT", 1)
                reply, *last = await pipe.execute()
        except WatchError as exc:
            if _connection_died(exc):
                # redis-py reports a connection that died while a key was watched as a
                # WatchError. It is an outage, and around EXEC Redis may have run the read
                # (entries delivered, the reply lost): never "nothing was read".
                raise RedisConnectionError(f"connection lost during a read: {exc}") from exc
            return _CHANGED  # the lease key changed in between: EXEC refused, nothing read
        tails = {
            s: as_str(rows[0][0]) if rows else "0-0" for s, rows in zip(self.inputs, last, strict=True)
        }
        return read_batch(reply), tails

    async def groups_missing(self) -> bool:
        """Whether the group is missing on any input (Redis restarted empty, or deleted)."""
        for stream in self.inputs:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                return True  # no such key
            if not any(as_str(g["name"]) == self.group for g in groups):
                return True
        return False

    async def read_own_pending(self, count: int, after: dict[str, str]) -> list[Entry]:
        """This consumer's pending entries after the given ids (one stream at a time)."""
        for stream in self.inputs:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {stream: after.get(stream, "0")}, count=count
            )
            entries = entries_of(reply)
            if entries:
                return entries
        return []

    async def most_deliveries_pending(
        self, count: int, after: dict[str, str], uncounted: Mapping[str, int] | None = None
    ) -> int:
        """Highest delivery count among our next `count` pending entries (XPENDING: a peek
        that, unlike a read, delivers nothing and counts nothing), less each entry's
        `uncounted["<stream>/<id>"]` deliveries."""
        for stream in self.inputs:
            low = after.get(stream)
            rows = await self.redis.xpending_range(
                stream, self.group, min="(" + low if low else "-", max="+", count=count,
                consumername=self.consumer,
            )
            if rows:
                less = uncounted or {}
                return max(
                    int(r["times_delivered"])
                    - less.get(f"{stream}/{as_str(r['message_id'])}", 0)
                    for r in rows
                )
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
                ids = [as_str(r["message_id"]) for r in rows if as_str(r["consumer"]) != self.consumer]
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
                low = "(" + as_str(rows[-1]["message_id"])
        return claimed

    async def forget_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete the group's other consumers that hold no pending entry and have been idle
        for `idle_ms` (called by the lease holder after taking their pending entries over:
        every restart names a new consumer, and the dead ones would pile up in XINFO). A
        consumer with pending entries is never deleted: that would drop them."""
        forgotten = []
        for stream in self.inputs:
            for consumer in await self.redis.xinfo_consumers(stream, self.group):
                name = as_str(consumer["name"])
                if name == self.consumer or int(consumer["pending"]) != 0:
                    continue
                if int(consumer.get("idle", 0)) < idle_ms:
                    continue
                await self.redis.xgroup_delconsumer(stream, self.group, name)
                forgotten.append(name)
        return forgotten

    async def delivery_counts(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        rows = await self.redis.xpending_range(
            stream, self.group, min=ids[0], max=ids[-1], count=len(ids) + 16
        )
        return {as_str(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def unread_entries_gone(self) -> dict[str, str]:
        """Input streams that lost entries the group had not read (trimmed or deleted while no
        one consumed): stream -> what Redis shows. Those bars never get an output; Redis does
        not say how many. Empty where Redis (< 7) does not tell."""
        found: dict[str, str] = {}
        for stream in self.inputs:
            try:
                info = await self.redis.xinfo_stream(stream)
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            group = next((g for g in groups if as_str(g["name"]) == self.group), None)
            if group is None or not isinstance(info, dict):
                continue
            last = as_str(group["last-delivered-id"])
            first = info.get("first-entry")
            oldest = as_str(first[0]) if first else None
            generated = info.get("last-generated-id")
            deleted = info.get("max-deleted-entry-id")
            added, length = info.get("entries-added"), int(info.get("length", 0))
            if last == "0-0":  # the group read nothing yet: anything removed was unread
                if added is not None and int(added) > length:
                    found[stream] = (f"{int(added) - length} entries removed before the first"
                                     " read")
            elif oldest is not None and id_key(oldest) > id_key(last):
                found[stream] = (f"trimmed past the last entry read ({last}); the oldest kept"
                                 f" is {oldest}: no history before it")
            elif oldest is None and generated is not None and (
                id_key(as_str(generated)) > id_key(last)
            ):
                found[stream] = (f"trimmed to empty after the last entry read ({last}); the"
                                 f" newest added was {as_str(generated)}")
            elif deleted is not None and id_key(as_str(deleted)) > id_key(last):
                found[stream] = (f"entries deleted (XDEL) after the last entry read ({last}),"
                                 f" up to {as_str(deleted)}")
        return found

    async def history_boundary(self, stream: str) -> str | None:
        """The last entry whose bar is part of the acknowledged history (inclusive)."""
        groups = await self.redis.xinfo_groups(stream)
        info = next((g for g in groups if as_str(g["name"]) == self.group), None)
        if info is None:
            return None
        summary = await self.redis.xpending(stream, self.group)
        if summary and int(summary["pending"]) > 0:
            lowest = as_str(summary["min"])
            ms, seq = (int(x) for x in lowest.split("-"))
            if seq > 0:
                return f"{ms}-{seq - 1}"
            return f"{ms - 1}-18446744073709551615" if ms > 0 else None
        return as_str(info["last-delivered-id"])

    async def scan_history_backwards(
        self, stream: str, boundary: str, chunk: int = 10_000
    ) -> AsyncIterator[tuple[list[str], list[Any]]]:
        """Yield chunks of (ids, fields), newest first, from `boundary` back to the start;
        fields as Redis sends them (flat lists) where the client allows, else mappings."""
        raw = self._raw_client()
        upper = boundary
        while True:
            if raw is not None:
                rows = await raw.execute_command("XREVRANGE", stream, upper, "-", "COUNT", chunk)
            else:
                rows = await self.redis.xrevrange(stream, max=upper, min="-", count=chunk)
            if not rows:
                return
            yield row_ids(rows), [f if f is not None else [] for _, f in rows]
            if len(rows) < chunk:
                return
            upper = "(" + as_str(rows[-1][0])

    def _raw_client(self) -> Any:
        """A client on the same connections that leaves XREVRANGE and XREADGROUP replies as
        Redis sent them (redis-py otherwise builds an (id, dict) pair per entry, the larger
        part of a history scan's cost). None where that is not possible (Redis Cluster):
        parsed replies then."""
        if self._raw is None:
            self._raw = False
            pool = getattr(self.redis, "connection_pool", None)
            callbacks = getattr(self.redis, "response_callbacks", None)
            if pool is not None and callbacks is not None:
                from redis.asyncio import Redis

                raw = Redis(connection_pool=pool)
                raw.response_callbacks = {
                    k: v for k, v in callbacks.items()
                    if str(k).upper() not in ("XREVRANGE", "XREADGROUP")
                }
                self._raw = raw
        return self._raw or None

    # ---- the atomic write ----------------------------------------------------------------

    async def commit(self, token: str, commit: Commit, *, probe_first: bool = True) -> int:
        """The batch's outputs, dead letters and acks in one fenced script. With
        `probe_first` a batch whose first entry is no longer pending was committed already
        (a retry after a lost reply): nothing is written again (ALREADY_COMMITTED)."""
        args: list[Any] = [token, self.group, self.output_maxlen]
        probe = next(
            ((i + 1, ids[0]) for i, s in enumerate(self.inputs) if (ids := commit.acks.get(s))),
            (0, ""),
        ) if probe_first else (0, "")
        args.extend(probe)
        symbols = [symbol for symbol, _ in commit.outputs]
        data = [d for _, d in commit.outputs]
        args += [
            len(commit.outputs),
            b"".join(symbols), " ".join(map(str, map(len, symbols))),
            b"".join(data), " ".join(map(str, map(len, data))),
        ]
        args.append(len(commit.dead))
        for fields in commit.dead:
            args.append(len(fields))
            for k, v in fields.items():
                args.extend((k, v))
        for stream in self.inputs:
            args.append(" ".join(commit.acks.get(stream, ())))
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
        return as_str(value) if value is not None else None


async def group_lag(redis: Any, stream: str, group: str) -> tuple[dict[str, Any], int | None] | None:
    """The group's XINFO GROUPS entry and its lag (entries not yet delivered to it), or None
    when the group does not exist. A group whose last delivered entry is the stream's newest
    has none, whatever Redis says: Redis 7.0 restarted from its append-only file can keep a
    stale `lag` for good (its read counter is not logged; fixed upstream in 7.2)."""
    for g in await redis.xinfo_groups(stream):
        if as_str(g.get("name")) != group:
            continue
        newest = await redis.xrevrange(stream, count=1)
        delivered = as_str(g.get("last-delivered-id") or "0-0")
        if not newest or id_key(delivered) >= id_key(as_str(newest[0][0])):
            return g, 0
        lag = g.get("lag")
        return g, None if lag is None else int(lag)
    return None


def _connection_died(exc: WatchError) -> bool:
    """A WatchError that redis-py raised for a dead connection (the error it replaces is the
    exception being handled then), not for EXEC refused because a watched key changed."""
    cause = exc.__cause__ or exc.__context__
    transient = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
    return isinstance(cause, transient) or "occurred while watching" in str(exc)
