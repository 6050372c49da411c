"""New bars served with reads, computes and writes overlapped, the writes in read order.

The loop only schedules: what a read, a compute or a write does is the caller's (the
partition worker's). Reads go on while a batch computes, and a batch computes while the
previous one's atomic write is in flight (Redis works on its own core). What is read while
a batch computes is computed next as one batch (up to `max_reads` reads): under load,
batches grow and fixed per-call costs shrink per bar; at light load a bar is computed as
soon as it is read. One write at a time, in read order.
"""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from daemon.batch import BatchReport
from daemon.entries import Commit, EntryBatch

COALESCE_READS = 8  # reads made while a batch computes are computed next as one batch

Read = Callable[[], Coroutine[Any, Any, tuple[EntryBatch, int]]]  # (entries, read at, us)
Compute = Callable[[EntryBatch, int], Coroutine[Any, Any, tuple[Commit, BatchReport]]]
Publish = Callable[[Commit, BatchReport, int], Coroutine[Any, Any, None]]


@dataclass(slots=True)
class Steps:
    read: Read
    compute: Compute
    publish: Publish
    may_read: Callable[[], bool]  # False once stopping: the loop ends when all is written
    check: Callable[[], None]  # raises when the partition must be left at once
    progressed: Callable[[], None]  # a read came back (the service's stall watch)
    flush_first: Callable[[], bool]  # the write in flight must land before the next compute


async def serve_overlapped(
    steps: Steps, *, per_read: int, max_reads: int = COALESCE_READS
) -> None:
    """Serve until `may_read` turns False; raises what a step raises, after the compute in
    hand has finished and the write in flight has landed or failed (never cancelled)."""
    reading: asyncio.Task[tuple[EntryBatch, int]] | None = None
    ready: list[tuple[EntryBatch, int]] = []  # read, not computed yet (read time each)
    committing: asyncio.Task[None] | None = None
    cap = per_read * max_reads

    def start_read() -> asyncio.Task[tuple[EntryBatch, int]]:
        return asyncio.create_task(steps.read())

    def take(read: asyncio.Task[tuple[EntryBatch, int]]) -> EntryBatch:
        entries, at = read.result()
        steps.progressed()
        if entries:
            ready.append((entries, at))
        return entries

    try:
        while True:
            steps.check()
            if not ready:
                if reading is None:
                    if not steps.may_read():
                        break
                    reading = start_read()
                if committing is not None:
                    # A write that fails is raised now, not when the next bar arrives (at a
                    # market's quiet end that could be never).
                    await asyncio.wait({reading, committing}, return_when=FIRST_COMPLETED)
                    if committing.done():
                        landed, committing = committing, None
                        landed.result()
                    if not reading.done():
                        continue
                await reading
                take(reading)
                reading = None
                continue
            batch = EntryBatch.join([entries for entries, _ in ready])
            read_at = ready[0][1]
            ready = []
            if reading is None and steps.may_read():
                reading = start_read()
            if committing is not None and steps.flush_first():
                await committing  # e.g. a rebuild reads history up to the last ack
            computing = asyncio.ensure_future(steps.compute(batch, read_at))
            try:
                while reading is not None and not computing.done():
                    await asyncio.wait({computing, reading}, return_when=FIRST_COMPLETED)
                    if not reading.done():
                        continue
                    entries = take(reading)
                    reading = None
                    # A full read: more is waiting, read on. A short one: the stream is
                    # drained, so the next read waits for this batch (one read per batch
                    # at light load, not one per arriving bar: each read costs this
                    # process and Redis CPU that the models need).
                    if (
                        len(entries) >= per_read
                        and steps.may_read()
                        and sum(len(e) for e, _ in ready) < cap
                    ):
                        reading = start_read()
            except BaseException:
                # A read failed (the lease is gone, ...): the batch in hand is left
                # unpublished, but not running behind our back.
                await asyncio.wait({computing})
                if not computing.cancelled():
                    computing.exception()  # retrieved: its error is not the story
                raise
            commit, report = await computing
            if committing is not None:
                await committing
            committing = asyncio.create_task(steps.publish(commit, report, read_at))
        if committing is not None:
            await committing
            committing = None
    finally:
        if reading is not None:
            # Never cancel a read mid-flight (an entry could be delivered and forgotten):
            # what it returns stays pending and is handled on the next start.
            try:
                await reading
            except Exception:
                pass
        if committing is not None:
            # Leaving on an error: the write in flight completes (or fails) on its own;
            # what it did not ack stays pending.
            try:
                await asyncio.shield(committing)
            except BaseException:
                pass
