"""`livepred demo`: an embedded Redis (or a named one, under a throwaway key prefix), the demo
training run, the real daemon, a synthetic feeder and a strategy-side reader, with a live view.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.client import BarPublisher, PredictionReader, stream_keys
from daemon.demo_market import MALFORMED_KINDS, SyntheticMarket, symbol_names
from daemon.demo_run import build_demo_run
from daemon.demo_view import (
    DemoStats,
    print_summary,
    read_dead_letters,
    read_predictions,
    render,
    summary,
)
from daemon.embedded_redis import EmbeddedRedis
from daemon.observe import quiet_native_stderr
from daemon.settings import ConfigError, Settings, prefixed_settings, redact_url

HISTORY_BARS = 45  # published before the daemon starts: it warms state from them, no output
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


def demo_settings(url: str, run_dir: Path, prefix: str, partitions: int) -> Settings:
    return prefixed_settings(url, run_dir, prefix, "demo", partitions=str(partitions))


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
            asyncio.create_task(read_predictions(self.reader, self.stats, self.readers_stop)),
            asyncio.create_task(
                read_dead_letters(self.read_redis, dead_keys, self.stats, self.readers_stop)
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
                next_draw = now + 0.5
                live.update(self.view(), refresh=True)
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
            live.update(self.view(), refresh=True)

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

        # Refreshed from the loop: no refresh thread competing with the daemon for the GIL.
        with Live(session.view(), auto_refresh=False, redirect_stderr=True) as live:
            _route_logs("warning")  # log lines above the view, not through it
            try:
                await session.feed(stop, live)
            finally:
                live.update(session.view(), refresh=True)
        _route_logs("warning")
        return session.stats, session.feeder
    finally:
        await session.close()


async def _delete_prefixed(redis: Any, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


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
        with quiet_native_stderr():
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
