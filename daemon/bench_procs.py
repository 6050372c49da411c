"""The benchmark's other processes: a feeder that publishes bars and a reader that timestamps
outputs as they become visible. Each is a long-lived child process driven over a pipe, as
feeders and strategies are separate processes in production.

Spawned (not forked): the parent has TensorFlow and torch thread pools that must not be
copied. This module imports only numpy, msgpack, redis and the demo market's constants at the top.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from daemon.demo_market import BAR_MS, BASE_TS_MS  # event time of every symbol's first bar

PIPELINE_CHUNK = 1000  # XADDs per round trip when publishing as fast as possible
CHILD_START_TIMEOUT_S = 60.0


def now_us() -> int:
    return time.time_ns() // 1000


def symbol_names(count: int, tag: str = "B") -> list[str]:
    return [f"{tag}{i:05d}" for i in range(count)]


def input_id(src: str) -> str:
    """The input entry id of an output's `src` ("<stream>/<id>": the stream may hold '/')."""
    return src.rpartition("/")[2]


# ---- the market the feeder publishes ---------------------------------------------------------


class Market:
    """Seeded random-walk bars for a fixed list of symbols, handed out round-robin.

    Every symbol's bars are one minute apart in event time, so any slice of the round-robin
    order is a valid, in-order feed; the same seed gives the same bars.
    """

    def __init__(self, names: Sequence[str], seed: int) -> None:
        self.names = list(names)
        self.rng = np.random.default_rng(seed)
        self.log_close = np.log(self.rng.uniform(20.0, 400.0, len(self.names)))
        self.next_bar = np.zeros(len(self.names), dtype=np.int64)
        self.cursor = 0  # the next symbol in round-robin order
        self.packer = msgpack.Packer(use_bin_type=True)

    def take(self, count: int, symbols: int | None = None) -> list[tuple[str, bytes]]:
        """The next `count` bars round-robin over the first `symbols` symbols (all: None):
        (symbol, msgpack `data` field) pairs in the CONTRACT's wire format."""
        n = len(self.names) if symbols is None else symbols
        order = (self.cursor + np.arange(count)) % n
        self.cursor = int((self.cursor + count) % n) if symbols is None else self.cursor
        steps = self.rng.normal(0.0, 0.002, count)
        spread = 1.0 + np.abs(self.rng.normal(0.0, 0.0008, (count, 2)))
        volumes = self.rng.integers(100, 5000, count)
        out: list[tuple[str, bytes]] = []
        pack = self.packer.pack
        log_close, next_bar, names = self.log_close, self.next_bar, self.names
        for k, j in enumerate(order.tolist()):
            opened = float(np.exp(log_close[j]))
            log_close[j] += steps[k]
            close = float(np.exp(log_close[j]))
            ts = BASE_TS_MS + int(next_bar[j]) * BAR_MS
            next_bar[j] += 1
            bar = {
                "symbol": names[j], "ts": ts, "open": opened,
                "high": max(opened, close) * float(spread[k, 0]),
                "low": min(opened, close) / float(spread[k, 1]),
                "close": close, "volume": float(volumes[k]),
            }
            out.append((names[j], pack(bar)))
        return out

    def round_of(self, symbols: int) -> list[tuple[str, bytes]]:
        """One bar for each of the first `symbols` symbols (a minute boundary)."""
        return self.take(symbols, symbols=symbols)


# ---- the feeder process ----------------------------------------------------------------------


