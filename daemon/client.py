"""What feeders and strategies import: `BarPublisher` writes bars, `PredictionReader` reads
predictions, both with the stream naming and partition routing of CONTRACT sections 4 and 9.

Both take an existing `redis.asyncio` client (plain or cluster) and never block forever.
Redis errors (`redis.exceptions.ConnectionError`, `TimeoutError`: a restart, a dropped
connection) propagate from `publish`, `publish_many`, `read` and `ack`; nothing is retried
here. Call again: a reader keeps its position (a group reader takes the entries a lost
reply delivered from its pending list), and `publish_many` says what was written.

Give the client a `socket_timeout` longer than the reads' `block_ms` (a second by default),
or none: a blocking read waits that long for data, and a client that gives up sooner turns
every idle read into a `TimeoutError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import ResponseError

from daemon.entries import as_str, id_key
from daemon.partitions import partition_for_symbol, partition_key
from daemon.wire import Bar, encode_bar
from daemon.wire_events import PredictionEvent, decode_prediction

if TYPE_CHECKING:  # the settings module loads the model side: a strategy need not
    from daemon.settings import Settings

__all__ = [
    "Bar",
    "BarPublisher",
    "PredictionEvent",
    "PredictionReader",
    "decode_prediction",
    "encode_bar",
    "stream_keys",
]

log = structlog.get_logger("livepred.client")

PIPELINE_CHUNK = 1000  # XADDs per pipeline round trip
DEFAULT_BLOCK_MS = 1000
LOST_CHECK_EVERY_S = 1.0  # group readers look for entries a lost reply delivered this often


def stream_keys(name: str, partitions: int = 1, cluster: bool = False) -> list[str]:
    """Every key of a stream: `name` alone, or `name:{p}` for each partition (N > 1 or cluster)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1 (got {partitions})")
    if partitions == 1 and not cluster:
        return [name]
    return [partition_key(name, p) for p in range(partitions)]


