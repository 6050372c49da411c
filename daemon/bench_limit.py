"""The Redis limit: a passthrough consumer that reads, publishes one output per input and acks
in the daemon's own atomic write, with no decode and no models; its drain rate and round trip
are the ceiling the daemon is measured against. Also the helpers both scenarios share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from daemon.bench_latency import latencies_ms, server_split_ms
from daemon.bench_procs import Feeder, Reader
from daemon.entries import Commit, EntryBatch
from daemon.streams import StreamIO

WARMUP_FRACTION = 0.1  # the first 10% of every measured feed is excluded (warm-up)


def percentiles_ms(values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p999_ms": float("nan")}
    p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999)}


async def delete_prefixed(redis: Any, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start : start + 500])


def split_percentiles(fed: dict[str, Any], seen: dict[str, Any]) -> dict[str, float]:
    """p50 and p99 of the latency's two parts by Redis's clock (`server_split_ms`), warm-up
    excluded: input XADD -> output XADD ("inside"), output XADD -> seen ("reader")."""
    inside, reader = server_split_ms(fed["ids"], seen["ids"], seen["out_ids"], seen["seen_us"])
    skip = int(len(inside) * WARMUP_FRACTION)
    out: dict[str, float] = {}
    for name, values in (("inside", inside[skip:]), ("reader", reader[skip:])):
        pc = percentiles_ms(values)
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = pc["p50_ms"], pc["p99_ms"]
    return out


def sample(values: np.ndarray, n: int) -> list[float]:
    v = np.sort(values[np.isfinite(values)])
    if v.size <= n:
        return [float(x) for x in v]
    return [float(x) for x in v[np.linspace(0, v.size - 1, n).astype(np.int64)]]


async def _read_plain(io: StreamIO, count: int, block_ms: int) -> EntryBatch:
    reply = await io.redis.xreadgroup(
        io.group, io.consumer, dict.fromkeys(io.inputs, ">"), count=count, block=block_ms
    )
    items = reply.items() if isinstance(reply, dict) else (reply or [])
    out = EntryBatch()
    for stream, rows in items:
        if rows and isinstance(rows[0], list) and rows[0] and isinstance(rows[0][0], list):
            rows = rows[0]  # RESP3 wraps a stream's entries once more
        name = stream.decode() if isinstance(stream, bytes) else stream
        out.streams += [name] * len(rows)
        out.ids += [i.decode() for i, _ in rows]
        out.fields += [f for _, f in rows]
    return out


async def _passthrough(
    io: StreamIO, token: str, batch: int, fenced: bool, stop: asyncio.Event,
    counter: Callable[[int], None],
) -> None:
    """Read a batch, publish one output per entry and ack, in the daemon's atomic write (the
    same script); the next read overlaps the write, as in the daemon. No decode, no models.
    `fenced`: read through the daemon's own lease-checked read instead of plain XREADGROUP."""
    pack = msgpack.Packer(use_bin_type=True).pack

    async def read() -> EntryBatch:
        if fenced:
            return await io.read_new(token, batch, 20) or EntryBatch()
        return await _read_plain(io, batch, 20)

    next_read: asyncio.Task[EntryBatch] | None = asyncio.create_task(read())
    while next_read is not None:
        entries = await next_read
        next_read = None if stop.is_set() else asyncio.create_task(read())
        if not entries:
            continue
        commit = Commit(outputs=[], dead=[], acks=entries.acks())
        for stream, entry_id in zip(entries.streams, entries.ids, strict=True):
            commit.outputs.append((b"-", pack({"v": 1, "src": f"{stream}/{entry_id}"})))
        await io.commit(token, commit)
        counter(len(entries))


