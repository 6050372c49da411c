"""`livepred bench`: the daemon measured side by side with its baselines in one run (the Redis
passthrough limit, the naive per-event service), at several symbol counts; see BENCHMARKS.md.

This module plans and orders the scenarios and writes the results; the scenarios live in
`bench_limit` (the passthrough), `bench_daemon` (the daemon), `bench_offline` (no Redis) and
`bench_procs` (the feeder and reader processes); `bench_report` formats them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.observe import quiet_native_stderr

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SEED = 7


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each scenario to run (full, quick, or quick on the embedded Redis)."""

    limit_backlog: int
    limit_repeats: int
    rtt_seconds: float
    scales: tuple[Any, ...]  # bench_daemon.ScaleOptions
    moderate_seconds: float
    naive_symbols: int
    naive_bars: int
    feature_sizes: tuple[tuple[int, int], ...]
    memory_symbols: int
    micro_batch: int
    micro_min_time_s: float


def plan_for(quick: bool, embedded: bool) -> Plan:
    from daemon.bench_daemon import ScaleOptions

    if not quick:
        return Plan(
            limit_backlog=200_000, limit_repeats=3, rtt_seconds=5.0,
            scales=(
                ScaleOptions(100, 45, 200_000, 3, 4.0, 0, 0, latency_repeats=3),
                ScaleOptions(1_000, 45, 200_000, 3, 4.0, 0, 0, latency_repeats=3,
                             paired_limit=True),
                ScaleOptions(10_000, 45, 200_000, 3, 4.0, 5, 5_000, rebuild_phases=True,
                             latency_repeats=3),
            ),
            moderate_seconds=8.0, naive_symbols=20, naive_bars=300,
            feature_sizes=((10, 2000), (1_000, 400), (100_000, 20)),
            memory_symbols=100_000, micro_batch=512, micro_min_time_s=0.2,
        )
    if embedded:  # fakeredis in this process: a smoke test, nothing more
        return Plan(
            limit_backlog=2_000, limit_repeats=1, rtt_seconds=1.0,
            scales=(ScaleOptions(20, 45, 2_000, 1, 1.5, 0, 0, rtt_seconds=0.5),
                    ScaleOptions(100, 45, 2_000, 1, 1.5, 1, 100, rebuild_phases=True,
                                 rtt_seconds=0.5, paired_limit=True)),
            moderate_seconds=1.0, naive_symbols=3, naive_bars=20,
            feature_sizes=((10, 50), (1_000, 10), (10_000, 2)),
            memory_symbols=20_000, micro_batch=256, micro_min_time_s=0.02,
        )
    return Plan(
        limit_backlog=20_000, limit_repeats=1, rtt_seconds=1.5,
        scales=(ScaleOptions(100, 45, 10_000, 1, 2.0, 0, 0, rtt_seconds=1.0),
                ScaleOptions(1_000, 45, 20_000, 1, 2.0, 1, 1_000, rebuild_phases=True,
                             rtt_seconds=1.0, paired_limit=True)),
        moderate_seconds=2.0, naive_symbols=5, naive_bars=30,
        feature_sizes=((10, 200), (1_000, 50), (100_000, 3)),
        memory_symbols=100_000, micro_batch=512, micro_min_time_s=0.05,
    )


# ---- environment -----------------------------------------------------------------------------


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0)
        ok = bool(client.ping())
        client.close()
        return ok
    except (redis.RedisError, OSError):
        return False


