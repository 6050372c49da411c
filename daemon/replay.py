"""`livepred replay`: bars from a CSV/parquet file through the same state and engine, no Redis."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from daemon.bars_file import BarsFile, iter_items
from daemon.pipeline import Pipeline
from daemon.wire import WIRE_VERSION, Bar, Rejection
from handlers.engine import InferenceEngine

CHUNK_ROWS = 512  # the daemon's default batch: replay cuts the file the same way


@dataclass(slots=True)
class ReplayCounts:
    rows: int = 0
    predictions: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> rows
    first_rejected: dict[str, int] = field(default_factory=dict)  # reason -> first row
    resets: int = 0  # a symbol's state started afresh after a gap longer than the TTL
    evicted: int = 0  # symbols dropped as stale (older than the newest bar minus the TTL)
    behind: int = 0  # bars older than the newest bar before them by more than the TTL
    first_behind: int | None = None  # the first such row
    newest_ts: int | None = None


def replay(
    engine: InferenceEngine,
    bars: BarsFile,
    out: TextIO,
    *,
    source: str,
    ttl_s: float,
    with_features: bool = False,
    run_id: str = "",
    progress: Callable[[int], None] | None = None,
) -> ReplayCounts:
    """Write one JSON object per accepted bar; returns counts (rejections by reason, state
    resets and evictions, bars far behind the clock)."""
    pipeline = Pipeline(engine, ttl_s=ttl_s)
    names = engine.input_spec.feature_names
    counts = ReplayCounts()
    ttl_ms = ttl_s * 1000.0
    chunk: list[Bar | Rejection] = []

    def flush() -> None:
        outcome = pipeline.process(chunk)
        first_row = counts.rows - len(chunk)
        for index, reason in outcome.dead:
            counts.rejected[reason] += 1
            counts.first_rejected.setdefault(reason, first_row + index)
        counts.duplicates += len(outcome.duplicates)
        counts.resets += outcome.resets
        counts.evicted += outcome.evicted
        for row, (_, bar, targets) in enumerate(outcome.predictions):
            doc: dict[str, Any] = {
                "v": WIRE_VERSION,
                "symbol": bar.symbol,
                "ts": bar.ts,
                "src": bar.src,
                "run": run_id,
                "lat_us": 0,
                "targets": targets,
            }
            if with_features and outcome.inputs is not None:
                values = outcome.inputs.features[row]
                doc["features"] = {
                    name: (float(v) if math.isfinite(v) else None)
                    for name, v in zip(names, values.tolist(), strict=True)
                }
            out.write(json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n")
        counts.predictions += len(outcome.predictions)
        chunk.clear()

    for part in bars.chunks():
        for item in iter_items(part, source):
            if isinstance(item, Bar):
                newest = counts.newest_ts
                if newest is not None and item.ts < newest - ttl_ms:
                    counts.behind += 1
                    if counts.first_behind is None:
                        counts.first_behind = counts.rows
                counts.newest_ts = item.ts if newest is None else max(newest, item.ts)
            chunk.append(item)
            counts.rows += 1
            if len(chunk) >= CHUNK_ROWS:
                flush()
                if progress is not None:
                    progress(counts.rows)
    if chunk:
        flush()
    if progress is not None:
        progress(counts.rows)
    return counts
