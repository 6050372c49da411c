"""The daemon's benchmark scenarios: the real `Service` at several symbol counts (drain rate,
latency, burst, RSS, rebuild) and the instrumentation that reads its own stage timings.

The daemon runs in this process so its own metrics (stage timings) can be read directly; the
feeder and the output reader are separate processes (`daemon.bench_procs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from daemon.bench_latency import latencies_ms
from daemon.bench_limit import (
    WARMUP_FRACTION,
    delete_prefixed,
    drain_rate,
    passthrough_drain,
    passthrough_latency,
    percentiles_ms,
    sample,
    split_percentiles,
    stream_io,
)
from daemon.bench_procs import Feeder, Reader
from daemon.observe import Metrics, process_rss_bytes
from daemon.settings import Settings, prefixed_settings


def bench_settings(url: str, run_dir: Path, prefix: str, batch: int) -> Settings:
    return prefixed_settings(url, run_dir, prefix, "bench", batch=str(batch))


# ---- instrumentation: the daemon's own numbers -----------------------------------------------


class BenchMetrics(Metrics):
    """The daemon's Metrics, also keeping plain totals the benchmark reads between phases:
    bars done (with the time each count was reached), stage and family seconds, rebuilds."""

    def __init__(self) -> None:
        super().__init__()
        self.active_at: float | None = None
        self.rebuilds: list[tuple[int, float]] = []
        self.reset_totals()

    def reset_totals(self) -> None:
        self.bars_done = 0
        self.predictions = 0
        self.batches = 0
        self.stage_s: dict[str, float] = {}
        self.cpu_s = 0.0  # the computing thread's CPU time over the batches (not Redis's)
        self.family_s: dict[str, float] = {}
        self.marks: list[tuple[int, float]] = []  # (bars done, perf_counter) after each batch
        self.target: int | None = None
        self.reached = asyncio.Event()

    def batch(self, partition: int | None, report: Any, read_at_us: int, now_us: int) -> None:
        super().batch(partition, report, read_at_us, now_us)
        self.bars_done += report.bars
        self.predictions += report.predictions
        self.batches += 1
        self.marks.append((self.bars_done, time.perf_counter()))
        self.cpu_s += report.cpu_seconds
        for stage, seconds in report.stage_seconds.items():
            self.stage_s[stage] = self.stage_s.get(stage, 0.0) + seconds
        for (_, family), seconds in report.family_seconds.items():
            self.family_s[family] = self.family_s.get(family, 0.0) + seconds
        if self.target is not None and self.bars_done >= self.target:
            self.reached.set()

    def role(self, partition: int | None, role: str) -> None:
        super().role(partition, role)
        if role == "active":
            self.active_at = time.perf_counter()

    def rebuild(self, bars: int, seconds: float) -> None:
        super().rebuild(bars, seconds)
        self.rebuilds.append((bars, seconds))

    async def wait_for(self, bars: int, timeout_s: float) -> None:
        self.target = bars
        if self.bars_done < bars:
            await asyncio.wait_for(self.reached.wait(), timeout=timeout_s)

    def time_at(self, bars: int) -> float:
        """When the count of bars done first reached `bars`."""
        return next(t for done, t in self.marks if done >= bars)

    def per_batch_ms(self) -> dict[str, float]:
        """Mean batch size and milliseconds per batch of each stage (fixed costs show here)."""
        n = max(self.batches, 1)
        out = {"mean_batch": self.bars_done / n}
        out.update({k: v / n * 1e3 for k, v in self.stage_s.items()})
        out.update({f"model:{k}": v / n * 1e3 for k, v in self.family_s.items()})
        # Wall time of decode + state + models + encode against the computing thread's CPU
        # time over the same: where they are close, the thread was not waiting (GIL, CPU).
        out["compute wall"] = sum(
            self.stage_s.get(k, 0.0) for k in ("decode", "state+models", "encode")
        ) / n * 1e3
        out["compute CPU"] = self.cpu_s / n * 1e3
        return out

    def breakdown_us(self) -> dict[str, float]:
        """Per bar, microseconds: decode, state, each family, encode, redis_commit."""
        n = max(self.bars_done, 1)
        families = sum(self.family_s.values())
        out = {"decode": self.stage_s.get("decode", 0.0)}
        if "state" in self.stage_s:
            out["state"] = self.stage_s["state"]
            out.update({f"model:{f}": s for f, s in sorted(self.family_s.items())})
            out["rows"] = self.stage_s.get("rows", 0.0)
        else:  # the daemon times state and models as one stage
            out["state"] = self.stage_s.get("state+models", 0.0) - families
            out.update({f"model:{f}": s for f, s in sorted(self.family_s.items())})
        out["encode"] = self.stage_s.get("encode", 0.0)
        out["redis_commit"] = self.stage_s.get("redis_commit", 0.0)
        return {k: v / n * 1e6 for k, v in out.items()}


# ---- the daemon ------------------------------------------------------------------------------


class DaemonHandle:
    """One `Service` on the shared engine (models loaded once for the whole benchmark)."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        from daemon.service import Service, make_redis

        self.metrics = BenchMetrics()
        self.redis = make_redis(settings)
        self.service = Service(settings, redis=self.redis, engine=engine, metrics=self.metrics,
                               hostname="bench", pid=0)
        self.task: asyncio.Task[int] | None = None

    async def start(self, timeout_s: float = 300.0) -> float:
        """Start and wait until serving; returns seconds from start to ACTIVE."""
        started = time.perf_counter()
        await self.service.start()
        self.task = asyncio.create_task(self.service.run())
        deadline = time.monotonic() + timeout_s
        while self.metrics.active_at is None:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the daemon stopped before serving")
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon was not serving in time")
            await asyncio.sleep(0.002)
        return self.metrics.active_at - started

    async def stop(self) -> None:
        self.service.request_stop()
        if self.task is not None:
            await self.task
        with contextlib.suppress(Exception):
            await self.redis.aclose()


