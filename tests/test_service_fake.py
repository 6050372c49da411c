"""The daemon loop on fakeredis: outputs, dead letters, acks, duplicates, recovery of pending."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import fakeredis
import lightgbm as lgb
import msgpack
import numpy as np
import pandas as pd
import pytest

from daemon import overlap
from daemon import worker as worker_module
from daemon.observe import Metrics
from daemon.service import Service
from daemon.settings import load_settings
from daemon.wire import encode_bar
from daemon.wire_events import decode_prediction
from handlers.features import FeatureBuilder
from tests import model_factory as mf

FEATURES = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
MIN = 60_000


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(FEATURES)))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = np.nan_to_num(X[:, 0]) * 0.5 + rng.normal(0, 0.1, 400)
    mf.write_lightgbm(root, "fwd", "LightGBM", X, y, FEATURES)
    mf.write_routing(root, "fwd", "LightGBM")
    mf.write_manifest(root, run_id="fake-run")
    return root


def settings_for(run: Path, **env: str):
    environ = {
        "LIVEPRED_MODELS__RUN_ROOT": str(run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "20",
        "LIVEPRED_STREAMS__CONSUMER": "test-consumer",
        **env,
    }
    return load_settings(None, environ)


def walk_bars(symbols: list[str], n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    bars = []
    closes = {s: 100.0 * (i + 1) for i, s in enumerate(symbols)}
    for t in range(1, n + 1):
        for s in symbols:
            closes[s] *= float(np.exp(rng.normal(0, 0.01)))
            c = closes[s]
            bars.append(
                {"symbol": s, "ts": t * MIN, "open": c, "high": c, "low": c, "close": c,
                 "volume": 1000.0}
            )
    return bars


async def run_until(service: Service, redis, predicate, timeout_s: float = 20.0) -> None:
    task = asyncio.create_task(service.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await predicate(redis):
            if task.done():
                task.result()
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for output"
            await asyncio.sleep(0.02)
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0


def expected_lgb(run: Path, bars: list[dict]) -> dict[tuple[str, int], float]:
    booster = lgb.Booster(
        model_file=str(mf.family_dir(run, "fwd", "LightGBM") / "model.txt")
    )
    out = {}
    frame = pd.DataFrame(bars)
    for symbol, g in frame.groupby("symbol", sort=False):
        builder = FeatureBuilder(FEATURES)
        full = builder.build_frame(g.reset_index(drop=True))
        preds = booster.predict(full.to_numpy(dtype=np.float32).astype(np.float64))
        for ts, p in zip(g["ts"], preds, strict=True):
            out[(symbol, int(ts))] = float(p)
    return out


async def test_every_bar_gets_one_output_equal_to_the_framework(lgb_run: Path) -> None:
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()  # creates the group at $: bars from now on are live
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB", "CCC"], 40)
    for b in bars:
        await redis.xadd("bars", encode_bar(b))
    # Malformed input of every kind, a duplicate, and an out-of-order bar.
    await redis.xadd("bars", {"data": b"\xc1not msgpack"})
    await redis.xadd("bars", {"data": msgpack.packb({"symbol": "AAA", "ts": 1})})
    await redis.xadd("bars", {"data": msgpack.packb({**bars[-1], "close": -1.0, "ts": 10**9})})
    await redis.xadd("bars", encode_bar(bars[-1]))  # duplicate of the last CCC bar
    await redis.xadd("bars", encode_bar({**bars[0], "ts": MIN // 2}))  # AAA out of order
    flat = {"symbol": "DDD", "ts": str(MIN), "open": "1", "high": "1", "low": "1", "close": "1",
            "volume": "5"}
    await redis.xadd("bars", flat)

    async def done(r) -> bool:
        return await r.xlen("predictions") >= len(bars) + 1 and await r.xlen("bars:dead") >= 4

    await run_until(service, redis, done)
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert len(outputs) == len(bars) + 1
    assert len({o.src for o in outputs}) == len(outputs)
    expected = expected_lgb(lgb_run, bars)
    for o in outputs:
        assert o.run == "fake-run"
        t = o.targets["fwd"]
        assert t.selected == "LightGBM"
        if o.symbol == "DDD":
            continue
        assert t.preds["LightGBM"] == pytest.approx(expected[(o.symbol, o.ts)], rel=1e-6, abs=1e-9)
        assert t.pred == t.preds["LightGBM"]
    dead = await redis.xrange("bars:dead")
    reasons = sorted(f[b"error"].decode() for _, f in dead)
    assert reasons == ["bad_value:close", "decode_error", "missing_field:open", "out_of_order"]
    for _, f in dead:
        assert f[b"src_stream"] == b"bars" and f[b"src_id"]
    assert (await redis.xpending("bars", "livepred"))["pending"] == 0
    # The computing thread's CPU time: some, and no more than the wall time of the stages it
    # spans (a process-wide clock would count the event loop's thread too).
    registry = service.metrics.registry
    cpu = registry.get_sample_value("livepred_compute_cpu_seconds_total")
    wall = sum(
        registry.get_sample_value("livepred_stage_seconds_sum", {"stage": stage}) or 0.0
        for stage in ("decode", "state+models", "encode")
    )
    assert cpu is not None and 0 < cpu <= wall * 1.1 + 0.005
    await redis.aclose()


async def test_pending_entries_of_a_crashed_consumer_are_processed_once(lgb_run: Path) -> None:
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB"], 30, seed=5)
    for b in bars[:20]:
        await redis.xadd("bars", encode_bar(b))
    # A consumer that died after reading: its entries are pending, nothing was published.
    await redis.xreadgroup("livepred", "dead-consumer", {"bars": ">"}, count=20)
    for b in bars[20:]:
        await redis.xadd("bars", encode_bar(b))
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()

    async def done(r) -> bool:
        return await r.xlen("predictions") >= len(bars)

    await run_until(service, redis, done)
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert len(outputs) == len(bars)
    expected = expected_lgb(lgb_run, bars)
    for o in outputs:
        got = o.targets["fwd"].preds["LightGBM"]
        assert got == pytest.approx(expected[(o.symbol, o.ts)], rel=1e-6, abs=1e-9)
    assert (await redis.xpending("bars", "livepred"))["pending"] == 0
    await redis.aclose()


async def test_restart_rebuilds_state_from_acknowledged_history(lgb_run: Path) -> None:
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB"], 40, seed=9)
    first, second = bars[:50], bars[50:]
    for b in first:
        await redis.xadd("bars", encode_bar(b))
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    await run_until(service, redis, lambda r: _xlen_at_least(r, len(first)))
    for b in second:
        await redis.xadd("bars", encode_bar(b))
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars)))
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    expected = expected_lgb(lgb_run, bars)
    assert len(outputs) == len(bars)
    for o in outputs:
        got = o.targets["fwd"].preds["LightGBM"]
        assert got == pytest.approx(expected[(o.symbol, o.ts)], rel=1e-6, abs=1e-9)
    await redis.aclose()


async def test_a_rebuild_counts_each_chunk_as_progress(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stall clock (the watchdog) covers a rebuild too: each chunk read or applied moves
    # it, so a long rebuild is not taken for a hung one.
    from daemon import rebuild as rebuild_module
    from daemon.worker import PartitionWorker

    redis, bars = await _served_history(lgb_run, 40)
    monkeypatch.setattr(rebuild_module, "REBUILD_CHUNK", 7)
    calls: list[str] = []
    real = PartitionWorker._progressed

    def counted(self: PartitionWorker) -> None:
        calls.append(str(self.role))
        real(self)

    monkeypatch.setattr(PartitionWorker, "_progressed", counted)
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars)))
    assert calls.count("rebuilding") >= len(bars) // 7
    await redis.aclose()


async def test_a_restart_that_read_a_long_history_to_little_use_says_to_trim_it(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restart reads the input stream's whole retained history (an old entry can still move
    # the live run's clock): an untrimmed stream makes every restart slower, unseen.
    from structlog.testing import capture_logs

    from daemon import worker as worker_module

    monkeypatch.setattr(worker_module, "UNTRIMMED_HINT_ENTRIES", 100)
    monkeypatch.setattr(worker_module, "UNTRIMMED_HINT_S", 0.0)
    redis, bars = await _served_history(lgb_run, 150)
    for warmup, hinted in (("30", True), ("256", False)):  # 300 read: 60 used / all used
        service = Service(settings_for(lgb_run, LIVEPRED_STATE__WARMUP_BARS=warmup),
                          redis=redis)
        await service.start()
        with capture_logs() as logs:
            await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars)))
        rebuilt = [e for e in logs if e["event"] == "state rebuilt"]
        assert rebuilt and rebuilt[0]["entries_read"] == len(bars)
        hints = [e for e in logs if e["event"].startswith("the restart read the input stream")]
        assert bool(hints) is hinted, (warmup, rebuilt)
    await redis.aclose()


async def _served_history(run: Path, ticks: int) -> tuple[Any, list[dict]]:
    """fakeredis holding two symbols' `ticks` bars, each served once (the history of a
    restart)."""
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB"], ticks, seed=9)
    for b in bars:
        await redis.xadd("bars", encode_bar(b))
    service = Service(settings_for(run), redis=redis)
    await service.start()
    await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars)))
    return redis, bars


async def _xlen_at_least(r, n: int) -> bool:
    return await r.xlen("predictions") >= n


async def test_a_second_instance_stands_by_while_the_lease_is_held(lgb_run: Path) -> None:
    redis = fakeredis.FakeAsyncRedis()
    await redis.set("livepred:lease", "someone-else", px=60_000)
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    await redis.xadd("bars", encode_bar(walk_bars(["AAA"], 1)[0]))
    assert await service.ready() == "starting: the partition"  # the lease not yet tried
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0.5)
    assert await redis.xlen("predictions") == 0
    assert service.workers[0].role == "standby"
    assert await service.ready() is None and service.roles() == "standby"
    service.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    await redis.aclose()


async def test_the_heap_is_settled_once_the_models_are_loaded_and_after_a_reload(
    lgb_run: Path,
) -> None:
    import gc

    from daemon.runtime import GC_THRESHOLD

    before = gc.get_threshold()
    try:
        gc.unfreeze()
        redis = fakeredis.FakeAsyncRedis()
        service = Service(settings_for(lgb_run), redis=redis)
        await service.start()
        loaded = service.engine
        assert gc.get_freeze_count() > 0  # the frameworks and models: out of the collector's view
        assert gc.get_threshold() == GC_THRESHOLD
        gc.unfreeze()
        assert await service.reload()
        # The old engine is retired (closed) and the heap settled again, on the executor.
        await asyncio.get_running_loop().run_in_executor(service.executor, lambda: None)
        assert service.engine is not loaded
        assert gc.get_freeze_count() > 0
        await service.close()
        await redis.aclose()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class _BatchSizes(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def batch(self, partition, report, read_at_us: int, now_us: int) -> None:
        super().batch(partition, report, read_at_us, now_us)
        self.sizes.append(report.bars)


def _slow_batches(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every batch's compute takes `seconds` longer (bars arrive while it runs)."""
    original = worker_module._run_batch_job

    def slow_job(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(worker_module, "_run_batch_job", slow_job)


async def test_reads_made_while_a_batch_computes_are_computed_together(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backlog read 4 entries at a time, with a slow compute: the reads made meanwhile join
    # into one batch of at most COALESCE_READS reads; every bar still gets one output, in
    # input order, equal to the framework's.
    _slow_batches(monkeypatch, 0.02)
    redis = fakeredis.FakeAsyncRedis()
    metrics = _BatchSizes()
    service = Service(settings_for(lgb_run, LIVEPRED_STREAMS__BATCH="4"), redis=redis,
                      metrics=metrics)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB", "CCC"], 30, seed=3)
    ids = [(await redis.xadd("bars", encode_bar(b))).decode() for b in bars]

    await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars)))
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert [o.src for o in outputs] == [f"bars/{i}" for i in ids]
    expected = expected_lgb(lgb_run, bars)
    for o in outputs:
        got = o.targets["fwd"].preds["LightGBM"]
        assert got == pytest.approx(expected[(o.symbol, o.ts)], rel=1e-6, abs=1e-9)
    assert sum(metrics.sizes) == len(bars)
    assert max(metrics.sizes) > 4  # reads joined
    assert max(metrics.sizes) <= 4 * overlap.COALESCE_READS
    assert (await redis.xpending("bars", "livepred"))["pending"] == 0
    await redis.aclose()


