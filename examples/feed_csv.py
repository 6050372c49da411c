"""Feed bars from a CSV or Parquet file to livepred's input stream (a minimal feeder).

    python examples/feed_csv.py bars.csv --redis-url redis://127.0.0.1:6379/0
    python examples/feed_csv.py bars.parquet --partitions 4 --speed 60   # 1 h of bars per minute

Columns (any case): symbol, ts, open, high, low, close, volume. `ts` is the bar close time in
epoch milliseconds (a number), or text pandas reads as a UTC timestamp. Rows are sent in file order
(per symbol they must be in increasing ts; `--sort` sorts by ts first). A row the daemon would
reject is reported and skipped, never sent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import redis.asyncio as aioredis

from daemon.bars_file import epoch_ms
from daemon.client import BarPublisher, encode_bar
from daemon.wire import BAR_FIELDS

CHUNK_ROWS = 1000


def read_bars(path: Path, sort: bool) -> pd.DataFrame:
    # A CSV's cells as text first: a symbol such as 0700 stays "0700" (as `livepred replay`
    # reads it), and one bad number rejects its row, not its column.
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame.rename(columns={c: str(c).strip().lower() for c in frame.columns})
    missing = [c for c in BAR_FIELDS if c not in frame.columns]
    if missing:
        raise SystemExit(f"{path}: missing columns {missing} (need {list(BAR_FIELDS)})")
    frame = frame[list(BAR_FIELDS)].copy()
    for name in ("open", "high", "low", "close", "volume"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce")  # bad cell: NaN, rejected
    ts = frame["ts"]
    numbers = pd.to_numeric(ts, errors="coerce")
    if pd.api.types.is_datetime64_any_dtype(ts):
        frame["ts"] = epoch_ms(ts)
    elif numbers.notna().sum() >= ts.astype(str).str.strip().ne("").sum() / 2:
        # Epoch milliseconds as they are, never through to_datetime (which takes numbers
        # as nanoseconds); a ts that is not a whole number of ms is reported and skipped.
        frame["ts"] = numbers
    else:
        # Text such as "2026-11-20 14:31:00": a UTC timestamp, turned into epoch ms.
        frame["ts"] = epoch_ms(pd.to_datetime(ts, utc=True, errors="coerce"))
    frame["symbol"] = frame["symbol"].where(frame["symbol"].notna(), "").astype(str)
    return frame.sort_values("ts", kind="stable") if sort else frame


def valid_rows(rows: list[dict[str, Any]], first_row: int) -> list[dict[str, Any]]:
    good = []
    for offset, row in enumerate(rows):
        try:
            encode_bar(row)
        except ValueError as exc:
            print(f"row {first_row + offset}: skipped ({exc}): {row}", file=sys.stderr)
            continue
        good.append(row)
    return good


async def feed(args: argparse.Namespace) -> int:
    frame = read_bars(Path(args.file), args.sort)
    client = aioredis.Redis.from_url(args.redis_url)
    publisher = BarPublisher(
        client,
        stream=args.stream,
        partitions=args.partitions,
        cluster=args.cluster,
        maxlen=args.maxlen,
    )
    started = time.monotonic()
    first_ts: float | None = None
    try:
        for start in range(0, len(frame), CHUNK_ROWS):
            rows = frame.iloc[start : start + CHUNK_ROWS].to_dict("records")
            if args.speed > 0:
                # Event time replayed `speed` times faster than real time, row by row.
                for offset, row in enumerate(rows):
                    good = valid_rows([row], start + offset)
                    if not good:
                        continue
                    ts = float(good[0]["ts"])
                    first_ts = ts if first_ts is None else first_ts
                    due_s = (ts - first_ts) / 1000 / args.speed
                    await asyncio.sleep(max(0.0, due_s - (time.monotonic() - started)))
                    await publisher.publish_many(good)
            else:
                await publisher.publish_many(valid_rows(rows, start))
    finally:
        await client.aclose()
    elapsed = time.monotonic() - started
    print(
        f"published {publisher.published:,} of {len(frame):,} rows to {publisher.keys[0]}"
        f"{' (+ partitions)' if len(publisher.keys) > 1 else ''} in {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="bars file (.csv or .parquet)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream", default="bars", help="streams.input (default bars)")
    parser.add_argument("--partitions", type=int, default=1, help="streams.partitions")
    parser.add_argument("--cluster", action="store_true", help="redis.cluster = true")
    parser.add_argument("--maxlen", type=int, default=None, help="trim the stream (MAXLEN ~)")
    parser.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="replay event time N times faster than real time (0 = no pacing)",
    )
    parser.add_argument("--sort", action="store_true", help="sort rows by ts first")
    try:
        return asyncio.run(feed(parser.parse_args()))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