@dataclass(frozen=True, slots=True)
class ScaleOptions:
    symbols: int
    history_bars: int  # per symbol, before the group exists: rebuilt into state on start
    backlog: int  # bars per drain
    repeats: int
    latency_seconds: float
    bursts: int  # bursts of `burst_symbols` bars (0: none at this scale)
    burst_symbols: int
    batch: int = 512
    rebuild_phases: bool = False  # time the rebuild's steps one by one afterwards
    latency_repeats: int = 1
    rtt_seconds: float = 2.0
    # Before each drain, the passthrough drains the same backlog (the daemon stopped): each
    # drain gets its own limit, measured seconds before it, which the box's drift over a
    # run (+-20% here) cannot move apart.
    paired_limit: bool = False


async def livepred_scale(
    redis: Any, url: str, run_dir: Path, engine: Any, feeder: Feeder, reader: Reader,
    prefix: str, opts: ScaleOptions, log: Callable[[str], None],
) -> dict[str, Any]:
    p = f"{prefix}s{opts.symbols}:"
    settings = bench_settings(url, run_dir, p, opts.batch)
    stream, output = f"{p}bars", f"{p}predictions"
    feeder.market(p, opts.symbols, seed=opts.symbols)
    history = opts.history_bars * opts.symbols
    await asyncio.to_thread(feeder.backlog, p, stream, history)
    rss_before = process_rss_bytes()
    rates: list[float] = []
    rebuild_rates: list[float] = []
    start_s: list[float] = []
    breakdown: dict[str, float] = {}
    drain_per_batch: dict[str, float] = {}
    published_ok = True
    daemon = DaemonHandle(settings, engine)
    start_s.append(await daemon.start())
    rebuild_rates.extend(b / s for b, s in daemon.metrics.rebuilds if s > 0 and b)
    paired: list[float] = []
    for r in range(opts.repeats):
        # A standing backlog: the daemon is down while it is published, then drains it.
        await daemon.stop()
        if opts.paired_limit:
            paired.append(
                await passthrough_drain(redis, feeder, f"{p}pair{r}:", opts.backlog, r, False)
            )
        await redis.xtrim(stream, maxlen=history, approximate=False)
        out_before = await _last_id(redis, output)
        ids = await asyncio.to_thread(feeder.backlog, p, stream, opts.backlog)
        daemon = DaemonHandle(settings, engine)
        start_s.append(await daemon.start())
        rebuild_rates.extend(b / s for b, s in daemon.metrics.rebuilds if s > 0 and b)
        assert daemon.metrics.active_at is not None
        await daemon.metrics.wait_for(len(ids), timeout_s=600)
        rates.append(drain_rate(daemon.metrics.marks, daemon.metrics.active_at, len(ids)))
        published_ok &= await _outputs_match(redis, output, out_before, ids)
        if r == opts.repeats - 1:
            breakdown = daemon.metrics.breakdown_us()
            drain_per_batch = daemon.metrics.per_batch_ms()
        log(f"  {opts.symbols} symbols: drain {r + 1}/{opts.repeats}: {rates[-1]:,.0f} bars/s")
    rate = float(np.median(rates))
    rss_after = process_rss_bytes()
    # Latency at half the saturated rate, beside the passthrough's one-bar round trip
    # measured just before it (the machine's load changes over a run).
    rtt = await passthrough_latency(
        redis, feeder, reader, f"{p}rtt:", 200.0, opts.rtt_seconds, single=True, fenced=False
    )
    moderate = rate / 2
    runs: list[dict[str, float]] = []
    kept: list[np.ndarray] = []
    missing = fed_total = 0
    per_batch: dict[str, float] = {}
    for _ in range(opts.latency_repeats):
        daemon.metrics.reset_totals()
        await asyncio.to_thread(reader.start, output)
        fed = await asyncio.to_thread(feeder.paced, p, stream, moderate, opts.latency_seconds)
        await daemon.metrics.wait_for(len(fed["ids"]), timeout_s=120)
        seen = await asyncio.to_thread(reader.stop)
        lat, lost = latencies_ms(fed["ids"], fed["sent_us"], seen["ids"], seen["seen_us"])
        missing += lost
        fed_total += len(fed["ids"])
        kept.append(lat[int(len(lat) * WARMUP_FRACTION) :])
        runs.append({**percentiles_ms(kept[-1]), **split_percentiles(fed, seen)})
        per_batch = daemon.metrics.per_batch_ms()
    # And at a light load (10% of the drain rate), where the CPUs are not the limit.
    daemon.metrics.reset_totals()
    light_rate = rate / 10
    await asyncio.to_thread(reader.start, output)
    fed = await asyncio.to_thread(feeder.paced, p, stream, light_rate, opts.latency_seconds)
    await daemon.metrics.wait_for(len(fed["ids"]), timeout_s=120)
    seen = await asyncio.to_thread(reader.stop)
    lat, lost = latencies_ms(fed["ids"], fed["sent_us"], seen["ids"], seen["seen_us"])
    missing += lost
    light = {"rate": light_rate, **percentiles_ms(lat[int(len(lat) * WARMUP_FRACTION) :]),
             "split": split_percentiles(fed, seen), "per_batch": daemon.metrics.per_batch_ms()}
    published_ok &= missing == 0
    lat_kept = np.concatenate(kept)
    result: dict[str, Any] = {
        "symbols": opts.symbols,
        "bars_per_s": rate,
        "bars_per_s_runs": rates,
        **{k: float(np.median([r[k] for r in runs])) for k in runs[0]},
        "latency_runs": runs,
        "latency_rate": moderate,
        "latency_bars": fed_total,
        "latency_missing": missing,
        "latency_per_batch": per_batch,
        "light_load": light,
        "rtt": {k: v for k, v in rtt.items() if k != "latency_sample_ms"},
        "rss_mb": rss_after / 2**20,
        "rss_delta_mb": (rss_after - rss_before) / 2**20,
        "rss_bytes_per_symbol": (rss_after - rss_before) / opts.symbols,
        "state_bytes_per_slot": _table_bytes(daemon),
        "start_to_active_s": float(np.median(start_s)),
        "rebuild_bars": history,
        "rebuild_bars_per_s": float(np.median(rebuild_rates)) if rebuild_rates else None,
        "rebuild_bars_per_s_runs": rebuild_rates,
        "breakdown_us_per_bar": breakdown,
        "drain_per_batch": drain_per_batch,
        "outputs_match": published_ok,
        "latency_sample_ms": sample(lat_kept, 4000),
    }
    if paired:
        ratios = [rate_r / limit_r for rate_r, limit_r in zip(rates, paired, strict=True)]
        result["paired_limit"] = {
            "limit_bars_per_s_runs": paired,
            "ratio_runs": ratios,
            "ratio": float(np.median(ratios)),
        }
    if opts.bursts:
        result["burst"] = await _bursts(daemon, redis, feeder, reader, p, opts)
    await daemon.stop()
    if opts.rebuild_phases:
        await redis.xtrim(stream, maxlen=history, approximate=False)
        result["rebuild_phases_us_per_bar"] = await rebuild_phases(redis, stream, engine)
    await delete_prefixed(redis, p)
    return result


