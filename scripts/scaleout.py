#!/usr/bin/env python3
"""Scale-out figures: throughput of 1, 2 and 4 `livepred run` instances sharing the partitions
of one Redis, and the failover time after `kill -9` of an owner.

Throughput: N bars are published to `--partitions` partitions while placeholder leases hold
every partition; the instances start (each owning an equal, disjoint share of the partitions),
the placeholders are deleted at once and the clock runs until every bar has its output.
Reported: bars/s over the wall clock from the release (includes taking the leases) and over
the Redis timestamps of the first and last output entry (processing only).

Failover: instance A serves every partition, instance B (configured for all of them too)
stands by; a feeder publishes a steady bar rate on top of a warm history; A is killed with
SIGKILL; reported per partition: when B held the lease, when B's first output appeared, the
longest gap between two outputs, and B's state rebuild time. Every bar is then checked to
have exactly one output.

    python scripts/scaleout.py                          # Redis at 127.0.0.1:6379/0
    python scripts/scaleout.py --instances 1,2 --bars 40000 --json scaleout.json

Keys live under a random prefix and are deleted at the end. One LightGBM family (the six
standard features) is trained in a temporary directory first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from daemon.client import BarPublisher  # noqa: E402
from daemon.wire_events import decode_prediction  # noqa: E402
from tests import scaleout_support as sx  # noqa: E402

HOLD_TOKEN = "scaleout-placeholder:0"
START_TIMEOUT_S = 120.0


def _split(partitions: int, instances: int) -> list[list[int]]:
    return [[p for p in range(partitions) if p % instances == i] for i in range(instances)]


async def _wait_running(instances: list[sx.Instance], timeout_s: float) -> None:
    async def running() -> bool:
        return all(any(e.get("event") == "livepred running" for e in i.events())
                   for i in instances)

    await sx.wait_until(running, timeout_s, "instances to start", instances, poll_s=0.1)


async def _cleanup(redis: Any, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


async def throughput(args: argparse.Namespace, work: Path, base: Path, count: int) -> dict:
    names = sx.Names(f"scaleout:{uuid.uuid4().hex[:8]}:")
    redis = aioredis.Redis.from_url(args.redis_url, socket_timeout=30)
    instances: list[sx.Instance] = []
    try:
        await sx.create_groups(redis, names, args.partitions)
        for p in range(args.partitions):
            await redis.set(names.lease(p), HOLD_TOKEN, px=600_000)
        publisher = BarPublisher(redis, stream=names.bars, partitions=args.partitions)
        walk = sx.BarWalk(sx.symbols_for(args.partitions, args.symbols // args.partitions))
        steps = max(1, args.bars // len(walk.symbols))
        for _ in range(steps):
            await publisher.publish_many(walk.step())
        total = publisher.published
        for i, owned in enumerate(_split(args.partitions, count)):
            name = f"t{count}-{i}"
            stem = f"{names.prefix.split(':')[1]}-{name}"  # a fresh log per run
            config = sx.write_config(
                work / f"{stem}.toml", redis_url=args.redis_url, names=names, consumer=name,
                run_root=base, partitions=args.partitions, owned=owned,
                lease_ms=args.lease_ms, batch=args.batch,
            )
            instances.append(sx.Instance(name, config, work / f"{stem}.log").start())
        await _wait_running(instances, START_TIMEOUT_S)
        await asyncio.sleep(0.5)  # every worker has polled its (held) lease once
        released = time.monotonic()
        await redis.delete(*(names.lease(p) for p in range(args.partitions)))

        async def done() -> bool:
            return await sx.count_outputs(redis, names, args.partitions) >= total

        await sx.wait_until(done, 600.0, f"{total} outputs", instances, poll_s=0.02)
        wall_s = time.monotonic() - released
        first_ms, last_ms = [], []
        for p in range(args.partitions):
            head = await redis.xrange(names.output_key(p), count=1)
            tail = await redis.xrevrange(names.output_key(p), count=1)
            first_ms.append(sx.id_ms(head[0][0].decode()))
            last_ms.append(sx.id_ms(tail[0][0].decode()))
        span_s = max(1e-3, (max(last_ms) - min(first_ms)) / 1000)
        return {
            "instances": count,
            "bars": total,
            "wall_s": round(wall_s, 3),
            "bars_per_s_wall": round(total / wall_s),
            "processing_s": round(span_s, 3),
            "bars_per_s": round(total / span_s),
        }
    finally:
        sx.stop_all(instances)
        await _cleanup(redis, names.prefix)
        await redis.aclose()


async def failover(args: argparse.Namespace, work: Path, base: Path) -> dict:
    names = sx.Names(f"scaleout:{uuid.uuid4().hex[:8]}:")
    redis = aioredis.Redis.from_url(args.redis_url, socket_timeout=30)
    runs = {n: sx.copy_run(base, work / f"run-{n}", f"run-{n}") for n in ("fa", "fb")}
    instances: list[sx.Instance] = []
    published: dict[str, tuple[str, int]] = {}
    try:
        await sx.create_groups(redis, names, args.partitions)
        publisher = BarPublisher(redis, stream=names.bars, partitions=args.partitions)
        walk = sx.BarWalk(sx.symbols_for(args.partitions, args.symbols // args.partitions))

        async def publish_step() -> None:
            step = walk.step()
            ids = await publisher.publish_many(step)
            for bar, entry_id in zip(step, ids, strict=True):
                published[f"{publisher.stream_for(bar['symbol'])}/{entry_id}"] = (
                    bar["symbol"], bar["ts"])

        for name in ("fa", "fb"):
            config = sx.write_config(
                work / f"{name}.toml", redis_url=args.redis_url, names=names, consumer=name,
                run_root=runs[name], partitions=args.partitions, lease_ms=args.lease_ms,
                batch=args.batch,
            )
            instances.append(sx.Instance(name, config, work / f"{name}.log"))
        a, b = instances

        async def held_by(consumer: str) -> bool:
            holders = await sx.lease_holders(redis, names, args.partitions)
            return all(sx.holder_consumer(t) == consumer for t in holders.values())

        a.start()
        await sx.wait_until(lambda: held_by("fa"), START_TIMEOUT_S, "A's leases", [a])
        b.start()
        await _wait_running([a, b], START_TIMEOUT_S)
        for _ in range(args.history):  # a warm history: the standby rebuilds it on takeover
            await publish_step()

        async def caught_up() -> bool:
            return await sx.count_outputs(redis, names, args.partitions) >= len(published)

        await sx.wait_until(caught_up, 300.0, "A to catch up", [a, b], poll_s=0.05)
        step_s = len(walk.symbols) / args.rate
        stop = asyncio.Event()

        async def feed() -> None:
            next_at = time.monotonic()
            while not stop.is_set():
                await publish_step()
                next_at += step_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(2.0)
        killed = time.monotonic()
        killed_ms = int(time.time() * 1000)
        a.kill()
        took: dict[int, float] = {}
        served: dict[int, float] = {}
        deadline = killed + 30 * args.lease_ms / 1000 + 30
        while len(served) < args.partitions and time.monotonic() < deadline:
            now = time.monotonic() - killed
            holders = await sx.lease_holders(redis, names, args.partitions)
            for p, token in holders.items():
                if p not in took and sx.holder_consumer(token) == "fb":
                    took[p] = now
                if p in took and p not in served:
                    last = await redis.xrevrange(names.output_key(p), count=1)
                    if last and decode_prediction(last[0][1]).run == "run-fb":
                        served[p] = now
            await asyncio.sleep(0.005)
        await asyncio.sleep(2.0)
        stop.set()
        await feeder
        await sx.wait_until(caught_up, 300.0, "every output", [b], poll_s=0.05)
        await asyncio.sleep(0.5)
        outputs = await sx.read_outputs(redis, names, args.partitions)
        srcs = [e.src for rows in outputs.values() for _, e in rows]
        gaps = {}
        for p, rows in outputs.items():
            ids = [sx.id_ms(i) for i, _ in rows if sx.id_ms(i) >= killed_ms - 1000]
            gaps[p] = max((b2 - b1 for b1, b2 in zip(ids, ids[1:], strict=False)), default=0)
        rebuilt = {e["partition"]: e["seconds"] for e in b.events()
                   if e.get("event") == "state rebuilt"}
        return {
            "lease_ms": args.lease_ms,
            "partitions": args.partitions,
            "feed_bars_per_s": args.rate,
            "history_bars_per_symbol": args.history,
            "lease_taken_s": {p: round(v, 3) for p, v in sorted(took.items())},
            "first_output_s": {p: round(v, 3) for p, v in sorted(served.items())},
            "max_output_gap_ms": gaps,
            "rebuild_s": {p: rebuilt.get(p) for p in range(args.partitions)},
            "bars": len(published),
            "missing": len(set(published) - set(srcs)),
            "duplicates": len(srcs) - len(set(srcs)),
        }
    finally:
        sx.stop_all(instances)
        await _cleanup(redis, names.prefix)
        await redis.aclose()


async def main_async(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="livepred-scaleout-"))
    try:
        base = sx.write_run(work / "run", run_id="scaleout")
        results: dict[str, Any] = {"throughput": [], "failover": None, "median_bars_per_s": {}}
        counts = [int(x) for x in args.instances.split(",")]
        samples: dict[int, list[int]] = {c: [] for c in counts}
        # Interleaved repeats: a neighbour's load burst hits every instance count alike.
        for _ in range(args.repeat):
            for count in counts:
                row = await throughput(args, work, base, count)
                results["throughput"].append(row)
                samples[count].append(row["bars_per_s"])
                print(f"{count} instance(s): {row['bars']} bars, {row['bars_per_s']} bars/s "
                      f"processing ({row['processing_s']}s), {row['bars_per_s_wall']} bars/s "
                      f"wall ({row['wall_s']}s)", flush=True)
        for count, values in samples.items():
            results["median_bars_per_s"][count] = int(statistics.median(values))
        if args.repeat > 1:
            print("median bars/s: " + ", ".join(
                f"{c} instance(s) {v}" for c, v in results["median_bars_per_s"].items()))
        if not args.no_failover:
            result = await failover(args, work, base)
            results["failover"] = result
            print(f"failover after kill -9 (lease_ms={result['lease_ms']}): lease taken "
                  f"{result['lease_taken_s']} s, first output {result['first_output_s']} s, "
                  f"rebuild {result['rebuild_s']} s, longest output gap "
                  f"{result['max_output_gap_ms']} ms; {result['bars']} bars, "
                  f"{result['missing']} missing, {result['duplicates']} duplicated", flush=True)
        return results
    finally:
        if args.keep:
            print(f"configs and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--instances", default="1,2,4", help="instance counts to measure")
    parser.add_argument("--bars", type=int, default=60_000, help="bars per throughput run")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per count")
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512, help="streams.batch")
    parser.add_argument("--lease-ms", type=int, default=1000, help="streams.lease_ms")
    parser.add_argument("--rate", type=int, default=2000, help="failover feed, bars/s")
    parser.add_argument("--history", type=int, default=256, help="failover warm-up bars/symbol")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the configs and logs")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
