"""`livepred replay`: bars from a CSV/parquet file through the same state and engine, no Redis."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgpack
import pandas as pd

from daemon.pipeline import Pipeline
from daemon.wire import WIRE_VERSION, Bar, Rejection, decode_bar
from handlers.engine import InferenceEngine

BAR_COLUMNS = ("symbol", "ts", "open", "high", "low", "close", "volume")
CHUNK_ROWS = 512  # the daemon's default batch: replay cuts the file the same way
TEXT_CELLS = "livepred_text_cells"  # frame.attrs flag: every cell is the file's own text


class BarsFileError(ValueError):
    """The bars file is missing, unreadable or lacks a column (message names which)."""


def read_bars(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise BarsFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Every cell as text, checked one by one like the flat fields of a stream entry
            # (`XADD bars * symbol AAPL ts ... close 101.5`): one bad cell rejects its row,
            # not its whole column.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            frame.attrs[TEXT_CELLS] = True
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise BarsFileError(f"{path}: expected a .csv or .parquet file")
    except BarsFileError:
        raise
    except Exception as exc:
        raise BarsFileError(f"{path}: cannot read: {exc}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in BAR_COLUMNS if c not in frame.columns]
    if missing:
        raise BarsFileError(f"{path}: missing column(s) {', '.join(missing)}")
    if pd.api.types.is_datetime64_any_dtype(frame["ts"]):
        frame["ts"] = epoch_ms(frame["ts"])
    return frame


def epoch_ms(stamps: pd.Series) -> pd.Series:
    """A datetime column (a training set's usual bar time; naive = UTC) as epoch
    milliseconds: int64, or float with NaN where a time is missing (that row is rejected)."""
    if stamps.dt.tz is None:
        stamps = stamps.dt.tz_localize("UTC")
    ms = (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")
    return ms.astype("int64") if not ms.isna().any() else ms.astype("float64")


def iter_items(frame: pd.DataFrame, source: str) -> Iterator[Bar | Rejection]:
    """Each row validated by the same rules as a stream entry (CONTRACT §4): a text file's
    cells as flat fields (decimal strings), a typed file's values as a msgpack map."""
    columns = [frame[c].tolist() for c in BAR_COLUMNS]
    keys = [c.encode() for c in BAR_COLUMNS]
    text = bool(frame.attrs.get(TEXT_CELLS))
    for index, row in enumerate(zip(*columns, strict=True)):
        if text:
            flat = {
                key: value.encode("utf-8", "surrogateescape")
                for key, value in zip(keys, row, strict=True)
                if value != "" or key == b"symbol"
            }
            yield decode_bar(flat, source, str(index))
            continue
        values = {}
        for name, value in zip(BAR_COLUMNS, row, strict=True):
            if isinstance(value, float) and math.isnan(value) and name == "symbol":
                continue
            values[name] = value.item() if hasattr(value, "item") else value
        fields = {b"data": msgpack.packb(values, use_bin_type=True)}
        yield decode_bar(fields, source, str(index))


@dataclass(slots=True)
class ReplayCounts:
    rows: int = 0
    predictions: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> rows
    first_rejected: dict[str, int] = field(default_factory=dict)  # reason -> first row


def replay(
    engine: InferenceEngine,
    frame: pd.DataFrame,
    out: TextIO,
    *,
    source: str,
    ttl_s: float,
    with_features: bool = False,
    run_id: str = "",
    progress: Callable[[int], None] | None = None,
) -> ReplayCounts:
    """Write one JSON object per accepted bar; returns counts (rejections by reason)."""
    pipeline = Pipeline(engine, ttl_s=ttl_s)
    names = engine.input_spec.feature_names
    counts = ReplayCounts()
    chunk: list[Bar | Rejection] = []

    def flush() -> None:
        outcome = pipeline.process(chunk)
        first_row = counts.rows - len(chunk)
        for index, reason in outcome.dead:
            counts.rejected[reason] += 1
            counts.first_rejected.setdefault(reason, first_row + index)
        counts.duplicates += len(outcome.duplicates)
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

    for item in iter_items(frame, source):
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