def _table_bytes(daemon: DaemonHandle) -> int | None:
    worker = daemon.service.workers[0] if daemon.service.workers else None
    if worker is None or worker.pipeline is None:
        return None
    return int(worker.pipeline.table.nbytes_per_slot())


async def _outputs_match(redis: Any, output: str, after: str, ids: list[str]) -> bool:
    """Every bar of the drain has exactly one output after entry `after`, naming it as `src`."""
    wanted = set(ids)
    got: list[str] = []
    last = after
    while True:
        rows = await redis.xrange(output, min=f"({last}", count=10_000)
        if not rows:
            break
        for _, fields in rows:
            got.append(str(msgpack.unpackb(fields[b"data"], raw=False)["src"]).rpartition("/")[2])
        last = rows[-1][0].decode()
    mine = [g for g in got if g in wanted]
    return len(mine) == len(wanted) and len(set(mine)) == len(wanted)


async def _last_id(redis: Any, stream: str) -> str:
    newest = await redis.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def rebuild_phases(redis: Any, stream: str, engine: Any) -> dict[str, float]:
    """The rebuild's steps timed one after the other (the daemon overlaps some of them): the
    backwards scan of the stream, decoding, and applying the bars to a fresh state."""
    from daemon.batch import oldest_first, select_recent, warm_from_columns
    from daemon.pipeline import Pipeline

    io = stream_io(redis, stream.removesuffix("bars"))
    started = time.perf_counter()
    chunks = [chunk async for chunk in io.scan_history_backwards(stream, "+")]
    fetched = time.perf_counter()
    per_symbol: dict[str, list[int]] = {}
    kept, clock = oldest_first(
        [select_recent(ids, fields, stream, per_symbol, 10**9) for ids, fields in chunks]
    )
    decoded = time.perf_counter()
    pipeline = Pipeline(engine, ttl_s=900.0)
    for i in range(0, len(kept), 50_000):
        warm_from_columns(pipeline, kept.window(i, i + 50_000), clock[i : i + 50_000])
    applied = time.perf_counter()
    n = max(len(kept), 1)
    return {"fetch": (fetched - started) / n * 1e6, "decode": (decoded - fetched) / n * 1e6,
            "apply": (applied - decoded) / n * 1e6}


