"""`livepred demo`: an embedded Redis (or a named one, under a throwaway key prefix), the demo
training run, the real daemon, a synthetic feeder and a strategy-side reader, with a live view.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.client import BarPublisher, PredictionReader, stream_keys
from daemon.demo_run import MALFORMED_KINDS, SyntheticMarket, build_demo_run, symbol_names
from daemon.settings import ConfigError, Settings, load_settings, redact_url

HISTORY_BARS = 45  # published before the daemon starts: it warms state from them, no output
SHOWN_ROWS = 18
VIEW_WINDOW = 5000  # the live view's latency percentiles: over the newest predictions
DRAIN_TIMEOUT_S = 8.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration_s: float = 20.0
    symbols: int = 40
    redis_url: str | None = None
    keep_run: str | None = None
    live: bool = True
    tick_ms: int = 200
    partitions: int = 1
    seed: int = 7

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        def get(name: str, default: Any) -> Any:
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(
            duration_s=float(get("duration", 20.0)),
            symbols=int(get("symbols", 40)),
            redis_url=get("redis_url", None),
            keep_run=get("keep_run", None),
            live=not get("no_live", False) and sys.stdout.isatty(),
            tick_ms=int(get("tick_ms", 200)),
            partitions=int(get("partitions", 1)),
            seed=int(get("seed", 7)),
        )


# ---- the embedded Redis -------------------------------------------------------------------------


class EmbeddedRedis:
    """fakeredis' TCP server on a free loopback port, served from a background thread."""

    def __init__(self) -> None:
        from fakeredis import TcpFakeServer

        self.server = TcpFakeServer(("127.0.0.1", 0))
        host, self.port = self.server.server_address[:2]
        self.host = host.decode() if isinstance(host, bytes | bytearray) else str(host)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="demo-redis", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# ---- the feeder ---------------------------------------------------------------------------------


