"""One partition's lease (CONTRACT §9): take it, keep it renewed, notice its loss, hand it back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from daemon.redis_faults import UNAVAILABLE
from daemon.streams import StreamIO
from daemon.waits import sleep_unless

log = structlog.get_logger("livepred.lease")


class LeaseLost(Exception):
    """Another instance owns the partition now: stop touching it at once."""


class PartitionLease:
    """The lease key of one partition, as held by this instance's `token`.

    `lost` is set once the lease is known gone (a renewal refused, or none confirmed for a
    whole lease time, or a fenced read or write refused); `handback` once a preferred
    instance asked for the partition while this one stands in for it."""

    def __init__(
        self,
        io: StreamIO,
        *,
        partition: int | None,
        token: str,
        lease_ms: int,
        metrics: Any,
        preferred: bool = True,
    ) -> None:
        self.io = io
        self.partition = partition
        self.token = token
        self.lease_ms = lease_ms
        self.metrics = metrics
        self.preferred = preferred  # False: a stand-in that hands the partition back
        self.lost = asyncio.Event()
        self.handback = asyncio.Event()
        self._free_since: float | None = None
        self._held_at = float("-inf")  # when the lease was last taken or renewed (monotonic)
        self._other_seen_at = float("-inf")  # when another instance was last seen holding it

    def check(self) -> None:
        """Raise LeaseLost if the lease is known gone."""
        if self.lost.is_set():
            raise LeaseLost()

    def refused(self) -> LeaseLost:
        """A fenced read or write was refused: the lease is gone; the error to raise."""
        self._mark_lost()
        return LeaseLost()

    def _mark_lost(self) -> None:
        # Another instance may hold the lease now, or have held it: if the key is then found
        # gone along with the group (Redis lost its data), that instance may be taking it
        # back within its own lease time, and goes first (`try_take`).
        self._other_seen_at = time.monotonic()
        self.lost.set()

    async def try_take(self) -> bool:
        """Preferred: take the lease when free, else ask its holder to hand it back.
        Not preferred (a stand-in): take it only once it has stayed free for a whole lease
        time, so a preferred instance that is starting or restarting gets it first.
        Either: a lease seen held by another instance that is suddenly free along with the
        partition's consumer group means Redis lost its data under a live holder; that
        holder may take its lease again within its lease time and keep its state
        (`reclaim`), so it is given that time first. The same after losing the lease: the
        instance that took it over may be the live holder."""
        holder = await self.io.lease_holder()
        now = time.monotonic()
        if holder is not None and holder != self.token:
            self._free_since = None
            self._other_seen_at = now
            if not self.preferred:
                return False
        elif holder is None:
            vanished = (
                now - self._other_seen_at < self.lease_ms / 1000
                and await self.io.groups_missing()
            )
            if not self.preferred or vanished:
                if self._free_since is None:
                    self._free_since = now
                if now - self._free_since < self.lease_ms / 1000:
                    return False
        started = time.monotonic()
        taken = await self.io.acquire_lease(self.token, self.lease_ms)
        if taken:
            self._held_at = started
            self.metrics.lease_acquired(self.partition)
            self._free_since = None
            self.handback.clear()
        elif self.preferred:
            await self.io.request_handback(self.token, 2 * self.lease_ms)
        return bool(taken)

    async def reclaim(self) -> bool:
        """The lease was refused: if the key is simply gone while our lease had not expired
        yet, Redis lost it (a restart without its data, a failover to a replica that had not
        seen it) and no instance can have served the partition since: take it again and
        keep the partition, its state included (CONTRACT §5). False when another instance
        holds the lease, or when ours may have expired (someone may have served since, and
        a Redis that lost its data cannot tell: the partition's state is rebuilt)."""
        started = time.monotonic()
        if started - self._held_at >= self.lease_ms / 1000:
            return False
        if not await self.io.acquire_lease(self.token, self.lease_ms):
            return False
        self._held_at = started
        log.warning("lease key gone while held (Redis lost it): taken again, state kept",
                    partition=self.partition if self.partition is not None else "-")
        self.metrics.lease_acquired(self.partition)
        return True

    async def release(self) -> None:
        await self.io.release_lease(self.token)

    async def keep_renewed(self, done: asyncio.Event) -> None:
        """Renew every third of the lease time until `done`; set `lost` and return when the
        lease is refused (and not reclaimed). While Redis does not answer, nothing of the
        partition can be read or written (both are fenced by the lease, atomically), so the
        verdict waits for Redis: after an outage longer than the lease the renewal (or the
        first fenced read or write) says whether another instance took the partition."""
        interval_s = self.lease_ms / 3000
        while True:
            await sleep_unless(done, interval_s)
            if done.is_set():
                return
            started = time.monotonic()
            try:
                ok = await self.io.renew_lease(self.token, self.lease_ms)
                if not ok:
                    ok = await self.reclaim()
            except UNAVAILABLE:
                continue  # unknown until Redis answers
            if ok:
                self._held_at = max(self._held_at, started)
                self.metrics.lease_renewed(self.partition)
                if not self.preferred:
                    try:
                        if await self.io.handback_requested():
                            self.handback.set()
                    except UNAVAILABLE:
                        pass
            else:
                self._mark_lost()
                return