@dataclass
class PassthroughRun:
    io: StreamIO
    token: str
    fenced: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: int = 0
    marks: list[tuple[int, float]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def count(self, n: int) -> None:
        self.done += n
        self.marks.append((self.done, time.perf_counter()))

    async def start(self) -> None:
        await self.io.acquire_lease(self.token, 60_000)
        self.task = asyncio.create_task(
            _passthrough(self.io, self.token, 512, self.fenced, self.stop, self.count)
        )

    async def wait_for(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.done < n:
            if self.task is not None and self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise TimeoutError(f"passthrough: {self.done}/{n} entries after {timeout_s:.0f} s")
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


def stream_io(redis: Any, prefix: str) -> StreamIO:
    return StreamIO(
        redis, inputs=[f"{prefix}bars"], output=f"{prefix}predictions",
        dead_letter=f"{prefix}bars:dead", group=f"{prefix}g", consumer="bench",
        lease_key=f"{prefix}g:lease", output_maxlen=1_000_000,
    )


def drain_rate(marks: list[tuple[int, float]], start: float, total: int) -> float:
    """Bars per second after the warm-up fraction: from the batch that crossed it to the end."""
    skip = int(total * WARMUP_FRACTION)
    first = next(((n, t) for n, t in marks if n >= skip), (0, start)) if skip else (0, start)
    last = next((n, t) for n, t in marks if n >= total)
    return (last[0] - first[0]) / max(last[1] - first[1], 1e-9)


async def passthrough_drain(
    redis: Any, feeder: Feeder, p: str, backlog: int, seed: int, fenced: bool
) -> float:
    feeder.market(p, 1000, seed=seed)
    await asyncio.to_thread(feeder.backlog, p, f"{p}bars", backlog)
    await redis.xgroup_create(f"{p}bars", f"{p}g", id="0", mkstream=True)
    run = PassthroughRun(stream_io(redis, p), token="bench", fenced=fenced)
    started = time.perf_counter()
    await run.start()
    await run.wait_for(backlog, timeout_s=120)
    await run.close()
    await delete_prefixed(redis, p)
    return drain_rate(run.marks, started, backlog)


async def passthrough_latency(
    redis: Any, feeder: Feeder, reader: Reader, p: str, rate: float, seconds: float,
    single: bool, fenced: bool,
) -> dict[str, Any]:
    feeder.market(p, 1000, seed=7)
    await redis.xgroup_create(f"{p}bars", f"{p}g", id="$", mkstream=True)
    run = PassthroughRun(stream_io(redis, p), token="bench", fenced=fenced)
    await run.start()
    await asyncio.to_thread(reader.start, f"{p}predictions")
    fed = await asyncio.to_thread(feeder.paced, p, f"{p}bars", rate, seconds, single)
    await run.wait_for(len(fed["ids"]), timeout_s=60)
    seen = await asyncio.to_thread(reader.stop)
    await run.close()
    await delete_prefixed(redis, p)
    lat, missing = latencies_ms(fed["ids"], fed["sent_us"], seen["ids"], seen["seen_us"])
    lat = lat[int(len(lat) * WARMUP_FRACTION) :]
    return {"rate": rate, "bars": len(fed["ids"]), "missing": missing, **percentiles_ms(lat),
            "split": split_percentiles(fed, seen), "latency_sample_ms": sample(lat, 4000)}


async def redis_limit(
    redis: Any, feeder: Feeder, reader: Reader, prefix: str, *, backlog: int, repeats: int,
    rtt_seconds: float,
) -> dict[str, Any]:
    """The passthrough's drain rate (median over repeats; plain XREADGROUP reads, and the
    daemon's lease-fenced reads) and its round trip for one bar at a time."""
    plain: list[float] = []
    fenced: list[float] = []
    for r in range(repeats):
        plain.append(await passthrough_drain(redis, feeder, f"{prefix}lim{r}:", backlog, r, False))
        fenced.append(await passthrough_drain(redis, feeder, f"{prefix}limf{r}:", backlog, r, True))
    rtt = await passthrough_latency(
        redis, feeder, reader, f"{prefix}rtt:", 200.0, rtt_seconds, single=True, fenced=False
    )
    rtt_fenced = await passthrough_latency(
        redis, feeder, reader, f"{prefix}rttf:", 200.0, rtt_seconds, single=True, fenced=True
    )
    return {
        "bars_per_s": float(np.median(plain)), "bars_per_s_runs": plain,
        "fenced_bars_per_s": float(np.median(fenced)), "fenced_bars_per_s_runs": fenced,
        "backlog": backlog, "rtt": rtt, "rtt_fenced": rtt_fenced,
    }


async def passthrough_at(
    redis: Any, feeder: Feeder, reader: Reader, prefix: str, rate: float, seconds: float
) -> dict[str, Any]:
    """The passthrough's latency at a given (moderate) rate, to set beside the daemon's."""
    return await passthrough_latency(
        redis, feeder, reader, f"{prefix}mod:", rate, seconds, single=False, fenced=False
    )
