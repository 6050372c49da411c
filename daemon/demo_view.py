"""The demo's strategy-side view: running statistics, the live rich table, the summary."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.client import PredictionReader

if TYPE_CHECKING:
    from daemon.demo import DemoOptions, SyntheticFeeder

SHOWN_ROWS = 18
VIEW_WINDOW = 5000  # the live view's latency percentiles: over the newest predictions

# ---- what the strategy side sees ----------------------------------------------------------------


@dataclass(slots=True)
class Latest:
    ts: int
    preds: dict[str, float]
    pred: float | None
    warming: dict[str, int]


@dataclass(slots=True)
class DemoStats:
    families: list[str]
    selected: str | None = None
    run_id: str = ""
    received: int = 0
    by_family: Counter[str] = field(default_factory=Counter)
    latest: dict[str, Latest] = field(default_factory=dict)
    lat_us: deque[int] = field(default_factory=lambda: deque(maxlen=200_000))
    feed_to_strategy_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))
    dead: Counter[str] = field(default_factory=Counter)
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    live_started: float = 0.0
    live_ended: float = 0.0

    def on_event(self, event: Any, now_s: float) -> None:
        self.received += 1
        self.lat_us.append(int(event.lat_us))
        entry_ms = event.src.rpartition("/")[2].partition("-")[0]
        if entry_ms.isdigit():
            self.feed_to_strategy_ms.append(max(0.0, now_s * 1000 - int(entry_ms)))
        result = next(iter(event.targets.values()), None)
        if result is None:
            return
        self.selected = result.selected
        self.run_id = event.run
        self.by_family.update(result.preds.keys())
        self.latest[event.symbol] = Latest(
            event.ts, dict(result.preds), result.pred, dict(result.warming)
        )

    def warming_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for latest in self.latest.values():
            counts.update(latest.warming.keys())
        return {f: counts.get(f, 0) for f in self.families}

    def throughput(self, now_s: float) -> float:
        """Predictions per second over the last ~2 s."""
        self.recent.append((now_s, self.received))
        while len(self.recent) > 2 and now_s - self.recent[0][0] > 2.0:
            self.recent.popleft()
        (t0, n0), (t1, n1) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def mean_throughput(self) -> float:
        elapsed = (self.live_ended or time.monotonic()) - self.live_started
        return self.received / elapsed if elapsed > 0 else 0.0


def percentile(values: Any, q: float, last: int | None = None) -> float | None:
    """The q-th percentile of `values` (of its `last` newest items only, if given)."""
    if not values:
        return None
    items = itertools.islice(reversed(values), last) if last else values
    return float(np.percentile(np.fromiter(items, dtype=np.float64), q))


async def read_predictions(
    reader: PredictionReader, stats: DemoStats, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        events = await reader.read(count=1000, block_ms=100)
        now_s = time.time()
        for event in events:
            stats.on_event(event, now_s)


async def read_dead_letters(
    redis: Any, keys: list[str], stats: DemoStats, stop: asyncio.Event
) -> None:
    last = dict.fromkeys(keys, "0-0")
    while True:
        for key in keys:
            for entry_id, fields in await redis.xrange(key, min=f"({last[key]}", count=1000):
                last[key] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                error = fields.get(b"error", b"?")
                stats.dead[error.decode(errors="replace")] += 1
        if stop.is_set():
            return
        await asyncio.sleep(0.2)


# ---- the live view ------------------------------------------------------------------------------


def _bp(value: float | None) -> str:
    return "" if value is None else f"{value * 1e4:+.1f}"


def render(stats: DemoStats, feeder: SyntheticFeeder, opts: DemoOptions, where: str) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    now = time.monotonic()
    elapsed = now - stats.live_started if stats.live_started else 0.0
    lat, e2e = stats.lat_us, stats.feed_to_strategy_ms
    p50, p99 = percentile(lat, 50, VIEW_WINDOW), percentile(lat, 99, VIEW_WINDOW)
    e50, e99 = percentile(e2e, 50, VIEW_WINDOW), percentile(e2e, 99, VIEW_WINDOW)
    warming = ", ".join(f"{f} {n}" for f, n in stats.warming_counts().items() if n) or "none"
    dead = ", ".join(f"{r} {n}" for r, n in sorted(stats.dead.items())) or "none"
    head = Text.assemble(
        ("livepred demo", "bold cyan"),
        f"  run {stats.run_id or '...'}  ·  redis {where}  ·  ",
        f"{len(feeder.symbols)} symbols  ·  {elapsed:4.1f}/{opts.duration_s:g} s\n",
        ("bars published ", "bold"),
        f"{feeder.bars_published:,}",
        f" (+{feeder.history_bars:,} history, {sum(feeder.malformed.values())} malformed)   ",
        ("predictions ", "bold"),
        f"{stats.received:,}  ({stats.throughput(now):,.0f}/s)\n",
        ("latency ", "bold"),
        "read→publish ",
        f"p50 {_ms(p50, 1e-3)} p99 {_ms(p99, 1e-3)}   feed→strategy p50 {_ms(e50)} p99 {_ms(e99)}\n",
        ("warming ", "bold"),
        f"{warming}   ",
        ("dead letters ", "bold"),
        dead,
    )
    table = Table(expand=True, title="latest prediction per symbol (bp of fwd return), ranked")
    table.add_column("#", justify="right")
    table.add_column("symbol")
    table.add_column("bar ts (UTC)")
    for family in stats.families:
        label = f"{family} *" if family == stats.selected else family
        table.add_column(label, justify="right")
    table.add_column("warming", justify="right")
    ranked = sorted(
        stats.latest.items(), key=lambda kv: -kv[1].pred if kv[1].pred is not None else float("inf")
    )
    for rank, (symbol, latest) in enumerate(ranked[:SHOWN_ROWS], start=1):
        table.add_row(
            str(rank),
            symbol,
            time.strftime("%H:%M", time.gmtime(latest.ts / 1000)),
            *(_bp(latest.preds.get(f)) for f in stats.families),
            ", ".join(f"{f} {n}" for f, n in latest.warming.items()),
        )
    if len(ranked) > SHOWN_ROWS:
        table.caption = f"... and {len(ranked) - SHOWN_ROWS} more symbols   (* = selected family)"
    return Group(Panel(head), table)


def _ms(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.1f} ms"


# ---- the run ------------------------------------------------------------------------------------


def summary(
    stats: DemoStats, feeder: SyntheticFeeder, redis: str, key_prefix: str
) -> dict[str, Any]:
    lat50, lat99 = percentile(stats.lat_us, 50), percentile(stats.lat_us, 99)
    e50, e99 = percentile(stats.feed_to_strategy_ms, 50), percentile(stats.feed_to_strategy_ms, 99)
    return {
        "run_id": stats.run_id,
        "selected_family": stats.selected,
        "duration_s": round((stats.live_ended or time.monotonic()) - stats.live_started, 3),
        "symbols": len(feeder.symbols),
        "bars_published": feeder.bars_published,
        "history_bars": feeder.history_bars,
        "malformed_published": dict(sorted(feeder.malformed.items())),
        "predictions_received": stats.received,
        "predictions_by_family": {f: stats.by_family.get(f, 0) for f in stats.families},
        "dead_letters": dict(sorted(stats.dead.items())),
        "throughput_per_s": round(stats.mean_throughput(), 1),
        "lat_us_p50": round(lat50) if lat50 is not None else None,
        "lat_us_p99": round(lat99) if lat99 is not None else None,
        "feed_to_strategy_ms_p50": round(e50, 2) if e50 is not None else None,
        "feed_to_strategy_ms_p99": round(e99, 2) if e99 is not None else None,
        "redis": redis,
        "key_prefix": key_prefix,
    }


def print_summary(result: dict[str, Any], where: str, run_dir: Path | None) -> None:
    lines = [
        f"livepred demo: {result['duration_s']:.1f} s, {result['symbols']} symbols, "
        f"run {result['run_id']} (selected {result['selected_family']}), redis {where}",
        f"  bars published     {result['bars_published']:,} live "
        f"(+{result['history_bars']:,} history, "
        f"{sum(result['malformed_published'].values())} malformed)",
        f"  predictions        {result['predictions_received']:,} received, "
        f"{result['throughput_per_s']:,.0f}/s",
    ]
    for family, n in result["predictions_by_family"].items():
        lines.append(f"    {family:<16} {n:,}")
    dead = result["dead_letters"]
    lines.append(
        f"  dead letters       {sum(dead.values())}"
        + (": " + ", ".join(f"{r} {n}" for r, n in dead.items()) if dead else "")
    )
    lines.append(
        f"  latency            read->publish p50 {_ms(result['lat_us_p50'], 1e-3)}, "
        f"p99 {_ms(result['lat_us_p99'], 1e-3)}; feed->strategy p50 "
        f"{_ms(result['feed_to_strategy_ms_p50'])}, p99 {_ms(result['feed_to_strategy_ms_p99'])}"
    )
    if result["redis"] == "embedded":
        lines.append(
            "                     (feeder, strategy, live view and daemon share one Python process,"
            "\n                      and Redis is fakeredis: its latency is not the daemon's; see"
            "\n                      BENCHMARKS.md)"
        )
    if run_dir is not None:
        lines.append(f"  training run kept  {run_dir}  (livepred inspect {run_dir})")
    print("\n".join(lines))
    print("DEMO SUMMARY " + json.dumps(result, sort_keys=True), flush=True)
