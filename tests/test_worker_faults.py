"""The daemon on fakeredis when something unexpected fails: the worker logs, backs off and
carries on (never a silently dead worker in a live process); taking over pending entries
counts as no delivery; the systemd watchdog keeps beating through a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from redis.exceptions import ResponseError

from daemon import worker as worker_module
from daemon.service import Service
from daemon.settings import load_settings
from daemon.streams import StreamIO
from daemon.wire import encode_bar
from daemon.wire_events import decode_prediction
from daemon.worker import Role
from tests import daemon_harness as h
from tests import model_factory as mf


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults_run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(h.FEATURES)))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, X[:, 0], h.FEATURES)
    mf.write_manifest(root, run_id="faults")
    return root


def _service(run: Path, redis: fakeredis.FakeAsyncRedis) -> Service:
    environ = {
        "LIVEPRED_MODELS__RUN_ROOT": str(run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "10",
        "LIVEPRED_STREAMS__BATCH": "16",
        "LIVEPRED_STREAMS__CONSUMER": "faults",
    }
    return Service(load_settings(None, environ), redis=redis)


async def _serve_until_done(service: Service, redis: fakeredis.FakeAsyncRedis, n: int) -> None:
    task = asyncio.create_task(service.run())
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while await redis.xlen("predictions") < n or (
            await redis.xpending("bars", "livepred")
        )["pending"]:
            assert not task.done(), "service.run() ended by itself"
            assert asyncio.get_running_loop().time() < deadline, (
                f"stuck: worker role {service.workers[0].role}, "
                f"{await redis.xlen('predictions')} of {n} outputs"
            )
            await asyncio.sleep(0.02)
        assert service.workers[0].role == Role.ACTIVE
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0


@pytest.mark.parametrize("where", ["commit", "batch"])
async def test_an_unexpected_error_is_retried_not_fatal(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = h.walk_bars(["AAA", "BBB", "CCC"], 30, seed=2)
    for bar in bars:
        await redis.xadd("bars", encode_bar(bar))
    failures = {"left": 2}
    if where == "commit":
        real_commit = StreamIO.commit

        async def flaky_commit(self: StreamIO, token: str, commit: object, **kw: bool) -> int:
            if failures["left"]:
                failures["left"] -= 1
                raise ResponseError(OOM)
            return await real_commit(self, token, commit, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(StreamIO, "commit", flaky_commit)
    else:
        real_job = worker_module._run_batch_job

        def flaky_job(*args: object) -> object:
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("a bug in the batch code")
            return real_job(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(worker_module, "_run_batch_job", flaky_job)
    service = _service(lgb_run, redis)
    await service.start()
    await _serve_until_done(service, redis, len(bars))
    assert failures["left"] == 0
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert len(outputs) == len({o.src for o in outputs}) == len(bars)
    assert await redis.xlen("bars:dead") == 0
    await redis.aclose()


async def _bars_with_group() -> fakeredis.FakeAsyncRedis:
    """A fakeredis whose `bars` stream has the daemon's group (at its end)."""
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    return redis


