"""CPU work of one batch, run in the executor: decode -> pipeline -> encode. No I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daemon.pipeline import Pipeline
from daemon.streams import Commit, Entry
from daemon.wire import WIRE_VERSION, Bar, Rejection, dead_letter_fields, decode_bar

POISON = "max_deliveries"


def pack_prediction(
    symbol: str, ts: int, src: str, run: str, lat_us: int, targets: dict[str, Any],
    packer: msgpack.Packer | None = None,
) -> bytes:
    """The `data` field of CONTRACT §4 from plain values (the engine's rows are already plain
    Python floats/ints/str, so this skips the dataclass round trip on the hot path).
    `packer`: one reused for a whole batch (building a Packer per call costs ~40% of it)."""
    doc = {"v": WIRE_VERSION, "symbol": symbol, "ts": ts, "src": src, "run": run,
           "lat_us": lat_us, "targets": targets}
    if packer is None:
        return msgpack.packb(doc, use_bin_type=True)
    return packer.pack(doc)


@dataclass(slots=True)
class BatchReport:
    """What a batch did, for metrics and logs."""

    bars: int = 0
    predictions: int = 0
    duplicates: int = 0
    dead_reasons: list[str] = field(default_factory=list)
    family_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resets: int = 0
    evicted: int = 0


def decode_entries(entries: Sequence[Entry], max_deliveries: int = 0) -> list[Bar | Rejection]:
    items: list[Bar | Rejection] = []
    for e in entries:
        if max_deliveries and e.deliveries > max_deliveries:
            items.append(Rejection(POISON, dict(e.fields), e.stream, e.entry_id))
        else:
            items.append(decode_bar(e.fields, e.stream, e.entry_id))
    return items


def run_batch(
    pipeline: Pipeline,
    entries: Sequence[Entry],
    *,
    run_id: str,
    read_at_us: int,
    now_us: object,
    max_deliveries: int = 0,
) -> tuple[Commit, BatchReport]:
    """Decode, predict and encode one batch; every entry ends as one output or dead letter
    (or a skipped duplicate), and every entry is acked."""
    import time

    clock = now_us if callable(now_us) else (lambda: time.time_ns() // 1000)
    t0 = time.perf_counter()
    items = decode_entries(entries, max_deliveries)
    t1 = time.perf_counter()
    outcome = pipeline.process(items)
    t2 = time.perf_counter()
    commit = Commit(outputs=[], dead=[], acks={})
    for e in entries:
        commit.acks.setdefault(e.stream, []).append(e.entry_id)
    report = BatchReport(bars=len(entries), duplicates=len(outcome.duplicates))
    for index, reason in outcome.dead:
        item = items[index]
        entry = entries[index]
        rejection = (
            item
            if isinstance(item, Rejection)
            else Rejection(reason, dict(entry.fields), entry.stream, entry.entry_id)
        )
        commit.dead.append(dead_letter_fields(rejection))
        report.dead_reasons.append(rejection.reason)
    lat_us = max(0, int(clock()) - read_at_us)  # type: ignore[operator]
    packer = msgpack.Packer(use_bin_type=True)  # per batch: batches may run in several threads
    for _, bar, targets in outcome.predictions:
        commit.outputs.append(
            (
                bar.symbol.encode(),
                pack_prediction(bar.symbol, bar.ts, bar.src, run_id, lat_us, targets, packer),
            )
        )
    t3 = time.perf_counter()
    report.predictions = len(commit.outputs)
    report.resets, report.evicted = outcome.resets, outcome.evicted
    if outcome.result is not None:
        report.family_seconds = outcome.result.family_seconds
    report.stage_seconds = {"decode": t1 - t0, "state+models": t2 - t1, "encode": t3 - t2}
    return commit, report


def select_recent(
    rows: Sequence[tuple[str, Any]], stream: str, per_symbol: dict[str, int], limit: int
) -> list[Bar]:
    """Decode history rows given newest first, keeping each symbol's newest `limit` valid bars
    (newest first). `per_symbol` carries the counts from one chunk of rows to the next."""
    kept: list[Bar] = []
    for entry_id, fields in rows:
        item = decode_bar(fields, stream, entry_id)
        if type(item) is not Bar:
            continue
        seen = per_symbol.get(item.symbol, 0)
        if seen < limit:
            per_symbol[item.symbol] = seen + 1
            kept.append(item)
    return kept


def warm_from_bars(pipeline: Pipeline, bars: Sequence[Bar]) -> int:
    """Apply decoded historical bars (oldest first) to state without predicting."""
    pipeline.process(bars, predict=False)
    return len(bars)