@contextlib.contextmanager
def _no_collector() -> Iterator[None]:
    """While a child timestamps, CPython's cyclic collector stays off: a full collection in
    the reader paused it for ~120 ms once per run on a 2-CPU box, which showed up as the
    p99 of every latency measured (the passthrough's included). Nothing the children make
    while timing has cycles; it is freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _publish(client: Any, stream: str, bars: list[tuple[str, bytes]]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(bars), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for _, data in bars[start : start + PIPELINE_CHUNK]:
            pipe.xadd(stream, {"data": data})
        ids.extend(i.decode() for i in pipe.execute())
    return ids


def _paced(
    client: Any, market: Market, stream: str, rate: float, seconds: float, single: bool
) -> dict[str, Any]:
    """`rate` bars/s for `seconds`, each due bar sent as soon as it is due (one pipeline per
    tick); records each bar's send time. `single`: one XADD per round trip, never batched.
    The bars are made before the clock starts: a feeder's cost is its XADDs, not our walk."""
    ready = market.take(int(rate * seconds) + 1)
    with _no_collector():
        return _send_paced(client, ready, stream, rate, single)


def _send_paced(
    client: Any, ready: list[tuple[str, bytes]], stream: str, rate: float, single: bool
) -> dict[str, Any]:
    ids: list[str] = []
    sent: list[int] = []
    started = time.perf_counter()
    published = 0
    while published < len(ready):  # every bar made is sent: no gap in any symbol's bars
        elapsed = time.perf_counter() - started
        due = min(int(elapsed * rate) + 1 - published, 1 if single else 2000)
        if due > 0:
            bars = ready[published : published + due]
            due = len(bars)
            pipe = client.pipeline(transaction=False)
            for _, data in bars:
                pipe.xadd(stream, {"data": data})
            sent_us = now_us()
            replies = pipe.execute()
            ids.extend(i.decode() for i in replies)
            sent.extend([sent_us] * len(replies))
            published += due
        wait_s = started + published / rate - time.perf_counter()
        if wait_s > 0:
            time.sleep(min(wait_s, 0.05))
    return {"ids": ids, "sent_us": sent, "seconds": time.perf_counter() - started}


def _feeder_main(conn: Any, redis_url: str) -> None:
    import redis

    client: Any = redis.Redis.from_url(redis_url)  # replies used untyped, as parsed
    markets: dict[str, Market] = {}
    conn.send(("ready", None))
    while True:
        try:
            op, job = conn.recv()
        except EOFError:
            return
        try:
            if op == "exit":
                conn.send(("ok", None))
                return
            if op == "market":
                markets[job["name"]] = Market(symbol_names(job["symbols"], job["tag"]), job["seed"])
                result: Any = None
            elif op == "backlog":
                market = markets[job["market"]]
                bars = market.take(job["bars"])
                result = {"ids": _publish(client, job["stream"], bars)}
            elif op == "paced":
                result = _paced(
                    client, markets[job["market"]], job["stream"], job["rate"], job["seconds"],
                    job.get("single", False),
                )
            elif op == "burst":
                bars = markets[job["market"]].round_of(job["symbols"])
                pipe = client.pipeline(transaction=False)
                for _, data in bars:
                    pipe.xadd(job["stream"], {"data": data})
                first_us = now_us()
                replies = pipe.execute()
                result = {
                    "ids": [i.decode() for i in replies], "first_us": first_us,
                    "written_us": now_us(),
                }
            else:
                raise ValueError(f"unknown feeder op {op!r}")
            conn.send(("ok", result))
        except Exception as exc:  # report to the parent, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ---- the reader process ----------------------------------------------------------------------


