"""State rebuilt from a stream's retained history (CONTRACT section 5): the scan, not the math.

The history is read newest first in chunks; each chunk is decoded in the executor while the
next is fetched, keeping each symbol's newest `warmup_bars` accepted bars (`select_recent`)
of the symbols not stale at its end (`drop_stale_symbols`); then it is applied to a fresh `Pipeline` oldest first, without predicting, on the live run's
clock (the newest ts it had seen before each bar, from every bar of the history).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from daemon.batch import (
    BarColumns,
    HistoryChunk,
    drop_stale_symbols,
    oldest_first,
    select_recent,
    warm_from_columns,
)
from daemon.pipeline import Pipeline
from daemon.streams import StreamIO

REBUILD_CHUNK = 50_000  # history bars applied to state per executor call


async def rebuild_pipeline(
    io: StreamIO,
    pipeline: Pipeline,
    *,
    executor: Executor,
    warmup_bars: int,
    check: Callable[[], None] = lambda: None,
    progressed: Callable[[], None] = lambda: None,
    scanned: Callable[[int], None] = lambda entries: None,
) -> int:
    """Apply every input stream's history up to its last acknowledged entry to `pipeline`;
    returns the bars applied. `check` runs after each chunk read (it raises to give up);
    `progressed` after each chunk read or applied (the worker's stall clock); `scanned` with
    each chunk's number of entries read (the whole retained history is: an older entry can
    still move the live run's clock or hold a symbol's bars)."""
    loop = asyncio.get_running_loop()
    total = 0
    for stream in io.inputs:
        boundary = await io.history_boundary(stream)
        if boundary is None:
            continue
        kept: list[HistoryChunk] = []
        per_symbol: dict[str, list[int]] = {}
        decoding: asyncio.Future[HistoryChunk] | None = None
        async for ids, fields in io.scan_history_backwards(stream, boundary):
            if decoding is not None:
                kept.append(await decoding)
            decoding = loop.run_in_executor(
                executor, select_recent, ids, fields, stream, per_symbol, warmup_bars
            )
            check()
            progressed()
            scanned(len(ids))
        if decoding is not None:
            kept.append(await decoding)
        # Off the event loop (the heartbeat, /healthz): a long history takes a while to order.
        history, clock = await loop.run_in_executor(
            executor, _ordered, kept, per_symbol, pipeline.table.ttl_ms, len(io.inputs) == 1
        )
        del kept
        for i in range(0, len(history), REBUILD_CHUNK):
            total += await loop.run_in_executor(
                executor, warm_from_columns, pipeline, history.window(i, i + REBUILD_CHUNK),
                clock[i : i + REBUILD_CHUNK],
            )
            progressed()
    return total


def _ordered(
    kept: list[HistoryChunk], per_symbol: dict[str, list[int]], ttl_ms: int, one_input: bool
) -> tuple[BarColumns, np.ndarray]:
    """The kept chunks oldest first, with the live run's clock; symbols stale at the end of
    the history left out when it is one input stream's (several are replayed one after the
    other)."""
    if one_input:
        kept = drop_stale_symbols(kept, per_symbol, ttl_ms)
    return oldest_first(kept)