def machine_info(redis_url: str, embedded: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import redis

    from daemon.settings import redact_url

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gb = round(int(first.split()[1]) / 2**20, 1)
    versions = {}
    for package in ("numpy", "pandas", "lightgbm", "torch", "tensorflow-cpu", "keras",
                    "redis", "hiredis", "msgpack", "tl2cgen"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    redis_version = "fakeredis (embedded)" if embedded else "?"
    if not embedded:
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis.from_url(redis_url)
            redis_version = str(client.info("server").get("redis_version", "?"))
            client.close()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu or platform.processor(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "redis_version": redis_version,
        "redis_url": "embedded fakeredis" if embedded else redact_url(redis_url),
        "loadavg_start": list(os.getloadavg()),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- the run ---------------------------------------------------------------------------------


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _run_all(url: str, run_dir: Path, plan: Plan, results: dict[str, Any]) -> None:
    import redis.asyncio as aioredis

    from daemon import bench_daemon, bench_limit, bench_offline
    from daemon.bench_procs import Feeder, Reader
    from daemon.model_setup import build_engine
    from daemon.runtime import settle_heap

    prefix = f"livepred-bench:{uuid.uuid4().hex[:8]}:"
    results["key_prefix"] = prefix  # every key the run wrote is under it, deleted at the end
    redis = aioredis.Redis.from_url(url)
    feeder = reader = None
    engine = None
    durations: dict[str, float] = results.setdefault("durations_s", {})
    try:
        feeder, reader = Feeder(url), Reader(url)
        started = time.perf_counter()
        settings = bench_daemon.bench_settings(url, run_dir, prefix, 512)
        engine = await asyncio.to_thread(build_engine, settings)
        durations["engine_load"] = time.perf_counter() - started
        # One engine for every daemon start: models load once (a restart's rebuild is timed
        # without the model load); closed at the end.
        engine.close = lambda: None  # type: ignore[method-assign]
        # The collector as the daemon sets it once its models are loaded, before anything is
        # measured: the baselines run in this process too, beside the same loaded frameworks.
        settle_heap()

        started = time.perf_counter()
        _note("Redis limit: passthrough drains and one-bar round trips ...")
        results["redis_limit"] = await bench_limit.redis_limit(
            redis, feeder, reader, f"{prefix}lim:", backlog=plan.limit_backlog,
            repeats=plan.limit_repeats, rtt_seconds=plan.rtt_seconds,
        )
        durations["redis_limit"] = time.perf_counter() - started

        results["livepred"] = {}
        sizes = [s.symbols for s in plan.scales]
        latency_scale = 1000 if 1000 in sizes else sizes[-1]
        for scale in plan.scales:
            started = time.perf_counter()
            _note(f"livepred at {scale.symbols:,} symbols ...")
            r = await bench_daemon.livepred_scale(
                redis, url, run_dir, engine, feeder, reader, prefix, scale, _note
            )
            burst = r.pop("burst", None)
            if burst is not None:
                results["burst"] = burst
            results["livepred"][str(scale.symbols)] = r
            durations[f"livepred_{scale.symbols}"] = time.perf_counter() - started
            if scale.symbols == latency_scale:
                # The passthrough at the very load of this latency run, for comparison.
                results["redis_limit"]["moderate"] = await bench_limit.passthrough_at(
                    redis, feeder, reader, f"{prefix}lim:", r["latency_rate"],
                    plan.moderate_seconds,
                )
        largest = results["livepred"][str(plan.scales[-1].symbols)]
        results["rebuild"] = {
            "bars_per_s": largest["rebuild_bars_per_s"],
            "runs": largest["rebuild_bars_per_s_runs"],
            "bars": largest["rebuild_bars"],
            "symbols": largest["symbols"],
            "start_to_active_s": largest["start_to_active_s"],
            "phases_us_per_bar": largest.get("rebuild_phases_us_per_bar"),
            "engine_load_s": durations["engine_load"],
        }

        started = time.perf_counter()
        _note(f"naive baseline: {plan.naive_bars} bars ...")
        results["naive"] = await asyncio.to_thread(
            bench_offline.naive_baseline, url, run_dir, feeder, f"{prefix}naive:",
            symbols=plan.naive_symbols, bars=plan.naive_bars, seed=SEED,
        )
        durations["naive"] = time.perf_counter() - started
    finally:
        for child in (feeder, reader):
            if child is not None:
                child.close()
        with contextlib.suppress(Exception):
            await bench_limit.delete_prefixed(redis, prefix)
        await redis.aclose()

    started = time.perf_counter()
    _note(f"state memory at {plan.memory_symbols:,} symbols ...")
    results["memory"] = bench_offline.state_memory(engine, plan.memory_symbols)
    _note("feature state vs pandas ...")
    results["features"] = bench_offline.feature_state(list(plan.feature_sizes))
    _note("handlers: single vs batched predict ...")
    results["families"] = bench_offline.handler_microbench(
        run_dir, plan.micro_batch, plan.micro_min_time_s
    )
    durations["offline"] = time.perf_counter() - started
    if engine is not None:
        from handlers.engine import InferenceEngine

        InferenceEngine.close(engine)


def _command(args: argparse.Namespace) -> str:
    parts = ["livepred bench"]
    if args.quick:
        parts.append("--quick")
    if getattr(args, "embedded", False):
        parts.append("--embedded")
    for flag, name in (("--redis-url", "redis_url"), ("--json", "json"), ("--plot", "plot"),
                       ("--markdown", "markdown")):
        if getattr(args, name, None):
            parts.append(f"{flag} {getattr(args, name)}")
    return " ".join(parts)


def run_bench(args: argparse.Namespace) -> int:
    from daemon.observe import configure_logging

    quick = bool(args.quick)
    url = args.redis_url or DEFAULT_REDIS_URL
    embedded = bool(getattr(args, "embedded", False))
    if not embedded and not _redis_reachable(url):
        if quick and not args.redis_url:
            embedded = True
            _note(f"no Redis at {DEFAULT_REDIS_URL}: --quick runs on an embedded fakeredis")
        else:
            print(f"livepred: error: no Redis reachable at {url} (start one, pass --redis-url, "
                  "or use --quick --embedded)", file=sys.stderr)
            return 2
    if embedded and not quick:
        print("livepred: error: --embedded is for --quick only (fakeredis is no benchmark)",
              file=sys.stderr)
        return 2
    configure_logging("warning", "console")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    plan = plan_for(quick, embedded)
    total_started = time.perf_counter()
    results: dict[str, Any] = {"version": 1, "mode": "quick" if quick else "full",
                               "command": _command(args), "seed": SEED}
    with contextlib.ExitStack() as stack:
        if embedded:
            from daemon.embedded_redis import EmbeddedRedis

            server = EmbeddedRedis()
            stack.callback(server.close)
            url = server.url
        results["machine"] = machine_info(url, embedded)
        results["embedded_redis"] = embedded
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="livepred-bench-")))
        _note("building the demo training run (LightGBM, Keras MLP, TorchScript LSTM) ...")
        started = time.perf_counter()
        with quiet_native_stderr():
            import tensorflow  # noqa: F401  (its loading banner goes to fd 2)
        from daemon.demo_run import build_demo_run

        build_demo_run(run_dir / "run", seed=SEED)
        results["durations_s"] = {"demo_run": time.perf_counter() - started}
        asyncio.run(_run_all(url, run_dir / "run", plan, results))
    from daemon import bench_report

    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["durations_s"]["total"] = time.perf_counter() - total_started
    results["targets"] = bench_report.targets(results)
    results["outputs_match"] = _outputs_match(results)
    results = _clean(results)
    print(bench_report.console(results))
    where = "embedded fakeredis: numbers are NOT representative" if embedded else (
        results["machine"]["redis_url"])
    print(f"\nredis: {where}; {results['mode']} run in {results['durations_s']['total']:.0f} s; "
          f"every bar one output: {'yes' if results['outputs_match'] else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        bench_report.plot(results, Path(args.plot))
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text(bench_report.markdown(results))
    return 0 if results["outputs_match"] else 1


def _outputs_match(results: dict[str, Any]) -> bool:
    checks = [r.get("outputs_match") for r in (results.get("livepred") or {}).values()]
    checks.append((results.get("burst") or {}).get("outputs_match", True))
    checks.append((results.get("naive") or {}).get("outputs_match"))
    return all(c is True for c in checks)