def _reader_main(conn: Any, redis_url: str) -> None:
    """On "start": XREAD the output stream from the given id, keeping each reply's arrival
    time; on "stop": decode (after the clock stops mattering) and send the seen times."""
    import redis

    client: Any = redis.Redis.from_url(redis_url)  # replies used untyped, as parsed
    conn.send(("ready", None))
    while True:
        try:
            op, job = conn.recv()
        except EOFError:
            return
        if op == "exit":
            conn.send(("ok", None))
            return
        try:
            stream, last = job["stream"], job["after"]
            if last == "$":  # pin it: "$" in a loop would skip entries added between reads
                newest = client.xrevrange(stream, count=1)
                last = newest[0][0] if newest else "0-0"
            replies: list[tuple[int, list[Any]]] = []
            with _no_collector():
                conn.send(("ok", None))
                while not conn.poll(0):
                    reply = client.xread({stream: last}, count=5000, block=20)
                    if reply:
                        seen = now_us()
                        rows = reply[0][1]
                        last = rows[-1][0]
                        replies.append((seen, rows))
                conn.recv()  # "stop"
            # Entries still in flight when stop came: one last non-blocking read.
            while True:
                reply = client.xread({stream: last}, count=5000)
                if not reply:
                    break
                rows = reply[0][1]
                last = rows[-1][0]
                replies.append((now_us(), rows))
            srcs: list[str] = []
            seen_us: list[int] = []
            out_ids: list[str] = []
            for seen, rows in replies:
                for out_id, fields in rows:
                    data = msgpack.unpackb(fields[b"data"], raw=False)
                    srcs.append(input_id(str(data.get("src", ""))))
                    seen_us.append(seen)
                    out_ids.append(_s(out_id))
            conn.send((
                "ok", {"ids": srcs, "seen_us": seen_us, "out_ids": out_ids, "last": _s(last)}
            ))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- the parent's handles --------------------------------------------------------------------


class ChildError(RuntimeError):
    """A feeder or reader job failed in the child process."""


@dataclass
class Child:
    """A spawned child process and its end of the pipe; `call` is blocking (run it off the
    event loop while the daemon runs)."""

    process: Any
    conn: Any

    @classmethod
    def spawn(cls, target: Any, redis_url: str, name: str) -> Child:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=target, args=(child, redis_url), name=name, daemon=True)
        process.start()
        child.close()
        if not parent.poll(CHILD_START_TIMEOUT_S):
            process.kill()
            raise ChildError(f"{name} process did not start")
        parent.recv()
        return cls(process, parent)

    def call(self, op: str, job: dict[str, Any] | None = None) -> Any:
        self.conn.send((op, job or {}))
        return self._reply()

    def send(self, op: str, job: dict[str, Any] | None = None) -> None:
        self.conn.send((op, job or {}))

    def _reply(self) -> Any:
        status, result = self.conn.recv()
        if status != "ok":
            raise ChildError(str(result))
        return result

    def close(self) -> None:
        try:
            self.conn.send(("exit", {}))
            if self.conn.poll(5):
                self.conn.recv()
        except (OSError, EOFError, BrokenPipeError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class Feeder:
    """The feeder process: markets by name, backlog / paced / burst publishing."""

    def __init__(self, redis_url: str) -> None:
        self.child = Child.spawn(_feeder_main, redis_url, "livepred-bench-feeder")

    def market(self, name: str, symbols: int, seed: int, tag: str = "B") -> None:
        self.child.call("market", {"name": name, "symbols": symbols, "seed": seed, "tag": tag})

    def backlog(self, market: str, stream: str, bars: int) -> list[str]:
        result = self.child.call("backlog", {"market": market, "stream": stream, "bars": bars})
        return list(result["ids"])

    def paced(
        self, market: str, stream: str, rate: float, seconds: float, single: bool = False
    ) -> dict[str, Any]:
        return dict(self.child.call(
            "paced",
            {"market": market, "stream": stream, "rate": rate, "seconds": seconds,
             "single": single},
        ))

    def burst(self, market: str, stream: str, symbols: int) -> dict[str, Any]:
        return dict(
            self.child.call("burst", {"market": market, "stream": stream, "symbols": symbols})
        )

    def close(self) -> None:
        self.child.close()


class Reader:
    """The strategy-side process: timestamps every output entry when it becomes visible."""

    def __init__(self, redis_url: str) -> None:
        self.child = Child.spawn(_reader_main, redis_url, "livepred-bench-reader")

    def start(self, stream: str, after: str = "$") -> None:
        self.child.call("start", {"stream": stream, "after": after})

    def stop(self) -> dict[str, Any]:
        self.child.send("stop")
        return dict(self.child._reply())

    def close(self) -> None:
        self.child.close()