class SyntheticFeeder:
    """Publishes the synthetic market: a bar burst per tick and a malformed entry now and then.
    The last symbols list only when the live phase starts, so they warm up in view."""

    def __init__(self, publisher: BarPublisher, symbols: list[str], seed: int) -> None:
        self.publisher = publisher
        self.market = SyntheticMarket(symbols, seed + 1)
        self.symbols = symbols
        self.late = max(1, len(symbols) // 8) if len(symbols) >= 4 else 0
        self.bars_published = 0
        self.history_bars = 0
        self.malformed: Counter[str] = Counter()

    async def publish_history(self, bars: int = HISTORY_BARS) -> None:
        seasoned = range(len(self.symbols) - self.late)
        for _ in range(bars):
            ids = await self.publisher.publish_many(self.market.bars(seasoned))
            self.history_bars += len(ids)

    async def publish_tick(self, live_tick: int) -> None:
        self.bars_published += len(await self.publisher.publish_many(self.market.bars()))
        if live_tick % 8 == 2:  # a malformed entry every 8 ticks, each kind in turn
            kind = MALFORMED_KINDS[(live_tick // 8) % len(MALFORMED_KINDS)]
            symbol, fields = self.market.malformed(kind)
            await self.publisher.redis.xadd(self.publisher.stream_for(symbol), fields)
            self.malformed[kind] += 1


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


async def _read_predictions(
    reader: PredictionReader, stats: DemoStats, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        events = await reader.read(count=1000, block_ms=100)
        now_s = time.time()
        for event in events:
            stats.on_event(event, now_s)


async def _read_dead_letters(
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


def demo_settings(url: str, run_dir: Path, prefix: str, partitions: int) -> Settings:
    return load_settings(
        None,
        environ={
            "LIVEPRED_REDIS__URL": url,
            "LIVEPRED_MODELS__RUN_ROOT": str(run_dir),
            "LIVEPRED_METRICS__PORT": "0",
            "LIVEPRED_STREAMS__INPUT": f"{prefix}bars",
            "LIVEPRED_STREAMS__OUTPUT": f"{prefix}predictions",
            "LIVEPRED_STREAMS__DEAD_LETTER": f"{prefix}bars:dead",
            "LIVEPRED_STREAMS__GROUP": f"{prefix}livepred",
            "LIVEPRED_STREAMS__CONSUMER": "demo",
            "LIVEPRED_STREAMS__PARTITIONS": str(partitions),
            "LIVEPRED_LOG__LEVEL": "warning",
        },
    )


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what C++ libraries print on fd 2 while they load (TensorFlow's banner)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _route_logs(level: str) -> None:
    """Send structlog and logging to the current sys.stderr (rich's proxy while live)."""
    from daemon.observe import configure_logging

    configure_logging(level, "console")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setStream(sys.stderr)


async def _wait_active(service: Any, task: asyncio.Task[int], timeout_s: float = 60.0) -> None:
    from daemon.worker import Role

    deadline = time.monotonic() + timeout_s
    while not service.workers or any(w.role != Role.ACTIVE for w in service.workers):
        if task.done():
            task.result()
            raise RuntimeError("the daemon stopped before serving")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon was not serving after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def _metric(service: Any, name: str) -> float:
    registry = service.metrics.registry
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


class DemoSession:
    """The in-process pieces of one demo run: feeder, daemon, strategy-side readers."""

    def __init__(self, opts: DemoOptions, settings: Settings, prefix: str, where: str) -> None:
        import redis.asyncio as aioredis

        from daemon.service import Service

        self.opts, self.settings, self.prefix, self.where = opts, settings, prefix, where
        url = settings.redis.url
        # One client each: the reader's blocking reads never hold up the feeder or the daemon.
        self.feed_redis = aioredis.Redis.from_url(url)
        self.read_redis = aioredis.Redis.from_url(url)
        self.service_redis = aioredis.Redis.from_url(url, socket_timeout=10)
        self.feeder = SyntheticFeeder(
            BarPublisher.from_settings(self.feed_redis, settings),
            symbol_names(opts.symbols),
            opts.seed,
        )
        self.reader = PredictionReader.from_settings(self.read_redis, settings, start="0")
        self.service = Service(settings, redis=self.service_redis, hostname="demo", pid=os.getpid())
        self.stats = DemoStats(families=[])
        self.service_task: asyncio.Task[int] | None = None
        self.readers_stop = asyncio.Event()
        self.readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """History first (the daemon warms its state from it), then the daemon, then readers."""
        await self.feed_redis.ping()
        await self.feeder.publish_history()
        await self.service.start()
        engine = self.service.engine
        assert engine is not None
        self.stats.families = sorted({fam.family for fam in engine.families()})
        self.stats.run_id = str(getattr(engine.loader, "run_id", ""))
        self.stats.selected = next(iter(engine.selected.values()), None)
        self.service_task = asyncio.create_task(self.service.run())
        await _wait_active(self.service, self.service_task)
        s = self.settings
        dead_keys = stream_keys(s.streams.dead_letter, s.streams.partitions, s.redis.cluster)
        self.readers = [
            asyncio.create_task(_read_predictions(self.reader, self.stats, self.readers_stop)),
            asyncio.create_task(
                _read_dead_letters(self.read_redis, dead_keys, self.stats, self.readers_stop)
            ),
        ]

    async def feed(self, stop: asyncio.Event, live: Any) -> None:
        """A bar burst every tick until the duration is up or `stop` is set; then drain."""
        stats, feeder = self.stats, self.feeder
        stats.live_started = next_tick = time.monotonic()
        next_draw = next_note = 0.0
        tick = 0
        while not stop.is_set() and time.monotonic() - stats.live_started < self.opts.duration_s:
            assert self.service_task is not None
            if self.service_task.done():
                self.service_task.result()
                raise RuntimeError("the daemon stopped")
            await feeder.publish_tick(tick)
            tick += 1
            now = time.monotonic()
            if live is not None and now >= next_draw:
                next_draw = now + 0.25
                live.update(self.view())
            elif live is None and now >= next_note:
                next_note = now + 2.0
                print(
                    f"  {now - stats.live_started:4.1f} s: {feeder.bars_published:,} bars, "
                    f"{stats.received:,} predictions, {sum(stats.dead.values())} dead letters",
                    file=sys.stderr,
                    flush=True,
                )
            next_tick += self.opts.tick_ms / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_tick - now))
        stats.live_ended = time.monotonic()
        await self.drain()
        if live is not None:
            live.update(self.view())

    def view(self) -> Any:
        return render(self.stats, self.feeder, self.opts, self.where)

    async def drain(self) -> None:
        """Wait until the daemon has read every entry fed live and the reader has every output."""
        expected_in = self.feeder.bars_published + sum(self.feeder.malformed.values())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            read_in = _metric(self.service, "livepred_bars_in_total")
            published = _metric(self.service, "livepred_predictions_out_total")
            if read_in >= expected_in and self.stats.received >= published:
                break
            await asyncio.sleep(0.05)
        self.readers_stop.set()  # each reader finishes its round: the dead-letter one reads all
        await asyncio.gather(*self.readers)

    async def close(self) -> None:
        """Stop everything started, whatever state it is in; delete a named Redis' demo keys."""
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.service.request_stop()
        if self.service_task is None:
            await self.service.close()
        else:
            with contextlib.suppress(Exception):
                await self.service_task
        try:
            if self.prefix:  # a named Redis: leave nothing behind
                await _delete_prefixed(self.feed_redis, self.prefix)
        finally:
            for client in (self.feed_redis, self.read_redis, self.service_redis):
                with contextlib.suppress(Exception):
                    await client.aclose()


async def _run(
    opts: DemoOptions, settings: Settings, prefix: str, where: str
) -> tuple[DemoStats, SyntheticFeeder]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C: stop early, with a summary
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    session = DemoSession(opts, settings, prefix, where)
    try:
        await session.start()
        if not opts.live:
            await session.feed(stop, None)
            return session.stats, session.feeder
        from rich.live import Live

        with Live(session.view(), refresh_per_second=4, redirect_stderr=True) as live:
            _route_logs("warning")  # log lines above the view, not through it
            try:
                await session.feed(stop, live)
            finally:
                live.update(session.view())
        _route_logs("warning")
        return session.stats, session.feeder
    finally:
        await session.close()


async def _delete_prefixed(redis: Any, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


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
    if run_dir is not None:
        lines.append(f"  training run kept  {run_dir}  (livepred inspect {run_dir})")
    print("\n".join(lines))
    print("DEMO SUMMARY " + json.dumps(result, sort_keys=True), flush=True)


def _fail(message: str, code: int) -> int:
    print(f"livepred: error: {message}", file=sys.stderr)
    return code


def _check_redis(url: str) -> str | None:
    """Why the named Redis can't be used, or None: checked before minutes of set-up."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"--redis-url {redact_url(url)}: {exc}"
    return None


def run_demo(args: argparse.Namespace) -> int:
    opts = DemoOptions.from_args(args)
    if opts.duration_s <= 0 or not 1 <= opts.symbols <= 5000 or opts.tick_ms < 1:
        return _fail("demo needs --duration > 0, 1 <= --symbols <= 5000, --tick-ms >= 1", 2)
    if opts.keep_run:
        run_dir = Path(opts.keep_run).expanduser().resolve()
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            return _fail(f"--keep-run: {run_dir} is not an empty directory", 2)
    # A named Redis gets a throwaway key prefix; the embedded one is the demo's alone.
    prefix = f"demo:{uuid.uuid4().hex[:10]}:" if opts.redis_url else ""
    try:  # the options as the daemon's settings, checked before minutes of set-up
        demo_settings(opts.redis_url or "redis://127.0.0.1/0", Path("."), prefix, opts.partitions)
    except ConfigError as exc:
        flag = {"redis.url": "--redis-url", "streams.partitions": "--partitions"}.get(exc.key)
        return _fail(f"{flag or exc.key}: {exc.message}", 2)
    if opts.redis_url:
        problem = _check_redis(opts.redis_url)
        if problem:
            return _fail(problem, 1)
    from daemon.observe import configure_logging

    configure_logging("warning", "console")
    with contextlib.ExitStack() as stack:
        if not opts.keep_run:
            temp = stack.enter_context(tempfile.TemporaryDirectory(prefix="livepred-demo-"))
            run_dir = Path(temp)
        print(f"building the demo training run in {run_dir} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        with _quiet_native_stderr():
            import tensorflow  # noqa: F401  (its loading banner goes to fd 2)
        build_demo_run(run_dir, seed=opts.seed)
        print(
            f"trained LightGBM, MLP (Keras) and LSTM (TorchScript) in "
            f"{time.monotonic() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if opts.redis_url:
            url = opts.redis_url
            where = f"{redact_url(url)} (keys {prefix}*, deleted at the end)"
        else:
            server = EmbeddedRedis()
            stack.callback(server.close)
            url, prefix, where = server.url, "", f"embedded {server.host}:{server.port}"
            print(
                f"embedded Redis at {server.host}:{server.port} "
                f"(redis-cli -p {server.port} while the demo runs)",
                file=sys.stderr,
                flush=True,
            )
        settings = demo_settings(url, run_dir, prefix, opts.partitions)
        try:
            stats, feeder = asyncio.run(_run(opts, settings, prefix, where))
        except Exception as exc:  # a Redis error, a model error: one line, not a traceback
            return _fail(f"demo failed: {type(exc).__name__}: {exc}", 1)
        result = summary(stats, feeder, "url" if opts.redis_url else "embedded", prefix)
        print_summary(result, where, run_dir if opts.keep_run else None)
    if result["predictions_received"] == 0:
        return _fail("the daemon published no predictions", 1)
    return 0