async def _until(check: Any, seconds: float, what: str) -> None:
    """Poll `check()` (plain or async) until it is true; fail with `what` after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        done = check()
        if asyncio.iscoroutine(done):
            done = await done
        if done:
            return
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _serving(service: Service, redis: fakeredis.FakeAsyncRedis) -> Any:
    """The service started and running; stopped (exit 0) and Redis closed afterwards."""
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        yield task
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
        await redis.aclose()


OOM = "OOM command not allowed when used memory > 'maxmemory'."


async def test_a_write_that_keeps_failing_shows_in_health_and_backs_off(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis at maxmemory: every commit is refused with OOM. The failure must show at once
    # (not when another bar arrives), in /healthz and the metrics, with retries slowing down;
    # once Redis takes writes again every bar is published once.
    redis = await _bars_with_group()
    real_commit = StreamIO.commit
    full = {"on": True, "refused": 0}

    async def oom_commit(self: StreamIO, token: str, commit: object, **kw: bool) -> int:
        if full["on"]:
            full["refused"] += 1
            raise ResponseError(OOM)
        return await real_commit(self, token, commit, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamIO, "commit", oom_commit)
    service = _service(lgb_run, redis)
    async with _serving(service, redis):
        await _until(lambda: service.workers[0].role == Role.ACTIVE, 10, "never active")
        bars = h.walk_bars(["AAA", "BBB"], 3, seed=4)
        for bar in bars:  # the burst's last bars: nothing arrives after them
            await redis.xadd("bars", encode_bar(bar))
        await _until(service.health, 5, "no failure reported")
        problem = await service.health()
        assert problem is not None and "failing" in problem and "OOM" in problem
        assert "failing" in service.status() and "OOM" in service.status()  # STATUS= too
        # More refusals than MAX_DELIVERIES: Redis's refusals are not the entries' fault, so
        # they must not end as poison. Backing off: not a tight restart loop.
        started = asyncio.get_running_loop().time()
        await _until(lambda: full["refused"] > worker_module.MAX_DELIVERIES + 1, 20, str(full))
        assert asyncio.get_running_loop().time() - started > 1.5
        metrics = service.metrics.render().decode()
        assert 'livepred_partition_failures_total{partition="-"}' in metrics
        assert "livepred_redis_errors_total 0.0" not in metrics
        assert await redis.xlen("predictions") == 0
        full["on"] = False
        await _until(lambda: _settled(redis, len(bars)), 25, "not recovered")
        assert await service.health() is None
        assert "failing" not in service.status()
        outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
        assert len({o.src for o in outputs}) == len(outputs) == len(bars)
        assert await redis.xlen("bars:dead") == 0


async def test_a_failing_partition_another_instance_took_is_not_reported_failing(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This instance's writes fail; the lease goes to another instance (ours lapsed while we
    # backed off). Standing by, this instance is healthy: the partition is not its to serve.
    redis = await _bars_with_group()

    async def oom_commit(self: StreamIO, token: str, commit: object, **kw: bool) -> int:
        raise ResponseError(OOM)

    monkeypatch.setattr(StreamIO, "commit", oom_commit)
    service = _service(lgb_run, redis)
    async with _serving(service, redis):
        for bar in h.walk_bars(["AAA"], 2, seed=4):
            await redis.xadd("bars", encode_bar(bar))
        await _until(service.health, 10, "no failure reported")
        await redis.set("livepred:lease", "other-instance:1", px=60_000)

        async def standing_by_healthy() -> bool:
            return service.workers[0].role == Role.STANDBY and await service.health() is None

        await _until(standing_by_healthy, 20, "still reported failing")


async def test_refusals_of_entries_redis_lost_do_not_shield_a_later_poison_entrys_neighbours(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis refuses a batch's write 6 times, then restarts without its data: the refused
    # entries are gone. A later poison entry must still be retried alone after its second
    # delivery, so that it ends as poison alone and its neighbours are published.
    from daemon.pipeline import Pipeline

    real_run = Pipeline.run

    def poisoned_run(self: Pipeline, cols: object, *args: object, **kw: object) -> object:
        if "POISON" in cols.symbols:  # type: ignore[attr-defined]
            raise RuntimeError("a bar that crashes the batch code")
        return real_run(self, cols, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "run", poisoned_run)
    redis = await _bars_with_group()
    real_commit = StreamIO.commit
    state = {"refused": 0, "oom": True}

    async def commit(self: StreamIO, token: str, c: object, **kw: bool) -> int:
        if state["oom"]:
            state["refused"] += 1
            if state["refused"] == 6:  # Redis restarts: its data is gone
                await redis.flushall()
                await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
                state["oom"] = False
            raise ResponseError(OOM)
        return await real_commit(self, token, c, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamIO, "commit", commit)
    service = _service(lgb_run, redis)
    async with _serving(service, redis):
        for bar in h.walk_bars(["AAA", "BBB"], 2, seed=4):
            await redis.xadd("bars", encode_bar(bar))
        await _until(lambda: not state["oom"] and service.workers[0].role == Role.ACTIVE, 60,
                     "Redis never came back")
        bars = h.walk_bars([f"S{i}" for i in range(7)], 1, seed=5)
        poison = h.bar_fields({**bars[0], "symbol": "POISON"})
        for fields in [h.bar_fields(b) for b in bars[:3]] + [poison] + [
            h.bar_fields(b) for b in bars[3:]
        ]:
            await redis.xadd("bars", fields)
        async def all_handled() -> bool:
            handled = await redis.xlen("predictions") + await redis.xlen("bars:dead")
            return handled >= 8 and not (await redis.xpending("bars", "livepred"))["pending"]

        await _until(all_handled, 60, "stuck")
        dead = [f[b"error"] for _, f in await redis.xrange("bars:dead")]
        assert dead == [b"max_deliveries"]
        assert await redis.xlen("predictions") == 7


async def test_a_write_error_that_is_not_redis_refusing_still_counts_towards_poison(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A script error on one entry's output (not Redis's state: memory, replica, permissions)
    # may be the entry's fault: it must end as poison, not be retried for ever.
    redis = await _bars_with_group()
    real_commit = StreamIO.commit

    async def commit(self: StreamIO, token: str, c: object, **kw: bool) -> int:
        if any(symbol == b"ODD" for symbol, _ in c.outputs):  # type: ignore[attr-defined]
            raise ResponseError("ERR Error running script: too many results to unpack")
        return await real_commit(self, token, c, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamIO, "commit", commit)
    service = _service(lgb_run, redis)
    async with _serving(service, redis):
        await _until(lambda: service.workers[0].role == Role.ACTIVE, 10, "never active")
        for bar in h.walk_bars(["AAA", "ODD", "BBB"], 1, seed=4):
            await redis.xadd("bars", encode_bar(bar))

        async def handled() -> bool:
            return await redis.xlen("bars:dead") >= 1 and await _settled(redis, 2)

        await _until(handled, 40, "the odd entry never ended as poison")
        dead = [f for _, f in await redis.xrange("bars:dead")]
        assert [f[b"error"] for f in dead] == [b"max_deliveries"]
        assert {decode_prediction(f).symbol for _, f in await redis.xrange("predictions")} == {
            "AAA", "BBB"}


async def _settled(redis: fakeredis.FakeAsyncRedis, outputs: int) -> bool:
    """`outputs` predictions published and nothing pending."""
    if await redis.xlen("predictions") < outputs:
        return False
    return not (await redis.xpending("bars", "livepred"))["pending"]


async def _check_takeover(redis: object, stream: str) -> None:
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)  # type: ignore[attr-defined]
    ids = [await redis.xadd(stream, {"n": str(i)}) for i in range(1500)]  # type: ignore[attr-defined]
    await redis.xreadgroup("g", "gone-1", {stream: ">"}, count=1200)  # type: ignore[attr-defined]
    await redis.xreadgroup("g", "gone-2", {stream: ">"}, count=300)  # type: ignore[attr-defined]
    await redis.xdel(stream, *ids[10:20])  # type: ignore[attr-defined]
    io = StreamIO(redis, inputs=[stream], output=stream + ":out", dead_letter=stream + ":dead",
                  group="g", consumer="me", lease_key=stream + ":lease", output_maxlen=1000)
    assert await io.claim_all_pending() == 1490
    entries = await io.read_own_pending(2000, {})
    assert len(entries) == 1490
    counts = await io.delivery_counts(stream, [e.entry_id for e in entries])
    assert set(counts.values()) == {2}  # the first read, then ours


async def test_taking_over_pending_entries_is_no_delivery(client_and_prefix) -> None:
    """A restart reads its predecessor's pending entries once: one delivery, not two (the
    claim must not count), so MAX_DELIVERIES means deliveries, not half of them."""
    redis, prefix = client_and_prefix
    await _check_takeover(redis, prefix + "bars")


async def test_the_watchdog_keeps_beating_through_a_redis_outage(lgb_run: Path) -> None:
    """systemd kills a service whose WATCHDOG=1 stops: during a Redis outage the daemon must
    keep beating (it rides the outage out), while /healthz reports the outage."""
    directory = tempfile.mkdtemp(prefix="lpw")
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    received: list[str] = []

    def collect() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                received.extend(sock.recv(4096).decode().splitlines())
        return received

    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    environ = {"LIVEPRED_MODELS__RUN_ROOT": str(lgb_run), "LIVEPRED_METRICS__PORT": "0",
               "LIVEPRED_STREAMS__BLOCK_MS": "10", "LIVEPRED_STREAMS__CONSUMER": "wd"}
    service = Service(load_settings(None, environ), redis=redis, notify_socket=address)
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "WATCHDOG=1" not in collect():
            assert loop.time() < deadline, f"no WATCHDOG=1, got {received}"
            await asyncio.sleep(0.05)
        server.connected = False
        await asyncio.sleep(0.2)
        received.clear()
        assert (await service.health() or "").startswith("redis unreachable")
        await asyncio.sleep(2.5)
        assert collect().count("WATCHDOG=1") >= 2, received
        server.connected = True
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)
        await redis.aclose()


async def test_an_entry_that_always_fails_ends_as_poison_alone(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that keeps failing because of one entry: after the retries the entries are
    processed one by one, so only the culprit is dead-lettered (`max_deliveries`)."""
    redis = await _bars_with_group()
    bars = h.walk_bars(["AAA", "BBB", "CCC"], 5, seed=4)
    ids = [await redis.xadd("bars", encode_bar(bar)) for bar in bars]
    culprit = ids[7].decode()
    real_job = worker_module._run_batch_job

    def job(pipeline: object, entries: list, *args: object) -> object:
        if any(e.entry_id == culprit and e.deliveries <= worker_module.MAX_DELIVERIES
               for e in entries):
            raise RuntimeError("this entry breaks the batch code")
        return real_job(pipeline, entries, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "_run_batch_job", job)
    monkeypatch.setattr(worker_module.Backoff, "next_s", lambda self: 0.01)
    service = _service(lgb_run, redis)
    await service.start()
    await _serve_until_done(service, redis, len(bars) - 1)
    dead = await redis.xrange("bars:dead")
    assert [(f[b"src_id"].decode(), f[b"error"]) for _, f in dead] == [
        (culprit, b"max_deliveries")
    ]
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert sorted(o.src for o in outputs) == sorted(
        f"bars/{i.decode()}" for i in ids if i.decode() != culprit
    )
    await redis.aclose()


