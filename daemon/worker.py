"""One partition's life: stand by for the lease, rebuild state, drain pending, serve new bars."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from enum import StrEnum
from typing import Any

import structlog
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from daemon.batch import BatchReport, run_batch
from daemon.entries import Commit, EntryBatch
from daemon.lease import LeaseLost, PartitionLease
from daemon.overlap import Steps, serve_overlapped
from daemon.pipeline import Pipeline
from daemon.reads import TRANSIENT, PartitionReader
from daemon.rebuild import rebuild_pipeline
from daemon.redis_faults import UNAVAILABLE
from daemon.streams import ALREADY_COMMITTED, LEASE_LOST, StreamIO
from daemon.waits import Backoff, sleep_unless
from handlers.engine import InferenceEngine
from handlers.errors import short_error

log = structlog.get_logger("livepred.worker")

FAILURE_LOG_EVERY_S = 60.0  # a family that fails on every bar: one warning a minute
UNREACHABLE_LOG_EVERY_S = 30.0
UNTRIMMED_HINT_ENTRIES = 200_000  # a rebuild reading more, mostly unused, says to trim
UNTRIMMED_HINT_S = 2.0  # ... and taking longer than this
FAILURE_BACKOFF_CAP_S = 10.0  # a partition that keeps failing retries at least this often
MAX_DELIVERIES = 5  # an entry delivered more often than this is dead-lettered as poison
SINGLE_AFTER_DELIVERIES = 2  # pending entries delivered this often are retried one by one


class Role(StrEnum):
    STARTING = "starting"  # the lease not yet tried
    STANDBY = "standby"
    REBUILDING = "rebuilding"
    ACTIVE = "active"
    STOPPED = "stopped"


class PartitionWorker:
    """Owns one partition while it holds the partition's lease."""

    def __init__(
        self,
        io: StreamIO,
        *,
        partition: int | None,
        engine: Callable[[], InferenceEngine],
        ttl_s: float,
        run_id: Callable[[], str],
        executor: Executor,
        token: str,
        batch: int,
        block_ms: int,
        lease_ms: int,
        warmup_bars: int,
        metrics: Any,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        preferred: bool = True,
    ) -> None:
        self.io = io
        self.partition = partition
        self.engine = engine  # the current engine; replaced on reload by the service
        self.ttl_s = ttl_s
        self.run_id = run_id
        self.executor = executor
        self.lease = PartitionLease(
            io, partition=partition, token=token, lease_ms=lease_ms, metrics=metrics,
            preferred=preferred,
        )
        self.batch = batch
        self.block_ms = block_ms
        self.lease_ms = lease_ms
        self.warmup_bars = warmup_bars
        self.metrics = metrics
        self.clock_us = clock_us
        self.role = Role.STARTING
        # Why the partition last failed, until it makes progress again (a batch published, or
        # its pending entries drained): /healthz reports it, and the backoff keeps growing.
        self.failing: str | None = None
        # Deliveries of an entry whose batch Redis refused to write (an error reply: OOM,
        # READONLY): not the entry's fault, so they do not count towards MAX_DELIVERIES.
        # In memory: a crash's redelivery still counts (the entry may be what crashed).
        self._refused_writes: dict[str, int] = {}
        self._failures_logged_at: dict[tuple[str, str, str], float] = {}
        self._failures_unlogged: dict[tuple[str, str, str], int] = {}
        self.pipeline: Pipeline | None = None
        self.last_progress_s = time.monotonic()
        self._warned_ts = 0  # the newest bar time a far-ahead warning was given for
        self._stop: asyncio.Event | None = None
        self._log = log.bind(partition=partition if partition is not None else "-")
        self.reader = PartitionReader(
            io, self.lease, batch=batch, block_ms=block_ms, metrics=metrics, log=self._log,
            clock_us=clock_us, progressed=self._progressed,
            stopping=lambda: self._stop is not None and self._stop.is_set(),
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        backoff = Backoff(cap_s=FAILURE_BACKOFF_CAP_S)  # errors Redis answers with
        unreachable = Backoff()  # Redis gone: retried every 2 s at most, to be back at once
        unreachable_logged = -UNREACHABLE_LOG_EVERY_S
        # Export the starting role too: a partition that is never won must still show standby.
        self.metrics.role(self.partition, str(self.role))
        try:
            while not stop.is_set():
                try:
                    if not await self.lease.try_take():
                        # Another instance serves it: not ours to report failing, and what
                        # Redis refused us is that instance's to retry.
                        self.failing = None
                        self._refused_writes.clear()
                        self._set_role(Role.STANDBY)
                        await sleep_unless(stop, self.lease_ms / 4000)
                        continue
                    await self._own(stop)
                    if self.lease.handback.is_set() and not stop.is_set():
                        await self._hand_back(stop)
                except LeaseLost:
                    self._log.warning("lease lost: stopped processing this partition")
                    self.metrics.lease_lost(self.partition)
                    self.pipeline = None
                    self._set_role(Role.STANDBY)
                except TRANSIENT as exc:
                    # Waiting for Redis is not a hang: the stall clock (the watchdog) goes
                    # on, whatever the role was (a rebuild or the pending drain cut short).
                    self._progressed()
                    first = self.failing is None
                    delay = self._failed(exc, unreachable)
                    self.metrics.redis_error()
                    # One line when it starts, then one every UNREACHABLE_LOG_EVERY_S.
                    if first or time.monotonic() - unreachable_logged > UNREACHABLE_LOG_EVERY_S:
                        unreachable_logged = time.monotonic()
                        self._log.warning("redis unavailable, retrying", error=short_error(exc),
                                          delay_s=round(delay, 3))
                    await sleep_unless(stop, delay)
                except Exception as exc:
                    # Anything else (a Redis error reply such as OOM or READONLY, a bug in a
                    # batch): a dead worker in a live process would serve nothing and still
                    # look healthy, so log, back off and start over. The batch's entries stay
                    # pending and are retried; one that keeps failing ends as poison after
                    # MAX_DELIVERIES. The same error again is one line, not a traceback.
                    repeated = self.failing == short_error(exc)
                    delay = self._failed(exc, backoff)
                    if isinstance(exc, RedisError):
                        self.metrics.redis_error()
                    self._log.error(
                        "partition failed, restarting it", error=short_error(exc), delay_s=delay,
                        exc_info=not repeated,
                    )
                    self.pipeline = None
                    self._set_role(Role.STANDBY)
                    await sleep_unless(stop, delay)
        finally:
            self._set_role(Role.STOPPED)
            try:
                await asyncio.wait_for(self.lease.release(), timeout=1.0)
            except UNAVAILABLE:
                pass  # the lease expires by itself

    def _failed(self, exc: BaseException, backoff: Backoff) -> float:
        """Note a failure; the delay before the next try grows until progress is made."""
        if self.failing is None:
            backoff.reset()  # it worked since the last failure: start the backoff over
        self.failing = short_error(exc)
        self.metrics.partition_failure(self.partition)
        return backoff.next_s()

    def _set_role(self, role: Role) -> None:
        if role != self.role:
            self._log.info("partition role", role=str(role))
            self.role = role
            self.last_progress_s = time.monotonic()  # the stall clock starts with the role
            self.metrics.role(self.partition, str(role))

    async def _hand_back(self, stop: asyncio.Event) -> None:
        """A preferred instance wants this partition: the batch in hand is published, so
        release the lease and stand by (state is rebuilt if it comes back to us)."""
        await self.lease.release()
        self._log.info("partition handed back to its preferred instance")
        self.metrics.lease_handback(self.partition)
        self.pipeline = None
        self._set_role(Role.STANDBY)
        await sleep_unless(stop, self.lease_ms / 1000)

    async def _own(self, stop: asyncio.Event) -> None:
        self.lease.lost.clear()
        done = asyncio.Event()
        renewer = asyncio.create_task(self.lease.keep_renewed(done))
        try:
            await self.io.ensure_groups()
            for stream, what in (await self.io.unread_entries_gone()).items():
                self._log.warning(
                    "input entries livepred had not read are gone from the stream: those bars"
                    " got no prediction (size the feeder's MAXLEN for the longest outage)",
                    stream=stream, redis_shows=what,
                )
            self._set_role(Role.REBUILDING)
            await self.rebuild()
            claimed = await self.io.claim_all_pending()
            if claimed:
                self._log.info("claimed pending entries of gone consumers", entries=claimed)
            forgotten = await self.io.forget_idle_consumers(idle_ms=self.lease_ms)
            if forgotten:
                self._log.info("deleted idle consumers holding nothing", consumers=forgotten)
            self._set_role(Role.ACTIVE)
            await self._drain_pending(stop)
            await self._serve_new(stop)
        finally:
            # A cancel can be lost inside a Redis call (its timeout racing with it): `done`
            # then ends the renewer at its next turn. Waited for, so the lease is never
            # renewed after this partition is left (and released).
            done.set()
            renewer.cancel()
            await asyncio.wait({renewer})
            if not renewer.cancelled():
                renewer.exception()  # retrieved; a renewer error is not this exit's story

    # ---- state rebuild -------------------------------------------------------------------

    async def rebuild(self) -> None:
        """State from the retained history up to the last acknowledged entry (CONTRACT §5)."""
        started = time.perf_counter()
        pipeline = Pipeline(self.engine(), ttl_s=self.ttl_s)
        read = [0]

        def scanned(entries: int) -> None:
            read[0] += entries

        total = await rebuild_pipeline(
            self.io, pipeline, executor=self.executor, warmup_bars=self.warmup_bars,
            check=self.lease.check, progressed=self._progressed, scanned=scanned,
        )
        self.pipeline = pipeline
        elapsed = time.perf_counter() - started
        self.metrics.rebuild(total, elapsed)
        self._log.info(
            "state rebuilt",
            bars=total,
            symbols=len(pipeline.table),
            entries_read=read[0],
            seconds=round(elapsed, 3),
            bars_per_s=round(total / elapsed) if elapsed > 0 else None,
        )
        if read[0] > UNTRIMMED_HINT_ENTRIES and read[0] > 4 * max(total, 1) and elapsed > UNTRIMMED_HINT_S:
            # Every retained entry is read at a restart; most were of no use to the state.
            self._log.warning(
                "the restart read the input stream's whole retained history, most of it older"
                " than any symbol's state needs: trim the input stream (XADD MAXLEN ~, or"
                " BarPublisher(maxlen=...)) to a few times symbols x state.warmup_bars,"
                " and no shorter than the longest outage to ride out",
                entries_read=read[0], bars_applied=total, seconds=round(elapsed, 1),
            )

    # ---- processing ----------------------------------------------------------------------

    async def _drain_pending(self, stop: asyncio.Event) -> None:
        cursor: dict[str, str] = {}
        while not stop.is_set() and not self.lease.handback.is_set():
            self.lease.check()
            batch = await self._next_pending(cursor, stop)
            if batch is None:
                self._refused_writes.clear()  # nothing of ours is pending: no record holds
                return
            cursor[batch.streams[0]] = batch.ids[-1]
            await self._process(batch, self.clock_us())

    async def _next_pending(
        self, cursor: dict[str, str], stop: asyncio.Event
    ) -> EntryBatch | None:
        """Our next pending entries after `cursor`, None when there are none. Reads only: a
        Redis blip is waited out here, with the state kept (as while serving new entries),
        unless the lease was lost meanwhile."""
        backoff = Backoff()
        while True:
            try:
                # A batch that failed again after a restart is retried one entry at a time
                # (and read one at a time, so only the entry at the head gains deliveries):
                # an entry that keeps failing ends as poison alone, never with its neighbours.
                retried = await self.io.most_deliveries_pending(
                    self.batch, cursor, self._refused_writes
                )
                single = retried >= SINGLE_AFTER_DELIVERIES
                entries = await self.io.read_own_pending(1 if single else self.batch, cursor)
                if not entries:
                    return None
                stream = entries[0].stream
                counts = await self.io.delivery_counts(stream, [e.entry_id for e in entries])
            except TRANSIENT as exc:
                delay = self._retry_delay(exc, backoff, "reading pending entries failed")
                await sleep_unless(stop, delay)
                if stop.is_set():
                    return None
                self.lease.check()
                continue
            batch = EntryBatch.of(entries)
            batch.deliveries = [
                counts.get(i, 1) - self._refused_writes.get(f"{stream}/{i}", 0)
                for i in batch.ids
            ]
            batch.epoch = self.io.group_epoch  # read now: its write is probed as usual
            return batch

    async def _serve_new(self, stop: asyncio.Event) -> None:
        self.reader.start()  # every pending entry of ours is published
        self.failing = None
        steps = Steps(
            read=self.reader.read,
            compute=self._compute,
            publish=self._publish,
            may_read=lambda: not stop.is_set() and not self.lease.handback.is_set(),
            check=self.lease.check,
            progressed=self._progressed,
            flush_first=self._needs_rebuild,  # a rebuild reads history up to the last ack
        )
        await serve_overlapped(steps, per_read=self.batch)

    def _progressed(self) -> None:
        self.last_progress_s = time.monotonic()

    def _retry_delay(self, exc: BaseException, backoff: Backoff, what: str) -> float:
        """A Redis call of the partition in hand failed for want of an answer: LeaseLost if
        the lease went meanwhile, else the wait before the call is made again (said, counted,
        and no stall: waiting on Redis is not a hang)."""
        if self.lease.lost.is_set():
            raise LeaseLost() from exc
        self._progressed()
        delay = backoff.next_s()
        self.metrics.redis_error()
        self._log.warning(f"{what}, retrying", error=short_error(exc), delay_s=round(delay, 3))
        return delay

    async def _process(self, entries: EntryBatch, read_at_us: int) -> None:
        commit, report = await self._compute(entries, read_at_us)
        await self._publish(commit, report, read_at_us)

    def _needs_rebuild(self) -> bool:
        engine = self.engine()
        return self.pipeline is not None and engine is not self.pipeline.engine

    async def _compute(
        self, entries: EntryBatch, read_at_us: int
    ) -> tuple[Commit, BatchReport]:
        assert self.pipeline is not None
        while (engine := self.engine()) is not self.pipeline.engine:
            if self.pipeline.rebind(engine):
                # Between batches: the new models read other inputs, so state is rebuilt
                # from the stream (a pure function of the bars), then this batch runs on it.
                # A reload during the rebuild retires the engine it started with: look again.
                self._log.info("model inputs changed: rebuilding state from the stream")
                self._set_role(Role.REBUILDING)  # not served meanwhile: /readyz, not stalled
                await self.rebuild()
                self._set_role(Role.ACTIVE)
            assert self.pipeline is not None
        loop = asyncio.get_running_loop()
        commit, report = await loop.run_in_executor(
            self.executor,
            _run_batch_job,
            self.pipeline,
            entries,
            self.run_id(),
            read_at_us,
            self.clock_us,
        )
        commit.epoch = entries.epoch
        return commit, report

    async def _publish(self, commit: Commit, report: BatchReport, read_at_us: int) -> None:
        started = time.perf_counter()
        try:
            await asyncio.shield(self._commit(commit))
        except RedisError as exc:
            if not _refused_by_redis(exc):
                raise  # e.g. a script error: it may be the entries', it counts
            for stream, ids in commit.acks.items():
                for entry_id in ids:
                    key = f"{stream}/{entry_id}"
                    self._refused_writes[key] = self._refused_writes.get(key, 0) + 1
            raise
        if self._refused_writes:
            for stream, ids in commit.acks.items():
                for entry_id in ids:
                    self._refused_writes.pop(f"{stream}/{entry_id}", None)
        report.stage_seconds["redis_commit"] = time.perf_counter() - started
        self.last_progress_s = time.monotonic()
        self.failing = None
        self.metrics.batch(self.partition, report, read_at_us, self.clock_us())
        if report.failures:
            self._warn_failures(report.failures)
        if report.evicted:
            self._warn_if_time_jumped(report.evicted)

    def _warn_failures(self, failures: dict[tuple[str, str, str], int]) -> None:
        """Bars a family published no value for, at most one line per family and reason a
        minute (with the count since the last line); the metric counts every one."""
        now = time.monotonic()
        for key, count in failures.items():
            self._failures_unlogged[key] = self._failures_unlogged.get(key, 0) + count
            if now - self._failures_logged_at.get(key, -FAILURE_LOG_EVERY_S) < FAILURE_LOG_EVERY_S:
                continue
            self._failures_logged_at[key] = now
            target, family, reason = key
            self._log.warning("family gave no value for some bars", target=target, family=family,
                              reason=reason, bars=self._failures_unlogged.pop(key))

    def _warn_if_time_jumped(self, evicted: int) -> None:
        """Symbols are evicted by event time (CONTRACT §5): one accepted bar stamped far ahead
        of the clock (a feeder sending ns or a wrong date) makes every other symbol stale. The
        rule stands; this says where the evictions come from, once per such jump."""
        table = self.pipeline.table if self.pipeline is not None else None
        if table is None or table.max_ts_seen <= self._warned_ts:
            return
        ahead_s = table.max_ts_seen / 1000 - self.clock_us() / 1e6
        if ahead_s <= self.ttl_s:
            return  # a new session's first bars evicting yesterday's symbols: as it should be
        self._warned_ts = table.max_ts_seen
        self._log.warning(
            "symbols evicted by a bar stamped far ahead of the clock (ts in ns or s? a wrong"
            " date?): every symbol more than state.symbol_ttl_s behind it restarts",
            newest_ts=table.max_ts_seen, ahead_s=round(ahead_s), evicted=evicted,
        )

    async def _commit(self, commit: Commit) -> None:
        backoff = Backoff()
        while True:
            # A batch read before the group vanished (Redis lost its data, its entries with
            # it): its bars are in the state, so its predictions are published all the same;
            # no pending entry is left to probe (an earlier write of it went with the data).
            probe_first = commit.epoch == self.io.group_epoch
            try:
                result = await self.io.commit(self.lease.token, commit, probe_first=probe_first)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._log.warning("consumer group gone under a batch in hand: recreated,"
                                  " publishing the batch", outputs=len(commit.outputs))
                await self.io.recreate_groups()
                continue
            except TRANSIENT as exc:
                await asyncio.sleep(self._retry_delay(exc, backoff, "commit failed"))
                continue
            if result == LEASE_LOST:
                if await self.lease.reclaim():
                    continue
                raise self.lease.refused()
            if result == ALREADY_COMMITTED:
                self._log.info("batch was already committed before a dropped connection")
            return


# Error replies that say Redis's state refused the write (memory, a replica, permissions, a
# key of another type, a busy script), whatever the entries: their deliveries do not count.
REFUSALS = (OutOfMemoryError, ReadOnlyError, NoPermissionError, BusyLoadingError,
            MasterDownError, TryAgainError, ClusterDownError)
REFUSAL_CODES = ("OOM", "READONLY", "NOREPLICAS", "BUSY", "NOPERM", "WRONGTYPE", "LOADING",
                 "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "MISCONF")


def _refused_by_redis(exc: RedisError) -> bool:
    return isinstance(exc, REFUSALS) or str(exc).lstrip().startswith(REFUSAL_CODES)


def _run_batch_job(
    pipeline: Pipeline, entries: EntryBatch, run_id: str, read_at_us: int, clock_us: Any
) -> tuple[Commit, BatchReport]:
    return run_batch(
        pipeline,
        entries,
        run_id=run_id,
        read_at_us=read_at_us,
        now_us=clock_us,
        max_deliveries=MAX_DELIVERIES,
    )