# ---- a reload while a batch computes ---------------------------------------------------------

FEATURES_WIDER = [*FEATURES, "ret_10d", "vol_20d"]  # other inputs: the swap rebuilds state


def _lgb_run_with(root: Path, features: list[str], run_id: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, len(features)))
    y = X[:, 0] * 0.3 + X[:, -1] * 0.2 + rng.normal(0, 0.1, 400)
    mf.write_lightgbm(root, "fwd", "LightGBM", X, y, features)
    mf.write_routing(root, "fwd", "LightGBM")
    mf.write_manifest(root, run_id=run_id)
    return root


def _expected(run: Path, features: list[str], bars: list[dict]) -> dict[tuple[str, int], float]:
    booster = lgb.Booster(model_file=str(mf.family_dir(run, "fwd", "LightGBM") / "model.txt"))
    out = {}
    for symbol, g in pd.DataFrame(bars).groupby("symbol", sort=False):
        full = FeatureBuilder(features).build_frame(g.reset_index(drop=True))
        preds = booster.predict(full.to_numpy(dtype=np.float32).astype(np.float64))
        out.update({(symbol, int(ts)): float(p) for ts, p in zip(g["ts"], preds, strict=True)})
    return out


@pytest.mark.parametrize("wider", [False, True], ids=["same-inputs", "other-inputs"])
async def test_a_batch_computing_at_a_reload_ends_on_its_models_and_the_next_on_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wider: bool
) -> None:
    # The old models are closed once retired (predicting with them then would fail): the
    # batch computing when they are swapped ends on them, every later one on the new ones
    # (on rebuilt state when they read other inputs); every bar one output, in input order.
    import threading

    run_a = _lgb_run_with(tmp_path / "a", FEATURES, "run-a", seed=1)
    features_b = FEATURES_WIDER if wider else FEATURES
    run_b = _lgb_run_with(tmp_path / "b", features_b, "run-b", seed=2)
    link = tmp_path / "current"
    link.symlink_to(run_a)
    entered, release, gate = threading.Event(), threading.Event(), {"on": False}
    original = worker_module._run_batch_job

    def gated(*args):
        if gate["on"]:
            gate["on"] = False
            entered.set()
            release.wait(10)
        return original(*args)

    monkeypatch.setattr(worker_module, "_run_batch_job", gated)
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(link), redis=redis)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB", "CCC"], 40, seed=5)
    first, during, after = bars[:60], bars[60:90], bars[90:]

    async def publish(group: list[dict]) -> list[str]:
        return [(await redis.xadd("bars", encode_bar(b))).decode() for b in group]

    async def outputs_at_least(n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while await redis.xlen("predictions") < n:
            assert not task.done()
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for output"
            await asyncio.sleep(0.02)

    task = asyncio.create_task(service.run())
    try:
        ids = await publish(first)
        await outputs_at_least(len(first))
        gate["on"] = True
        ids += await publish(during)
        assert await asyncio.to_thread(entered.wait, 10)
        link.unlink()
        link.symlink_to(run_b)
        assert await service.reload()
        release.set()
        ids += await publish(after)
        await outputs_at_least(len(bars))
    finally:
        release.set()
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert [o.src for o in outputs] == [f"bars/{i}" for i in ids]
    runs = [o.run for o in outputs]
    switch = runs.index("run-b")
    assert switch > len(first)  # the batch computing at the reload ended on run a
    assert set(runs[:switch]) == {"run-a"} and set(runs[switch:]) == {"run-b"}
    want = {"run-a": _expected(run_a, FEATURES, bars), "run-b": _expected(run_b, features_b, bars)}
    for o in outputs:
        got = o.targets["fwd"].preds.get("LightGBM")
        assert got == pytest.approx(want[o.run][(o.symbol, o.ts)], rel=1e-6, abs=1e-9), (
            o.symbol, o.ts, o.run,
        )
    assert (await redis.xpending("bars", "livepred"))["pending"] == 0
    await redis.aclose()


def _gate_the_second_rebuild(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[asyncio.Event, asyncio.Event]:
    """The rebuild after the start's waits: `entered` is set when it does, `release` lets it go."""
    entered, release = asyncio.Event(), asyncio.Event()
    original = worker_module.rebuild_pipeline
    rebuilds = {"n": 0}

    async def gated(*args, **kwargs):
        rebuilds["n"] += 1
        if rebuilds["n"] == 2:  # the first is the start's
            entered.set()
            await release.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(worker_module, "rebuild_pipeline", gated)
    return entered, release


async def _started_with_a_gated_rebuild(
    link: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Service, fakeredis.FakeAsyncRedis, asyncio.Event, asyncio.Event]:
    """A service started on `link`, its group made, the rebuild after the start's gated."""
    entered, release = _gate_the_second_rebuild(monkeypatch)
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(link), redis=redis)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    return service, redis, entered, release


async def test_a_reload_during_the_rebuild_another_reload_started_serves_on_the_newest_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run b reads other inputs: its swap rebuilds state. A second reload (run c, b's inputs)
    # lands during that rebuild and retires b's models: the batch waiting for the rebuild
    # must run on c's, not fail on b's closed ones (each family "failed", bars acknowledged).
    run_a = _lgb_run_with(tmp_path / "a", FEATURES, "run-a", seed=1)
    run_b = _lgb_run_with(tmp_path / "b", FEATURES_WIDER, "run-b", seed=2)
    run_c = _lgb_run_with(tmp_path / "c", FEATURES_WIDER, "run-c", seed=3)
    link = tmp_path / "current"
    link.symlink_to(run_a)
    service, redis, entered, release = await _started_with_a_gated_rebuild(link, monkeypatch)
    bars = walk_bars(["AAA", "BBB", "CCC"], 40, seed=5)
    first, after = bars[:60], bars[60:]

    async def outputs_at_least(n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while await redis.xlen("predictions") < n:
            assert not task.done()
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for output"
            await asyncio.sleep(0.02)

    task = asyncio.create_task(service.run())
    try:
        for b in first:
            await redis.xadd("bars", encode_bar(b))
        await outputs_at_least(len(first))
        link.unlink()
        link.symlink_to(run_b)
        assert await service.reload()
        for b in after:
            await redis.xadd("bars", encode_bar(b))
        await asyncio.wait_for(entered.wait(), 10)  # the next batch waits for the rebuild
        link.unlink()
        link.symlink_to(run_c)
        assert await service.reload()
        # The retired engine is closed on the executor before the rebuild goes on.
        await asyncio.get_running_loop().run_in_executor(service.executor, lambda: None)
        release.set()
        await outputs_at_least(len(bars))
    finally:
        release.set()
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert len(outputs) == len(bars)
    assert {o.run for o in outputs[len(first):]} == {"run-c"}
    want = _expected(run_c, FEATURES_WIDER, bars)
    for o in outputs[len(first):]:
        assert o.targets["fwd"].failed == {}
        got = o.targets["fwd"].preds.get("LightGBM")
        assert got == pytest.approx(want[(o.symbol, o.ts)], rel=1e-6, abs=1e-9), (o.symbol, o.ts)
    await redis.aclose()


async def test_a_rebuild_after_a_reload_is_not_ready_and_not_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload whose models read other inputs rebuilds state between batches: a long one
    # (100k symbols) must show as "rebuilding" in /readyz, not as a stalled loop whose
    # withheld watchdog gets the process killed (unless no chunk of it progresses), and the
    # stall clock starts anew after it.
    run_a = _lgb_run_with(tmp_path / "a", FEATURES, "run-a", seed=1)
    run_b = _lgb_run_with(tmp_path / "b", FEATURES_WIDER, "run-b", seed=2)
    link = tmp_path / "current"
    link.symlink_to(run_a)
    service, redis, entered, release = await _started_with_a_gated_rebuild(link, monkeypatch)
    bars = walk_bars(["AAA", "BBB"], 30, seed=4)
    task = asyncio.create_task(service.run())
    try:
        for b in bars[:20]:
            await redis.xadd("bars", encode_bar(b))
        deadline = time.monotonic() + 20
        while await redis.xlen("predictions") < 20:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
        assert await service.ready() is None and service.roles() == "active"
        link.unlink()
        link.symlink_to(run_b)
        assert await service.reload()
        for b in bars[20:]:
            await redis.xadd("bars", encode_bar(b))
        await asyncio.wait_for(entered.wait(), 10)
        worker = service.workers[0]
        # A rebuild counts each chunk it reads or applies as progress: a long one is no
        # stall, one with no chunk done for 1,000 s is hung (the watchdog is withheld).
        worker.last_progress_s -= 1000
        stalled = service.stalled()  # 1,000 s and the time since its last chunk
        assert stalled is not None and re.fullmatch(r"the partition stalled for 100\ds", stalled)
        worker._progressed()  # a chunk done
        assert service.stalled() is None
        assert await service.health() is None
        assert await service.ready() == "rebuilding state: the partition"
        assert service.roles() == "rebuilding"
        release.set()
        while await redis.xlen("predictions") < len(bars):
            assert time.monotonic() < deadline + 20 and not task.done()
            await asyncio.sleep(0.02)
        assert service.stalled() is None and await service.ready() is None
    finally:
        release.set()
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
    await redis.aclose()


_OPENMP_PROBE = """
import asyncio, ctypes, sys, threading
from pathlib import Path
import fakeredis, numpy as np, torch
from daemon.service import Service
from handlers.torchscript import configure_torch
from tests import model_factory as mf
from tests.test_service_fake import FEATURES, settings_for

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 5, len(FEATURES))).astype(np.float32)
mf.write_torchscript(root, "fwd", "LSTM", X, X[:, -1, 0], FEATURES, epochs=1)
mf.write_routing(root, "fwd", "LSTM")
mf.write_manifest(root, run_id="omp-run")
bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
gomp = ctypes.CDLL(str(bundled) if bundled.exists() else "libgomp.so.1")
configure_torch()  # torch configured on this thread, as a loader elsewhere would
seen = []
plain = threading.Thread(target=lambda: seen.append(gomp.omp_get_max_threads()))
plain.start()
plain.join()

async def main():
    service = Service(settings_for(root), redis=fakeredis.FakeAsyncRedis())
    await service.start()
    loop = asyncio.get_running_loop()
    engine = service.engine
    fam = next(iter(engine.families()))
    x = np.zeros((3, *fam.model._row_shape), dtype=np.float32)
    await loop.run_in_executor(service.executor, fam.model.predict, x)
    inference = await loop.run_in_executor(service.executor, gomp.omp_get_max_threads)
    await service.close()
    print(seen[0], inference)

asyncio.run(main())
"""


def test_the_inference_thread_runs_one_openmp_thread(tmp_path: Path) -> None:
    # OpenMP's thread count is per thread: torch configured on one thread leaves a thread
    # started later at OpenMP's default, where torch's CPU kernels would run a team whose
    # idle worker spins between calls; the torch handler pins each thread that runs it.
    # Run without OMP_NUM_THREADS (the tests set it).
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", _OPENMP_PROBE, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain, inference = (int(x) for x in done.stdout.split()[-2:])
    if plain <= 1:
        pytest.skip(f"OpenMP's default here is one thread already ({os.cpu_count()} CPUs)")
    assert inference == 1


async def test_at_light_load_the_stream_is_read_once_per_batch_not_once_per_bar(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bars arrive one at a time while batches compute: a read that comes back short (the
    # stream is drained) is not followed by another until the batch is done, so the reads
    # made while a batch computes do not grow with the bars (each read costs CPU that the
    # models need); every bar still gets its output, in order.
    from daemon.streams import StreamIO

    _slow_batches(monkeypatch, 0.03)
    reads = {"n": 0}
    original_read = StreamIO.read_new

    async def counted(self, *args, **kwargs):
        reads["n"] += 1
        return await original_read(self, *args, **kwargs)

    monkeypatch.setattr(StreamIO, "read_new", counted)
    redis = fakeredis.FakeAsyncRedis()
    metrics = _BatchSizes()
    service = Service(settings_for(lgb_run), redis=redis, metrics=metrics)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB", "CCC"], 20, seed=6)
    task = asyncio.create_task(service.run())
    try:
        ids = []
        for b in bars:
            ids.append((await redis.xadd("bars", encode_bar(b))).decode())
            await asyncio.sleep(0.003)
        deadline = asyncio.get_running_loop().time() + 20
        while await redis.xlen("predictions") < len(bars):
            assert not task.done()
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for output"
            await asyncio.sleep(0.02)
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert [o.src for o in outputs] == [f"bars/{i}" for i in ids]
    batches = len(metrics.sizes)
    assert batches < len(bars) / 3  # bars did arrive while batches computed
    # One read per batch while bars arrive (plus the few made while idle), not one per bar.
    assert reads["n"] <= 2 * batches + 5, (reads["n"], batches, len(bars))
    await redis.aclose()


def test_unknown_target_and_family_names_are_warned_about_once(lgb_run: Path) -> None:
    from structlog.testing import capture_logs

    from daemon.model_setup import build_engine

    settings = settings_for(
        lgb_run, LIVEPRED_MODELS__TARGETS="fwd,fwd_typo", LIVEPRED_MODELS__FAMILIES="LightGBM,Nope"
    )
    with capture_logs() as logs:
        engine = build_engine(settings)
    assert [f.family for f in engine.families()] == ["LightGBM"]  # the rest is served
    warned = {e["event"]: e["names"] for e in logs if e.get("log_level") == "warning"}
    assert warned == {
        "models.targets names targets the run does not have": ["fwd_typo"],
        "models.families names families no target has in view=CROSS_SECTIONAL": ["Nope"],
    }
    with capture_logs() as logs:
        build_engine(settings_for(lgb_run, LIVEPRED_MODELS__FAMILIES="LightGBM"))
    assert not [e for e in logs if e.get("log_level") == "warning"]
    engine.close()
    # Nothing left by the filters: the error line names them, not only run_root.
    from daemon.model_setup import NoModelsError

    with pytest.raises(NoModelsError, match=r"models\.families = \['Nope'\]"):
        build_engine(settings_for(lgb_run, LIVEPRED_MODELS__FAMILIES="Nope"))


def _two_target_run(root: Path, *, seed: int, families: tuple[str, ...] = ("LightGBM",)) -> Path:
    """Targets fwd and fwd_10, the given LightGBM families each (LightGBM routed), and a
    manifest listing every model file."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, len(FEATURES)))
    for target in ("fwd", "fwd_10"):
        for i, family in enumerate(families):
            y = X[:, i] + rng.normal(0, 0.1, 300)
            mf.write_lightgbm(root, target, family, X, y, FEATURES)
        mf.write_routing(root, target, "LightGBM")
    mf.write_manifest(root, run_id=root.name)
    return root


async def test_a_host_serving_one_target_reloads_a_run_deployed_with_that_target_only(
    tmp_path: Path,
) -> None:
    # The training manifest lists every target; this host serves `fwd` (models.targets) and
    # was deployed with that subtree only: complete for it, the reload goes through.
    full = _two_target_run(tmp_path / "full", seed=5)
    shutil.rmtree(full / "targets" / "fwd_10")
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(full, LIVEPRED_MODELS__TARGETS="fwd"), redis=redis)
    await service.start()
    assert await service.reload() is True
    # Served with no target filter, the same run is incomplete: refused.
    other = Service(settings_for(full), redis=redis)
    await other.start()
    assert await other.reload() is False
    await other.close()
    await service.close()
    await redis.aclose()


async def test_a_start_on_a_run_missing_files_its_manifest_lists_serves_the_rest_and_says_so(
    lgb_run: Path, tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    run = tmp_path / "run"
    shutil.copytree(lgb_run, run)
    rng = np.random.default_rng(8)
    X = rng.normal(size=(200, len(FEATURES)))
    mf.write_lightgbm(run, "fwd", "Second", X, X[:, 0], FEATURES)
    mf.write_manifest(run, run_id="partial")
    shutil.rmtree(mf.family_dir(run, "fwd", "Second"))
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(run), redis=redis)
    with capture_logs() as logs:
        await service.start()
    assert list(service.engine.models["fwd"]) == ["LightGBM"]
    said = [e for e in logs if e["event"].startswith("manifest.json lists files")]
    assert len(said) == 1 and said[0]["log_level"] == "error"
    assert said[0]["missing"] == [
        "targets/fwd/models/view=CROSS_SECTIONAL/family=Second/model.txt"
    ]
    await service.close()
    await redis.aclose()


def test_a_warmup_shorter_than_a_familys_inputs_need_is_warned_about(lgb_run: Path) -> None:
    from structlog.testing import capture_logs

    from daemon.model_setup import build_engine

    with capture_logs() as logs:
        engine = build_engine(settings_for(lgb_run, LIVEPRED_STATE__WARMUP_BARS="10"))
    needs = engine.models["fwd"]["LightGBM"].bars_to_ready
    assert needs == 20  # ma_ratio_20, bb_position: 20 closes (vol_10d: 11); the longest wins
    short = [e for e in logs if e["event"].startswith("state.warmup_bars is below")]
    assert [e["needs"] for e in short] == [{"fwd/LightGBM": 20}]
    engine.close()
    with capture_logs() as logs:
        build_engine(settings_for(lgb_run, LIVEPRED_STATE__WARMUP_BARS="20")).close()
    assert not [e for e in logs if e["event"].startswith("state.warmup_bars is below")]


async def test_a_bar_stamped_far_ahead_is_named_when_it_evicts_the_others(lgb_run: Path) -> None:
    # The eviction rule stands (CONTRACT §5): a bar in nanoseconds makes every other symbol
    # stale. The log says so once, with the offending time, instead of a silent mass restart.
    from structlog.testing import capture_logs

    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    now_ms = int(time.time() * 1000)
    bars = [dict(b, ts=now_ms - 3_600_000 + b["ts"]) for b in walk_bars(["AAA", "BBB"], 5)]
    nanos = dict(bars[-1], symbol="NS", ts=now_ms * 1_000_000)
    later = [dict(b, ts=b["ts"] + 5 * MIN) for b in bars[-2:]]
    for bar in [*bars, nanos, *later]:
        await redis.xadd("bars", encode_bar(bar))
    with capture_logs() as logs:
        await run_until(service, redis, lambda r: _xlen_at_least(r, len(bars) + 3))
    warnings = [e for e in logs if e["event"].startswith("symbols evicted by a bar stamped far")]
    assert len(warnings) == 1, [e["event"] for e in logs]
    assert warnings[0]["newest_ts"] == now_ms * 1_000_000 and warnings[0]["evicted"] >= 2
    await redis.aclose()


async def test_a_reload_that_would_lose_the_selected_family_keeps_the_current_models(
    lgb_run: Path, tmp_path: Path
) -> None:
    # A half-copied deploy, then SIGHUP: the routed family no longer loads. Swapping would
    # make `pred` null on every output; the models that serve it stay until a good run.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lgb_run, run)
    model = mf.family_dir(run, "fwd", "LightGBM") / "model.txt"
    good = model.read_text()
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(run), redis=redis)
    await service.start()
    before = service.engine
    model.write_text(good[: len(good) // 2])
    assert await service.reload() is False
    assert service.engine is before
    assert "LightGBM" in service.engine.models["fwd"]
    failed = service.metrics.reloads.labels("failed")._value.get()
    assert failed == 1
    model.write_text(good)
    assert await service.reload() is True
    assert service.engine is not before and "LightGBM" in service.engine.models["fwd"]
    # The new run routes to another family, which does not load: refused the same way.
    before = service.engine
    broken = mf.family_dir(run, "fwd", "Newer")
    mf.write_meta(broken, FEATURES)
    (broken / "model.txt").write_text("not a model")
    mf.write_routing(run, "fwd", "Newer")
    assert await service.reload() is False
    assert service.engine is before
    await service.close()
    await redis.aclose()


async def test_a_reload_to_a_run_its_manifest_says_is_incomplete_is_refused(
    tmp_path: Path,
) -> None:
    # A deploy still copying: the manifest lists a target whose folder is not there yet (and
    # no routing file either). Swapping would silently drop that target; the reload is refused
    # until the run is whole. A whole run that drops a family or a selection is served, and
    # says so in one line each.
    from structlog.testing import capture_logs

    full = _two_target_run(tmp_path / "full", seed=4, families=("LightGBM", "Other"))
    link = tmp_path / "current"
    link.symlink_to(full)
    redis = fakeredis.FakeAsyncRedis()
    service = Service(settings_for(link), redis=redis)
    await service.start()
    before = service.engine

    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    shutil.rmtree(partial / "targets" / "fwd_10")
    link.unlink()
    link.symlink_to(partial)
    with capture_logs() as logs:
        assert await service.reload() is False
    assert service.engine is before and set(service.engine.models) == {"fwd", "fwd_10"}
    refused = [e for e in logs if e["event"].startswith("reload refused")]
    assert len(refused) == 1 and refused[0]["count"] == 2, logs
    assert all("fwd_10" in m for m in refused[0]["missing"])

    # Whole again, but without one family and one routing file, and a fresh manifest.
    shutil.rmtree(partial)
    shutil.copytree(full, partial)
    shutil.rmtree(mf.family_dir(partial, "fwd", "Other"))
    (partial / "targets" / "fwd_10" / "models" / "view=CROSS_SECTIONAL"
     / "routing_decision.json").unlink()
    mf.write_manifest(partial, run_id="partial")
    with capture_logs() as logs:
        assert await service.reload() is True
    said = sorted(e["event"] for e in logs if e.get("log_level") == "warning")
    assert said == [
        "no longer served after this reload: fwd/Other (not in the new run)",
        "no longer served after this reload: fwd_10: pred (the new run selects no family:"
        " no routing_decision.json)",
    ], said
    await service.close()
    await redis.aclose()


async def test_metrics_listen_on_the_configured_host(tmp_path: Path) -> None:
    import socket

    run = _lgb_run_with(tmp_path / "a", FEATURES, "run-a", seed=1)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    redis = fakeredis.FakeAsyncRedis()
    service = Service(
        settings_for(run, LIVEPRED_METRICS__PORT=str(port), LIVEPRED_METRICS__HOST="127.0.0.1"),
        redis=redis,
    )
    await service.start()
    try:
        assert service.health_server is not None
        bound = {s.getsockname()[:2] for s in service.health_server._server.sockets}
        assert bound == {("127.0.0.1", port)}
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()
    finally:
        await service.close()
        await redis.aclose()


def test_the_cluster_client_never_sends_a_command_again_after_a_dead_connection() -> None:
    # A read or a commit whose reply was lost may have run: sent again inside the client, the
    # worker would not know (it reads its own pending entries after a lost read). Only the
    # cluster's refusals (down, slot not covered: nothing ran) are retried there.
    from redis.exceptions import ClusterDownError, ConnectionError, TimeoutError

    from daemon.service import make_redis

    settings = load_settings(None, {"LIVEPRED_REDIS__CLUSTER": "true",
                                    "LIVEPRED_REDIS__URL": "redis://127.0.0.1:7000/0"})
    client = make_redis(settings)
    assert ConnectionError not in type(client).ERRORS_ALLOW_RETRY
    assert TimeoutError not in type(client).ERRORS_ALLOW_RETRY
    assert ClusterDownError in type(client).ERRORS_ALLOW_RETRY
    supported = client.retry._supported_errors
    assert ConnectionError not in supported and ClusterDownError in supported