async def _bursts(
    daemon: DaemonHandle, redis: Any, feeder: Feeder, reader: Reader, p: str, opts: ScaleOptions
) -> dict[str, Any]:
    """One bar for each of `burst_symbols` symbols at once (a minute boundary): time from the
    last bar written to the last prediction visible to a reader."""
    stream, output = f"{p}bars", f"{p}predictions"
    last_ms, from_first_ms = [], []
    ok = True
    for _ in range(opts.bursts):
        daemon.metrics.reset_totals()
        await asyncio.to_thread(reader.start, output)
        fed = await asyncio.to_thread(feeder.burst, p, stream, opts.burst_symbols)
        await daemon.metrics.wait_for(len(fed["ids"]), timeout_s=120)
        seen = await asyncio.to_thread(reader.stop)
        wanted = set(fed["ids"])
        times = [t for i, t in zip(seen["ids"], seen["seen_us"], strict=True) if i in wanted]
        ok &= len(times) == len(wanted)
        last_ms.append((max(times) - fed["written_us"]) / 1000.0)
        from_first_ms.append((max(times) - fed["first_us"]) / 1000.0)
        await asyncio.sleep(0.5)
    return {
        "symbols": opts.burst_symbols,
        "last_pred_ms": float(np.median(last_ms)),
        "last_pred_ms_runs": last_ms,
        "from_first_sent_ms": float(np.median(from_first_ms)),
        "outputs_match": ok,
    }
