"""CPU work of one batch, run in the executor: decode -> pipeline -> encode. No I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.entries import Commit, Entry, EntryBatch
from daemon.pipeline import Pipeline
from daemon.wire import Rejection, dead_letter_fields
from daemon.wire_columns import BarColumns, decode_columns, field_map
from daemon.wire_pack import pack_predictions

POISON = "max_deliveries"


@dataclass(slots=True)
class BatchReport:
    """What a batch did, for metrics and logs."""

    bars: int = 0
    predictions: int = 0
    duplicates: int = 0
    dead_reasons: list[str] = field(default_factory=list)
    family_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # CPU time of the computing thread over the batch (all stages)
    resets: int = 0
    evicted: int = 0
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)  # BatchResult's


def decode_batch(entries: EntryBatch, max_deliveries: int = 0) -> BarColumns:
    """Every entry decoded; one delivered more than `max_deliveries` times is poison."""
    refuse = None
    if max_deliveries and entries.deliveries:
        refuse = {i: POISON for i, n in enumerate(entries.deliveries) if n > max_deliveries}
    return decode_columns(entries.fields, entries.streams, entries.ids, refuse)


def run_batch(
    pipeline: Pipeline,
    entries: EntryBatch | Sequence[Entry],
    *,
    run_id: str,
    read_at_us: int,
    now_us: object,
    max_deliveries: int = 0,
) -> tuple[Commit, BatchReport]:
    """Decode, predict and encode one batch; every entry ends as one output or dead letter
    (or a skipped duplicate), and every entry is acked."""
    import time

    batch = entries if isinstance(entries, EntryBatch) else EntryBatch.of(entries)
    clock = now_us if callable(now_us) else (lambda: time.time_ns() // 1000)
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    cols = decode_batch(batch, max_deliveries)
    t1 = time.perf_counter()
    outcome = pipeline.run(cols)
    t2 = time.perf_counter()
    commit = Commit(outputs=[], dead=[], acks=batch.acks())
    report = BatchReport(bars=len(batch), duplicates=len(outcome.duplicates))
    dead: list[tuple[int, Rejection]] = list(cols.rejected)
    for j, reason in outcome.rejected:
        i = cols.positions[j]
        dead.append(
            (i, Rejection(reason, field_map(batch.fields[i]), batch.streams[i],
                          batch.ids[i]))
        )
    dead.sort(key=lambda d: d[0])
    for _, rejection in dead:
        commit.dead.append(dead_letter_fields(rejection))
        report.dead_reasons.append(rejection.reason)
    lat_us = max(0, int(clock()) - read_at_us)  # type: ignore[operator]
    rows = outcome.accepted
    if rows:
        if len(rows) == len(cols):  # every valid bar accepted (the usual batch): as they are
            positions, symbols, ts = cols.positions, cols.symbols, cols.ts.tolist()
        else:
            positions = [cols.positions[j] for j in rows]
            symbols = [cols.symbols[j] for j in rows]
            ts = cols.ts[np.asarray(rows, dtype=np.int64)].tolist()
        streams, ids = batch.streams, batch.ids
        srcs = [f"{streams[i]}/{ids[i]}" for i in positions]
        data = pack_predictions(symbols, ts, srcs, run_id, lat_us, outcome.result)
        encoded = {s: s.encode() for s in set(symbols)}  # each symbol once per batch
        commit.outputs = [(encoded[s], d) for s, d in zip(symbols, data, strict=True)]
    t3 = time.perf_counter()
    report.predictions = len(commit.outputs)
    report.resets, report.evicted = outcome.resets, outcome.evicted
    if outcome.result is not None:
        report.family_seconds = outcome.result.family_seconds
        report.failures = outcome.result.failures
    report.stage_seconds = {"decode": t1 - t0, "state+models": t2 - t1, "encode": t3 - t2}
    report.cpu_seconds = time.thread_time() - cpu0
    return commit, report


@dataclass(slots=True)
class HistoryChunk:
    """What a rebuild keeps of one chunk of history read newest first: the kept bars (newest
    first), for each the newest ts among the chunk's older bars (0: none), and the chunk's
    newest ts. The clock of the replay comes from these (`oldest_first`)."""

    cols: BarColumns
    older_max: np.ndarray  # (len(cols),) int64
    top: int


def select_recent(
    ids: Sequence[str], fields: Sequence[Any], stream: str, per_symbol: dict[str, list[int]],
    limit: int,
) -> HistoryChunk:
    """Decode history entries given newest first, keeping each symbol's newest `limit` bars
    that the live run accepted, and the bars that decide which those are (newest first).
    `per_symbol` carries each symbol's kept accepted ts from one chunk to the next.

    Read newest first, a bar is accepted if no older bar of its symbol has a ts as high: a
    symbol's kept accepted bars form a stack whose top is the oldest, with the lowest ts. An
    older bar with a ts at least that high turns them into what the live run rejected
    (out of order, duplicates; the replay rejects them again after it) and is kept in their
    place, so a run of rejected bars after one far-future bar does not push that bar, and the
    bars accepted before it, out of the window. An older bar below the top is kept while its
    symbol has fewer than `limit`; past that it cannot change any kept bar's verdict. (An
    eviction can make the live run accept an older bar again; this counts it as rejected and
    keeps more history, which the replay then judges by the live rules.) Each symbol's stack
    holds at most `limit` ts; the rows kept are more than `limit` only by the rejected bars
    among them, at most the retained stream.

    Evictions depend on every symbol's bars (the newest ts seen), dropped ones included: the
    chunk also gives, for each kept bar, the newest ts among the older bars of the chunk."""
    cols = decode_columns(fields, stream, ids)
    keep: list[int] = []
    get = per_symbol.get
    for j, (symbol, t) in enumerate(zip(cols.symbols, cols.ts.tolist(), strict=True)):
        stack = get(symbol)
        if stack is None:
            per_symbol[symbol] = [t]
        elif t < stack[-1]:
            if len(stack) >= limit:
                continue
            stack.append(t)
        else:
            while stack and stack[-1] <= t:
                stack.pop()
            stack.append(t)
        keep.append(j)
    n = len(cols)
    older = np.zeros(n, dtype=np.int64)  # newest ts among the rows after j (older ones)
    if n > 1:
        older[:-1] = np.maximum.accumulate(cols.ts[::-1])[::-1][1:]
    top = int(cols.ts.max()) if n else 0
    if len(keep) == n:
        return HistoryChunk(cols, older, top)
    return HistoryChunk(cols.take(keep), older[keep], top)


def drop_stale_symbols(
    chunks: list[HistoryChunk], per_symbol: dict[str, list[int]], ttl_ms: int
) -> list[HistoryChunk]:
    """The chunks without the bars of the symbols stale at the end of the history: a symbol
    whose newest ts (the bottom of its stack: the highest ts of all its bars, at least the
    live run's last accepted one) is older than the newest ts minus the TTL had been evicted
    by the live run, and its next bar starts afresh either way. Their bars still count in the
    clock (each chunk's `older_max` and `top` are of all its bars). Under churn most of a long
    stream is such symbols' bars."""
    if not chunks:
        return chunks
    horizon = max(c.top for c in chunks) - ttl_ms
    stale = {symbol for symbol, stack in per_symbol.items() if stack[0] < horizon}
    if not stale:
        return chunks
    out = []
    for c in chunks:
        keep = [j for j, symbol in enumerate(c.cols.symbols) if symbol not in stale]
        if len(keep) == len(c.cols):
            out.append(c)
        else:
            out.append(HistoryChunk(c.cols.take(keep), c.older_max[keep], c.top))
    return out


def oldest_first(chunks: Sequence[HistoryChunk]) -> tuple[BarColumns, np.ndarray]:
    """Chunks of history read newest first (each newest first) as one block, oldest first,
    and the replay's clock: for each bar, the newest ts of every bar before it in the stream,
    kept or not (the newest ts the live run had seen then)."""
    if not chunks:
        return BarColumns.empty(), np.zeros(0, dtype=np.int64)
    symbols: list[str] = []
    clocks: list[np.ndarray] = []
    before = 0  # the newest ts of the chunks older than this one
    for c in reversed(chunks):
        symbols.extend(reversed(c.cols.symbols))
        clocks.append(np.maximum(c.older_max[::-1], before))
        before = max(before, c.top)
    ts = np.concatenate([c.cols.ts[::-1] for c in reversed(chunks)])
    ohlcv = np.concatenate([c.cols.ohlcv[::-1] for c in reversed(chunks)])
    return BarColumns(list(range(len(symbols))), symbols, ts, ohlcv), np.concatenate(clocks)


def warm_from_columns(
    pipeline: Pipeline, cols: BarColumns, clock: np.ndarray | None = None
) -> int:
    """Apply decoded historical bars (oldest first) to state without predicting."""
    pipeline.run(cols, predict=False, clock=clock)
    return len(cols)
