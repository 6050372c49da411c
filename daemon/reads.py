"""Reading one partition's new entries, in order, through outages and lost replies.

A read is fenced by the lease (daemon.streams). When the connection dies around a read,
Redis may have run it: the entries are then delivered to this consumer (pending) while their
reply is lost. They are taken next, from this consumer's pending list after the last entry
taken, before anything newer, so each symbol's bars reach the state in stream order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from daemon.entries import EntryBatch
from daemon.lease import PartitionLease
from daemon.streams import StreamIO
from daemon.waits import Backoff
from handlers.errors import short_error

# No answer: a dropped connection, a time-out, or a cluster none of whose nodes answers (the
# cluster client's RedisClusterException is not a RedisError).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, RedisClusterException, ConnectionError,
             OSError)


class PartitionReader:
    """New entries for the lease holder, `batch` at most per read, waiting `block_ms`."""

    def __init__(
        self,
        io: StreamIO,
        lease: PartitionLease,
        *,
        batch: int,
        block_ms: int,
        metrics: Any,
        log: Any,
        clock_us: Callable[[], int],
        progressed: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.io, self.lease = io, lease
        self.batch, self.block_ms = batch, block_ms
        self.metrics, self._log, self.clock_us = metrics, log, clock_us
        self.progressed, self.stopping = progressed, stopping
        # The last entry id taken per input stream since `start`, and whether a read failed
        # in a way that may have delivered entries whose reply never came back.
        self._taken: dict[str, str] = {}
        self._unsure = False

    def start(self) -> None:
        """Serving new entries begins: every pending entry of ours has been published."""
        self._taken, self._unsure = {}, False

    async def read(self) -> tuple[EntryBatch, int]:
        """The next entries and the time they were read (us); retried through outages."""
        backoff = Backoff()
        while True:
            try:
                if self._unsure:
                    lost = await self._read_lost()
                    if lost is not None:
                        return lost
                epoch = self.io.group_epoch
                read = await self._read_new()
                read[0].epoch = epoch
                self._took(read[0])
                return read
            except TRANSIENT as exc:
                # Redis may have delivered entries to us before the connection died (the
                # read ran, its reply was lost): they are ours, pending, and come next.
                self._unsure = True
                # Keep state through an outage; the lease decides if we lost the partition.
                self.lease.check()
                if self.stopping():
                    return EntryBatch(), self.clock_us()  # shutting down: nothing was read
                self.progressed()  # waiting on Redis, not hung
                delay = backoff.next_s()
                self.metrics.redis_error()
                self._log.warning("read failed, retrying", error=short_error(exc), delay_s=delay)
                await asyncio.sleep(delay)

    async def _read_lost(self) -> tuple[EntryBatch, int] | None:
        """Our pending entries after the last one taken: what a read whose reply was lost
        delivered. None once there are none (the next read asks for new entries again)."""
        self.lease.check()
        try:
            entries = await self.io.read_own_pending(self.batch, self._taken)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            entries = []  # Redis lost the group too: nothing of ours is pending any more
        if not entries:
            self._unsure = False
            return None
        self._log.warning(
            "entries delivered by a read whose reply was lost: taken now", entries=len(entries)
        )
        batch = EntryBatch.of(entries)
        batch.deliveries = None  # delivered twice by now; the poison count is for failures
        batch.epoch = self.io.group_epoch
        self._took(batch)
        return batch, self.clock_us()

    def _took(self, batch: EntryBatch) -> None:
        for stream, ids in batch.acks().items():
            self._taken[stream] = ids[-1]

    async def _read_new(self) -> tuple[EntryBatch, int]:
        try:
            entries = await self.io.read_new(self.lease.token, self.batch, self.block_ms)
            if entries is None and await self.lease.reclaim():
                entries = await self.io.read_new(self.lease.token, self.batch, self.block_ms)
        except ResponseError as exc:
            # (The NOGROUP error text differs between servers when raised inside a script.)
            if "NOGROUP" not in str(exc) and not await self.io.groups_missing():
                raise
            # The stream or group vanished (Redis restarted without persistence, or a
            # manual delete): recreate it and carry on from now.
            self._log.warning("consumer group missing, recreating", error=str(exc))
            await self.io.recreate_groups()
            self._taken = {}
            return EntryBatch(), self.clock_us()
        if entries is None:
            # Fenced: another instance holds the lease, and nothing was delivered to us.
            raise self.lease.refused()
        return entries, self.clock_us()