class BarPublisher:
    """Publishes bars to the input stream: msgpack `data` field, symbol routed to its partition.

    A bar is a `daemon.wire.Bar` or a mapping with symbol, ts, open, high, low, close, volume.
    A bar the daemon would reject raises ValueError (the reason, e.g. `bad_value:close`)
    before anything is sent. Ordering by `ts` per symbol is the feeder's job.

    Send a backfill in `ts` order across symbols (every symbol's bar of one time, then the
    next time), not one symbol's whole history after another's: the daemon's TTL is event
    time, so once one symbol's bars have moved the newest `ts` it has seen forward, another
    symbol's older bars are stale as they come and each restarts that symbol's state.

    `maxlen` trims the input stream (`MAXLEN ~`); None (the default) never trims it. Size it
    for the longest daemon outage: bars trimmed before the daemon read them get no
    prediction (the daemon logs how many when it starts).
    """

    def __init__(
        self,
        redis: Any,
        *,
        stream: str = "bars",
        partitions: int = 1,
        cluster: bool = False,
        maxlen: int | None = None,
    ) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be >= 1 or None (got {maxlen})")
        self.redis = redis
        self.stream = stream
        self.partitions = partitions
        self.cluster = cluster
        self.maxlen = maxlen
        self.keys = stream_keys(stream, partitions, cluster)
        self.partitioned = len(self.keys) > 1 or cluster
        self.published = 0

    @classmethod
    def from_settings(
        cls, redis: Any, settings: Settings, *, input_index: int = 0, maxlen: int | None = None
    ) -> BarPublisher:
        """A publisher for the daemon's `streams.input[input_index]`, partitioned like it."""
        return cls(
            redis,
            stream=settings.streams.input[input_index],
            partitions=settings.streams.partitions,
            cluster=settings.redis.cluster,
            maxlen=maxlen,
        )

    def partition_for(self, symbol: str) -> int | None:
        """The partition `symbol` goes to (None when the stream is not partitioned)."""
        if not self.partitioned:
            return None
        return partition_for_symbol(symbol, self.partitions)

    def stream_for(self, symbol: str) -> str:
        """The stream key a bar of `symbol` is written to (`bars` or `bars:{p}`)."""
        return partition_key(self.stream, self.partition_for(symbol))

    async def publish(self, bar: Bar | Mapping[str, Any]) -> str:
        """XADD one bar; returns its entry id."""
        key = self.stream_for(_symbol_of(bar))
        fields = encode_bar(bar)
        entry_id = await self.redis.xadd(key, fields, **self._trim())
        self.published += 1
        return as_str(entry_id)

    async def publish_many(self, bars: Iterable[Bar | Mapping[str, Any]]) -> list[str]:
        """XADD many bars in pipelined round trips; returns their entry ids in order.

        Every bar is validated and encoded first, in one go: one bad bar raises ValueError
        and nothing is sent. That holds the event loop some 10-20 us a bar (a 100,000-bar
        list: one to two seconds; numpy values take a slower path): send a big backfill in
        slices of a few thousand bars to keep the loop's other tasks responsive.

        Any other error (a dropped connection, a Redis timeout, a cancellation such as
        `asyncio.wait_for`'s) is raised with `sent` set on it: the ids of the first
        `len(sent)` bars, known written. `asyncio.wait_for` and `asyncio.timeout` raise a
        TimeoutError of their own from the CancelledError that carries `sent`: it is then
        `exc.__cause__.sent`. Resend from bar `len(sent)` on. Of the rest, some may have
        been written too: a resent copy is no second prediction (the daemon skips it as a
        duplicate when it is its symbol's newest bar, and dead-letters it as `out_of_order`
        when a newer bar of the symbol is in). A client that retries by itself
        (`redis.asyncio.Redis()` does; `Redis.from_url` does not) may write a round trip
        twice without raising: the same dead letters.
        """
        encoded: list[tuple[str, dict[str, bytes]]] = []
        key_of: dict[str, str] = {}  # symbol -> stream key, routed once per call
        for bar in bars:
            fields = encode_bar(bar)  # a bad symbol raises here: routing takes a good one
            symbol = bar.symbol if isinstance(bar, Bar) else bar["symbol"]
            key = key_of.get(symbol)
            if key is None:
                key = key_of[symbol] = self.stream_for(_symbol_of(bar))
            encoded.append((key, fields))
        ids: list[str] = []
        trim = self._trim()
        try:
            for start in range(0, len(encoded), PIPELINE_CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for key, fields in encoded[start : start + PIPELINE_CHUNK]:
                    pipe.xadd(key, fields, **trim)
                replies = await pipe.execute()
                ids.extend(as_str(r) for r in replies)
                self.published += len(replies)
        except BaseException as exc:  # a cancellation too: some bars may be written
            try:
                exc.sent = ids  # type: ignore[attr-defined]
            except AttributeError:  # an exception type without a __dict__
                pass
            raise
        return ids

    def _trim(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "approximate": True} if self.maxlen else {}


def _plus_one(count: int) -> int:
    """One entry more than handed out (see `_advance`), within Redis's int64 COUNT."""
    return min(count, 2**62) + 1


def _symbol_of(bar: Bar | Mapping[str, Any]) -> str:
    symbol = bar.symbol if isinstance(bar, Bar) else bar.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise ValueError("bad_value:symbol" if symbol is not None else "missing_field:symbol")
    try:
        symbol.encode()
    except UnicodeEncodeError:  # a lone surrogate: not text Redis or msgpack can carry
        raise ValueError("bad_value:symbol") from None
    return symbol


class PredictionReader:
    """Reads prediction events from every output partition, as typed `PredictionEvent`s.

    Plain mode (no `group`): XREAD, resumable. `last_ids` maps a stream key to the id to read
    after ("0" = from the start); keys not given start at `start`: "$" = entries added after
    the first `read` call begins, "0" = the whole retained stream. `.last_ids` holds the
    position after the events handed out so far (by `read`, or one at a time by `async for`):
    pass it to a new reader to resume without gaps or duplicates, as long as the output
    stream still holds the entries after it: a reader that falls behind `streams.output_maxlen`
    (or resumes from an old position) loses the trimmed events; that is logged and counted in
    `.trimmed_past` (looked at with every read, in its round trip; a trim that took only
    entries this reader had read is no loss, and not counted when the reader had seen the
    entry after its position: it reads one entry more than it hands out to know it. A reader
    that had caught up knows no next entry, and a trim of exactly its entries between two of
    its reads, rare, is still counted). When Redis comes back with
    a stream older than the position (a restart from an older snapshot, or without its data:
    entry ids went back), the reader reads that stream again from its start and skips every
    event whose `ts` is not newer than the last one it handed out for that symbol (counted in
    `.repeated`): a restored snapshot repeats nothing, a new bar still comes. For that it
    keeps the newest `ts` handed out per symbol (one int each, for the reader's life).

    Group mode (`group` and `consumer`): XREADGROUP, the group created if missing (at
    `start`). When Redis lost it (a restart without its data), it is created again at the
    last entry this reader read from that stream (at `start` if none), so nothing published
    since Redis came back is skipped. A restarted consumer first gets its own pending
    entries again. With `auto_ack=True` entries are acknowledged as soon as they are read (at
    most once: a fetch, up to `count` entries per partition, 100 with `async for`, is
    acknowledged before its events are handed out, so a crash loses at most that many); with
    False, `ack()` acknowledges the events handed out so far (at least once).

    `read` merges the partitions in entry-id order; `count` applies per partition. An entry
    that is not a valid prediction is skipped (counted in `.skipped`, acked in group mode).
    """

    def __init__(
        self,
        redis: Any,
        *,
        stream: str = "predictions",
        partitions: int = 1,
        cluster: bool = False,
        group: str | None = None,
        consumer: str | None = None,
        last_ids: Mapping[str, str] | None = None,
        start: str = "$",
        auto_ack: bool = True,
    ) -> None:
        if (group is None) != (consumer is None):
            raise ValueError("group and consumer go together: give both or neither")
        if group is not None and last_ids:
            raise ValueError("last_ids is for plain reads; a consumer group keeps its own position")
        if start not in ("$", "0", "0-0"):
            raise ValueError(f"start must be '$' or '0' (got {start!r})")
        if _decodes_responses(redis):
            raise ValueError(
                "the Redis client has decode_responses=True: prediction data is binary msgpack;"
                " use a client without it"
            )
        self.redis = redis
        self.stream = stream
        self.cluster = cluster
        self.group = group
        self.consumer = consumer
        self.auto_ack = auto_ack
        self.start = start
        self.keys = stream_keys(stream, partitions, cluster)
        unknown = sorted(set(last_ids or ()) - set(self.keys))
        if unknown:
            raise ValueError(f"last_ids names streams this reader does not read: {unknown}")
        self.last_ids: dict[str, str] = {k: as_str(v) for k, v in (last_ids or {}).items()}
        self.skipped = 0
        self.trimmed_past = 0  # plain mode: times the stream was found trimmed past us
        self.repeated = 0  # plain mode: events skipped as already handed out (see above)
        self._unacked: dict[str, list[str]] = {}
        self._groups_ready = False
        self._pending_after: dict[str, str] = {}  # group mode: own pending entries re-read
        self._pending_done: set[str] = set()
        self._unsure = False  # group mode: a read failed; entries may be pending unseen
        self._acking: dict[str, list[str]] = {}  # group mode: ids whose XACK is under way
        self._stash: list[tuple[str, str, Any]] = []  # read, their auto-ack failed
        self._lost_checked_at = -LOST_CHECK_EVERY_S
        self._next_ids: dict[str, str] = {}  # plain mode: where the next XREAD starts
        # Plain mode: the entry after _next_ids[key] when it was read (one more is read than
        # handed out), to tell a trim of entries already read from a loss.
        self._following: dict[str, str] = {}
        self._went_back: set[str] = set()  # plain mode: streams found behind the position
        self._last_ts: dict[str, int] = {}  # plain mode: symbol -> newest ts handed out
        self._group_read: dict[str, str] = {}  # group mode: newest entry id read, per stream
        self._buffer: list[tuple[str, str, PredictionEvent | None]] = []  # read, not handed out

    @classmethod
    def from_settings(cls, redis: Any, settings: Settings, **kwargs: Any) -> PredictionReader:
        """A reader of the daemon's `streams.output`, partitioned like it."""
        return cls(
            redis,
            stream=settings.streams.output,
            partitions=settings.streams.partitions,
            cluster=settings.redis.cluster,
            **kwargs,
        )

    async def position(self) -> dict[str, str]:
        """Fix where a plain reader starts, now: with `start="$"`, events published after
        this call are read even if the first `read` comes later (publish, then read, without
        a race). Returns the ids it reads after, per stream (`last_ids`)."""
        if self.group is None:
            await self._resolve_start()
        return dict(self.last_ids)

    # ---- reading ---------------------------------------------------------------------------

    async def read(
        self, count: int = 100, block_ms: int | None = DEFAULT_BLOCK_MS
    ) -> list[PredictionEvent]:
        """Up to `count` events per partition; waits at most `block_ms` (None: not at all)."""
        if count < 1:
            raise ValueError(f"count must be >= 1 (got {count})")
        if block_ms is not None and block_ms < 1:
            # BLOCK 0 would wait forever, and a cancelled forever-read can lose an entry.
            raise ValueError(f"block_ms must be >= 1 or None (got {block_ms})")
        if self._buffer:  # left by an `async for` that stopped: handed out first
            rows, self._buffer = self._buffer, []
        else:
            rows = await self._fetch(count, block_ms)
        events: list[PredictionEvent] = []
        for key, entry_id, event in rows:
            shown = self._hand_out(key, entry_id, event)
            if shown is not None:
                events.append(shown)
        return events

    def __aiter__(self) -> AsyncIterator[PredictionEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PredictionEvent]:
        while True:
            if not self._buffer:
                self._buffer = await self._fetch(100, DEFAULT_BLOCK_MS)
                continue
            key, entry_id, event = self._buffer.pop(0)
            # Counted as handed out before the caller sees it: a position saved (or an
            # ack made) after handling this event includes it, and nothing after it.
            shown = self._hand_out(key, entry_id, event)
            if shown is not None:
                yield shown

    async def _fetch(
        self, count: int, block_ms: int | None
    ) -> list[tuple[str, str, PredictionEvent | None]]:
        if self.group is None:
            rows = await self._read_plain(count, block_ms)
        else:
            rows = await self._read_group(count, block_ms)
        return self._decode(rows)

    def _hand_out(
        self, key: str, entry_id: str, event: PredictionEvent | None
    ) -> PredictionEvent | None:
        """Move the position (or the ack list) past an entry; the event to give the caller,
        None for a malformed entry or a repeat of an event handed out before."""
        if self.group is not None:
            if not self.auto_ack:  # auto_ack: acknowledged when read
                self._unacked.setdefault(key, []).append(entry_id)
            return event
        if id_key(entry_id) > id_key(self.last_ids[key]):
            self.last_ids[key] = entry_id
        if event is None:
            return None
        last_ts = self._last_ts.get(event.symbol)
        if last_ts is not None and event.ts <= last_ts:
            # Normally a symbol's events come in increasing ts; after a stream went back
            # (see _check_trimmed) one that is not newer was handed out before.
            if key in self._went_back:
                self.repeated += 1
                return None
            return event
        self._last_ts[event.symbol] = event.ts
        return event

    async def ack(self) -> int:
        """Acknowledge every entry handed out so far (group mode); returns how many."""
        if self.group is None:
            return 0
        acked = 0
        pending, self._unacked = self._unacked, {}
        self._acking = pending  # still known (not lost) while the XACKs are under way
        try:
            for key in list(pending):
                ids = pending[key]
                if ids:
                    acked += int(await self.redis.xack(key, self.group, *ids))
                del pending[key]
        except BaseException:
            # What was not acknowledged is acknowledged by the next ack() (XACK of an entry
            # already acknowledged is a no-op): none of it is taken for lost meanwhile.
            for key, ids in pending.items():
                self._unacked.setdefault(key, [])[:0] = ids
            self._unsure = True
            raise
        finally:
            self._acking = {}
        return acked

    # ---- plain XREAD -------------------------------------------------------------------------

    async def _read_plain(self, count: int, block_ms: int | None) -> list[tuple[str, str, Any]]:
        await self._resolve_start()
        # Each stream's oldest and newest entries first: whether it was trimmed past, or
        # recreated behind, the position the read starts from.
        ends = await self._per_key(_add_ends)
        if self._check_trimmed(dict(zip(self.keys, ends, strict=True))):
            return []  # a stream was recreated: read again from its start
        if self.cluster:
            # Partitions live in different hash slots: one XREAD per key, all of which must
            # return: blocked in short slices, so data on any partition is returned soon.
            return await read_in_slices(lambda b: self._gather_plain(count, b), block_ms)
        reply = await self.redis.xread(dict(self._next_ids), count=_plus_one(count), block=block_ms)
        return self._advance(stream_rows(reply), count)

    async def _gather_plain(self, count: int, block_ms: int | None) -> list[tuple[str, str, Any]]:
        replies = await asyncio.gather(*(
            self.redis.xread({key: self._next_ids[key]}, count=_plus_one(count), block=block_ms)
            for key in self.keys
        ))
        return self._advance([row for reply in replies for row in stream_rows(reply)], count)

    async def _per_key(self, add: Callable[[Any, str], None]) -> list[list[Any]]:
        """The commands `add` queues for each stream key, in one round trip (one per key in
        cluster mode, where keys live in different slots, gathered); each key's replies."""
        if self.cluster:
            async def one(key: str) -> list[Any]:
                pipe = self.redis.pipeline(transaction=False)
                add(pipe, key)
                return list(await pipe.execute())

            return list(await asyncio.gather(*(one(key) for key in self.keys)))
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys:
            add(pipe, key)
        replies = await pipe.execute()
        per = len(replies) // len(self.keys)
        return [list(replies[i * per : (i + 1) * per]) for i in range(len(self.keys))]

    async def _resolve_start(self) -> None:
        missing = [key for key in self.keys if key not in self.last_ids]
        for key in missing:
            if self.start == "$":
                newest = await self.redis.xrevrange(key, "+", "-", count=1)
                self.last_ids[key] = as_str(newest[0][0]) if newest else "0-0"
            else:
                self.last_ids[key] = "0-0"
        for key in self.keys:
            self._next_ids.setdefault(key, self.last_ids[key])

    def _check_trimmed(self, ends: Mapping[str, Sequence[Any]]) -> bool:
        """Say when the output stream was trimmed past this reader's position (it fell
        behind `streams.output_maxlen`, resumed from an old position, or Redis lost the
        stream): the events in between are gone for it. Counted in `.trimmed_past` (one per
        partition and time), unless the oldest entry left is the one that followed the
        position when it was read: then the trim took only entries read already. A stream
        whose newest entry is older than the position went back (Redis restored an older
        snapshot, or lost its data and its clock is behind): it is read from its start,
        repeats of events handed out skipped (see `_hand_out`); True then."""
        recreated = False
        for key, (first, last) in ends.items():
            position = self._next_ids[key]
            if position in ("0", "0-0"):
                continue
            if last and id_key(as_str(last[0][0])) < id_key(position):
                log.warning("the output stream's entries are older than this reader's"
                            " position (an older snapshot, or Redis lost its data): read"
                            " from its start, events already handed out skipped",
                            stream=key, position=position, newest=as_str(last[0][0]))
                self._next_ids[key] = self.last_ids[key] = "0-0"
                self._following.pop(key, None)
                self._went_back.add(key)
                recreated = True
                continue
            oldest = as_str(first[0][0]) if first else None
            if oldest is not None and id_key(oldest) > id_key(position):
                following = self._following.get(key)
                if following is not None and id_key(oldest) <= id_key(following):
                    continue  # what was trimmed had all been read
                self.trimmed_past += 1
                log.warning(
                    "the output stream was trimmed past this reader's position: the events"
                    " between are lost to it (read faster, or raise streams.output_maxlen)",
                    stream=key, position=position, oldest_left=as_str(first[0][0]),
                )
        return recreated

    def _advance(
        self, rows: Sequence[tuple[str, str, Any]], count: int
    ) -> list[tuple[str, str, Any]]:
        """The first `count` rows of each stream (read with `count + 1`), moving where its next
        read starts; the one after them is not handed out (the next read gets it again), only
        remembered for `_check_trimmed`."""
        per_key: dict[str, list[tuple[str, str, Any]]] = {}
        for row in rows:
            per_key.setdefault(row[0], []).append(row)
        kept: list[tuple[str, str, Any]] = []
        for key, found in per_key.items():
            if len(found) > count:
                self._following[key] = found[count][1]
                found = found[:count]
            else:
                self._following.pop(key, None)  # nothing followed when read
            newest = found[-1][1]
            if id_key(newest) > id_key(self._next_ids[key]):
                self._next_ids[key] = newest
            kept.extend(found)
        return kept

    # ---- consumer group -------------------------------------------------------------------

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for key in self.keys:
            # Again after Redis lost the group: from the last entry read (or where the group
            # stood when first seen), never "$", which would skip what was published between
            # Redis's return and this read (on a quiet partition too).
            start = self._group_read.get(key)
            if start is None:
                start = self.start
                if start == "$":  # the stream's end now, by its id
                    newest = await self.redis.xrevrange(key, count=1)
                    start = as_str(newest[0][0]) if newest else "0-0"
            try:
                await self.redis.xgroup_create(key, self.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                start = await self._group_position(key) or start
            self._group_read.setdefault(key, start)
        self._groups_ready = True

    async def _group_position(self, key: str) -> str | None:
        """The existing group's last delivered id (None when XINFO is not granted)."""
        try:
            groups = await self.redis.xinfo_groups(key)
        except ResponseError:
            return None
        for g in groups:
            if as_str(g.get("name")) == self.group:
                return as_str(g.get("last-delivered-id") or "0-0")
        return None

    async def _read_group(self, count: int, block_ms: int | None) -> list[tuple[str, str, Any]]:
        try:
            rows = await self._read_group_once(count, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the group (a restart without its data): create it again, as the
            # daemon does for its own, after the entries read already, and read on.
            log.warning("consumer group gone: created again after the entries read",
                        group=self.group, read_up_to=dict(self._group_read))
            self._groups_ready = False
            self._pending_after.clear()
            self._pending_done.clear()
            self._unacked.clear()  # their entries went with the group
            try:
                rows = await self._read_group_once(count, block_ms)
            except BaseException:
                self._unsure = True
                raise
        except BaseException:
            # A reply lost (a dropped connection, a timeout, a cancelled call) after Redis
            # delivered entries to this consumer: they are in its pending list, and the next
            # read looks there at once.
            self._unsure = True
            raise
        return rows

    async def _take_lost(self, count: int) -> list[tuple[str, str, Any]]:
        """Entries pending for this consumer that it never handed out: delivered by a read
        whose reply was lost. Looked for after an error (handed out before anything newer)
        and once a second: a client that retries by itself (`Redis()` does, `Redis.from_url`
        does not) sends a lost read again without telling, and those entries then come up
        to a second late, after newer ones (`event.ts` per symbol tells a stale one)."""
        loop = asyncio.get_running_loop()
        if not self._unsure and loop.time() < self._lost_checked_at + LOST_CHECK_EVERY_S:
            return []
        self._unsure, self._lost_checked_at = False, loop.time()
        assert self.group is not None and self.consumer is not None
        known: dict[str, set[str]] = {}
        for key, entry_id, _ in [*self._buffer, *self._stash]:
            known.setdefault(key, set()).add(entry_id)
        for source in (self._unacked, self._acking):
            for key, ids in source.items():
                known.setdefault(key, set()).update(ids)
        group = self.group
        summaries = await self._per_key(lambda pipe, key: pipe.xpending(key, group))
        rows: list[tuple[str, str, Any]] = []
        for key, (summary,) in zip(self.keys, summaries, strict=True):
            mine = sum(
                int(c["pending"]) for c in summary.get("consumers") or ()
                if as_str(c["name"]) == self.consumer
            )
            if mine == 0:
                continue
            pending = await self.redis.xpending_range(
                key, self.group, min="-", max="+", count=mine, consumername=self.consumer,
            )
            lost = [p for p in pending if as_str(p["message_id"]) not in known.get(key, ())]
            if not lost:
                continue
            lost = lost[:count]
            # Only while still idle as seen: one another consumer claimed meanwhile is its own.
            idle_ms = min(int(p["time_since_delivered"]) for p in lost)
            claimed = await self.redis.xclaim(
                key, self.group, self.consumer, idle_ms, [as_str(p["message_id"]) for p in lost]
            )
            got = [(key, as_str(entry_id), fields) for entry_id, fields in claimed]
            log.warning("entries delivered by a read whose reply was lost: handed out now",
                        stream=key, entries=len(got))
            rows.extend(got)
        return rows

    async def _read_group_once(
        self, count: int, block_ms: int | None
    ) -> list[tuple[str, str, Any]]:
        await self._ensure_groups()
        rows, self._stash = self._stash, []  # read before, their acknowledgement failed
        # After a restart, this consumer's own pending entries come first (id "0").
        for key in self.keys:
            if rows:
                break
            if key in self._pending_done:
                continue
            after = self._pending_after.get(key, "0-0")
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {key: after}, count=count
            )
            # An entry deleted since its delivery comes back without fields: it is
            # returned (skipped when decoded) so that it gets acknowledged too.
            found = stream_rows(reply)
            if found:
                self._pending_after[key] = found[-1][1]
                rows.extend(found)
            else:
                self._pending_done.add(key)
        if not rows and len(self._pending_done) == len(self.keys):
            rows = await self._take_lost(count)
        if not rows:
            if self.cluster:
                rows = await read_in_slices(lambda b: self._gather_group(count, b), block_ms)
            else:
                reply = await self.redis.xreadgroup(
                    self.group,
                    self.consumer,
                    dict.fromkeys(self.keys, ">"),
                    count=count,
                    block=block_ms,
                )
                rows = stream_rows(reply)
        for key, entry_id, _ in rows:
            read_up_to = self._group_read.get(key)
            if read_up_to is None or id_key(entry_id) > id_key(read_up_to):
                self._group_read[key] = entry_id
        if self.auto_ack:  # at most once: acknowledged as read
            by_key: dict[str, list[str]] = {}
            for key, entry_id, _ in rows:
                by_key.setdefault(key, []).append(entry_id)
            try:
                for key, ids in by_key.items():
                    await self.redis.xack(key, self.group, *ids)
            except BaseException:
                # Acknowledged or not (a reply lost), they were read: the next read hands
                # them out (and acknowledges them again, a no-op if done).
                self._stash = rows
                raise
        return rows

    async def _gather_group(self, count: int, block_ms: int | None) -> list[tuple[str, str, Any]]:
        replies = await asyncio.gather(
            *(
                self.redis.xreadgroup(
                    self.group, self.consumer, {key: ">"}, count=count, block=block_ms
                )
                for key in self.keys
            )
        )
        return [row for reply in replies for row in stream_rows(reply)]

    # ---- decoding ------------------------------------------------------------------------

    def _decode(
        self, rows: list[tuple[str, str, Any]]
    ) -> list[tuple[str, str, PredictionEvent | None]]:
        """(stream, id, event) in entry-id order; event None for a malformed entry (skipped,
        but handed out: passed by the position, acknowledged in group mode)."""
        if len(self.keys) > 1:
            rows = sorted(rows, key=lambda row: id_key(row[1]))
        out: list[tuple[str, str, PredictionEvent | None]] = []
        for key, entry_id, fields in rows:
            try:
                event: PredictionEvent | None = decode_prediction(fields or {})
            except ValueError as exc:
                event = None
                self.skipped += 1
                log.warning(
                    "skipped a malformed prediction", stream=key, id=entry_id, error=str(exc)
                )
            out.append((key, entry_id, event))
        return out


CLUSTER_SLICE_MS = 50  # cluster reads block at most this long per round (see read_in_slices)


async def read_in_slices(
    read: Callable[[int | None], Awaitable[list[tuple[str, str, Any]]]], block_ms: int | None
) -> list[tuple[str, str, Any]]:
    """`read(None)` (no wait), then `read(slice)` until rows come or `block_ms` has passed:
    a gather of blocking per-partition reads returns only when every one has."""
    rows = await read(None)
    if rows or block_ms is None:
        return rows
    loop = asyncio.get_running_loop()
    deadline = loop.time() + block_ms / 1000
    while not rows:
        left_ms = int((deadline - loop.time()) * 1000)
        if left_ms < 1:
            break
        rows = await read(min(CLUSTER_SLICE_MS, left_ms))
    return rows


def _decodes_responses(redis: Any) -> bool:
    getter = getattr(redis, "get_connection_kwargs", None)  # RedisCluster
    if callable(getter):
        kwargs = getter()
    else:
        kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", None)
    return bool(isinstance(kwargs, dict) and kwargs.get("decode_responses"))


def _add_ends(pipe: Any, key: str) -> None:
    pipe.xrange(key, "-", "+", count=1)
    pipe.xrevrange(key, "+", "-", count=1)


def stream_rows(reply: Any) -> list[tuple[str, str, Any]]:
    """(stream, entry id, fields) from an XREAD/XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[str, str, Any]] = []
    for stream, entries in items:
        if _nested(entries):  # RESP3 replies wrap each stream's entries in one more list
            entries = entries[0]
        name = as_str(stream)
        for entry_id, fields in entries:
            out.append((name, as_str(entry_id), fields))
    return out


def _nested(entries: Any) -> bool:
    if len(entries) != 1 or not isinstance(entries[0], list | tuple):
        return False
    inner = entries[0]
    return not inner or isinstance(inner[0], list | tuple)