async def test_a_cancel_lost_inside_a_lease_renewal_does_not_hold_the_exit(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Redis call can swallow the cancel that races with its own timeout; the renewer must
    # still end when the partition is left (else the exit waits out the grace period and the
    # lease keeps being renewed for an instance that is leaving).
    inside = asyncio.Event()
    swallowed = {"n": 0}

    async def stubborn_renew(self: StreamIO, token: str, lease_ms: int) -> bool:
        inside.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed["n"] += 1
        inside.clear()
        return True

    monkeypatch.setattr(StreamIO, "renew_lease", stubborn_renew)
    redis = fakeredis.FakeAsyncRedis()
    environ = {
        "LIVEPRED_MODELS__RUN_ROOT": str(lgb_run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "10",
        "LIVEPRED_STREAMS__LEASE_MS": "3000",  # first renewal after 1 s
        "LIVEPRED_STREAMS__CONSUMER": "stubborn",
    }
    service = Service(load_settings(None, environ), redis=redis)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(inside.wait(), 20)
    assert service.workers[0].role == Role.ACTIVE
    started = asyncio.get_running_loop().time()
    service.request_stop()
    await asyncio.wait({task}, timeout=15)  # not wait_for: its cancel could be lost too
    assert task.done(), "the service did not stop"
    assert task.result() == 0
    assert swallowed["n"] == 1  # the cancel did land inside the call, and was lost there
    assert asyncio.get_running_loop().time() - started < 3.0
    await redis.aclose()


async def _check_forget(redis: object, stream: str) -> None:
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)  # type: ignore[attr-defined]
    for i in range(10):
        await redis.xadd(stream, {"n": str(i)})  # type: ignore[attr-defined]
    await redis.xreadgroup("g", "gone-1", {stream: ">"}, count=4)  # type: ignore[attr-defined]
    await redis.xreadgroup("g", "holds", {stream: ">"}, count=3)  # type: ignore[attr-defined]
    await redis.xreadgroup("g", "me", {stream: ">"}, count=1)  # type: ignore[attr-defined]
    io = StreamIO(redis, inputs=[stream], output=stream + ":out", dead_letter=stream + ":dead",
                  group="g", consumer="me", lease_key=stream + ":lease", output_maxlen=1000)
    # Only consumers without pending entries go, and not before they have been idle long.
    assert await io.forget_idle_consumers(idle_ms=60_000) == []
    rows = await redis.xpending_range(  # type: ignore[attr-defined]
        stream, "g", min="-", max="+", count=10, consumername="gone-1"
    )
    ids = [r["message_id"] for r in rows]
    await redis.xclaim(stream, "g", "me", min_idle_time=0, message_ids=ids)  # type: ignore[attr-defined]
    assert await io.forget_idle_consumers(idle_ms=0) == ["gone-1"]
    names = {c["name"] for c in await redis.xinfo_consumers(stream, "g")}  # type: ignore[attr-defined]
    assert names == {b"holds", b"me"}
    assert (await redis.xpending(stream, "g"))["pending"] == 8  # type: ignore[attr-defined]


async def test_idle_consumers_holding_nothing_are_deleted(client_and_prefix) -> None:
    redis, prefix = client_and_prefix
    await _check_forget(redis, prefix + "bars")


async def test_a_worker_that_dies_ends_the_process_with_a_failure(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error no handler of the worker contains (not an Exception) ends its task: serving
    # nothing behind a healthy process is worse than a restart, so run() returns 1.
    def dies(*args: Any) -> Any:
        raise GeneratorExit

    monkeypatch.setattr(worker_module, "_run_batch_job", dies)
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    service = _service(lgb_run, redis)
    await service.start()
    task = asyncio.create_task(service.run())
    for bar in h.walk_bars(["AAA"], 3, seed=2):
        await redis.xadd("bars", encode_bar(bar))
    assert await asyncio.wait_for(task, 20) == 1
    assert (await redis.xpending("bars", "livepred"))["pending"] > 0  # retried after restart
    await redis.aclose()
