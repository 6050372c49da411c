"""Several real `livepred run` processes on one real Redis (CONTRACT section 9): partitions
shared out by lease, exactly one output per bar, failover after kill -9, fencing of an owner
that was stopped past its lease, hand-over on SIGTERM, and the scale-out metrics.

Instance A is configured for partitions 0 and 1 and started first; instance B is configured
for all four, so it serves 2 and 3 and stands by for 0 and 1. Each instance publishes under
its own run_id (same model files), so an output's `run` names the instance that wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from daemon.client import BarPublisher
from daemon.wire_events import PredictionEvent
from tests import scaleout_support as sx

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(180)]

PARTITIONS = 4
LEASE_MS = 1000
START_TIMEOUT_S = 60.0  # imports and model load of a cold process on a busy 2-core box
A_PARTITIONS = (0, 1)
B_ONLY = (2, 3)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sx.write_run(tmp_path_factory.mktemp("scaleout-run"))


@dataclass
class Cluster:
    """Two instances on the test's keys, and the bars published so far."""

    redis: aioredis.Redis
    names: sx.Names
    a: sx.Instance
    b: sx.Instance
    publisher: BarPublisher
    walk: sx.BarWalk
    bars: list[dict] = field(default_factory=list)
    published: dict[str, tuple[str, int]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    @property
    def instances(self) -> list[sx.Instance]:
        """The instances expected to be running (a wait fails as soon as one exits)."""
        return [i for i in (self.a, self.b) if i.name not in self.killed]

    async def publish_steps(self, steps: int) -> None:
        for _ in range(steps):
            batch = self.walk.step()
            ids = await self.publisher.publish_many(batch)
            for bar, entry_id in zip(batch, ids, strict=True):
                src = f"{self.publisher.stream_for(bar['symbol'])}/{entry_id}"
                self.published[src] = (bar["symbol"], bar["ts"])
            self.bars.extend(batch)

    async def holders(self) -> dict[int, str | None]:
        tokens = await sx.lease_holders(self.redis, self.names, PARTITIONS)
        return {p: sx.holder_consumer(t) for p, t in tokens.items()}

    async def all_outputs(self, timeout_s: float = 60.0) -> None:
        want = len(self.published)

        async def done() -> bool:
            return await sx.count_outputs(self.redis, self.names, PARTITIONS) >= want

        try:
            await sx.wait_until(done, timeout_s, f"{want} outputs", self.instances)
        except AssertionError as exc:
            pending = {p: await self.redis.xpending(self.names.input_key(p), self.names.group)
                       for p in range(PARTITIONS)}
            raise AssertionError(f"{exc}\npending entries: {pending}") from None


@contextlib.asynccontextmanager
async def two_instances(
    tmp_path: Path, base_run: Path, real_redis_url: str, key_prefix: str
) -> AsyncIterator[Cluster]:
    """A (partitions 0, 1) started and holding its leases, then B (all four) serving 2, 3."""
    names = sx.Names(key_prefix)
    redis = aioredis.Redis.from_url(real_redis_url, socket_timeout=10)
    instances: list[sx.Instance] = []
    try:
        await sx.create_groups(redis, names, PARTITIONS)
        for name, owned in (("a", A_PARTITIONS), ("b", ())):
            run_root = sx.copy_run(base_run, tmp_path / f"run-{name}", f"run-{name}")
            port = sx.free_port()
            config = sx.write_config(
                tmp_path / f"{name}.toml", redis_url=real_redis_url, names=names,
                consumer=f"inst-{name}", run_root=run_root, partitions=PARTITIONS, owned=owned,
                lease_ms=LEASE_MS, metrics_port=port,
            )
            instances.append(sx.Instance(f"inst-{name}", config, tmp_path / f"{name}.log", port))
        a, b = instances
        cluster = Cluster(
            redis, names, a, b,
            BarPublisher(redis, stream=names.bars, partitions=PARTITIONS),
            sx.BarWalk(sx.symbols_for(PARTITIONS, 5)),
        )
        # A must hold 0 and 1 before B starts, or B (configured for all four) could win them:
        # with both listing a partition, whoever gets its lease first serves it.
        a.start()
        await _wait_holder(cluster, A_PARTITIONS, "inst-a", START_TIMEOUT_S, [a])
        b.start()
        await _wait_holder(cluster, B_ONLY, "inst-b", START_TIMEOUT_S, [a, b])
        assert await cluster.holders() == {0: "inst-a", 1: "inst-a", 2: "inst-b", 3: "inst-b"}
        yield cluster
    finally:
        sx.stop_all(instances)
        await redis.aclose()


async def _wait_holder(
    cluster: Cluster, partitions: tuple[int, ...], consumer: str, timeout_s: float,
    watch: list[sx.Instance] | None = None,
) -> float:
    async def held() -> bool:
        holders = await cluster.holders()
        return all(holders[p] == consumer for p in partitions)

    return await sx.wait_until(held, timeout_s, f"{consumer} to hold {partitions}",
                               cluster.instances if watch is None else watch, poll_s=0.01)


async def _verify(
    cluster: Cluster, base_run: Path
) -> dict[int, list[tuple[str, PredictionEvent]]]:
    await cluster.all_outputs()
    await asyncio.sleep(0.3)  # anything published twice would show up now
    outputs = await sx.read_outputs(cluster.redis, cluster.names, PARTITIONS)
    expected = sx.expected_predictions(base_run, cluster.bars)
    duplicates = sx.check_exactly_once(outputs, cluster.published, expected)
    assert duplicates == 0, f"{duplicates} outputs published twice"
    for p in range(PARTITIONS):
        xpending = await cluster.redis.xpending(cluster.names.input_key(p), cluster.names.group)
        assert xpending["pending"] == 0, f"partition {p}: entries left pending"
    return outputs


async def test_two_instances_share_partitions_and_hand_over_on_sigterm(
    tmp_path: Path, base_run: Path, real_redis_url: str, key_prefix: str
) -> None:
    async with two_instances(tmp_path, base_run, real_redis_url, key_prefix) as cluster:
        await cluster.publish_steps(40)
        await cluster.all_outputs()
        outputs = await sx.read_outputs(cluster.redis, cluster.names, PARTITIONS)
        for p in range(PARTITIONS):
            assert outputs[p], f"partition {p} got no output"
            assert {e.run for _, e in outputs[p]} == {"run-a" if p in A_PARTITIONS else "run-b"}

        # The scale-out metrics of the standby-and-serving instance B.
        async def renewed() -> bool:
            m = cluster.b.metrics()
            return all(m.get(f'livepred_lease_renewals_total{{partition="{p}"}}', 0) >= 2
                       for p in B_ONLY)

        await sx.wait_until(renewed, 5.0, "lease renewals", cluster.instances)
        metrics = cluster.b.metrics()
        assert metrics["livepred_partitions_owned"] == 2
        for p in A_PARTITIONS:
            assert metrics[f'livepred_partition_role{{partition="{p}",role="standby"}}'] == 1
        for p in B_ONLY:
            assert metrics[f'livepred_partition_role{{partition="{p}",role="active"}}'] == 1
            assert metrics[f'livepred_lease_acquisitions_total{{partition="{p}"}}'] == 1
        assert cluster.a.metrics()["livepred_partitions_owned"] == 2

        # Draining A: SIGTERM releases its leases, so B takes over without waiting for expiry.
        cluster.killed.add(cluster.a.name)
        cluster.a.signal(signal.SIGTERM)
        handover_s = await _wait_holder(cluster, A_PARTITIONS, "inst-b", 10.0)
        assert cluster.a.proc is not None and cluster.a.proc.wait(timeout=20) == 0
        await cluster.publish_steps(20)
        outputs = await _verify(cluster, base_run)
        for p in A_PARTITIONS:
            assert sx.runs_in_order(outputs[p]) == ["run-a", "run-b"]
        metrics = cluster.b.metrics()
        assert metrics["livepred_partitions_owned"] == 4
        for p in A_PARTITIONS:
            assert metrics[f'livepred_lease_acquisitions_total{{partition="{p}"}}'] == 1
        print(f"\nhand-over after SIGTERM: {handover_s:.2f}s (lease_ms={LEASE_MS})")


async def _feed(cluster: Cluster, stop: asyncio.Event, step_s: float = 0.02) -> None:
    while not stop.is_set():
        await cluster.publish_steps(1)
        await asyncio.sleep(step_s)


@pytest.mark.slow
async def test_kill_9_of_an_owner_fails_over_within_the_lease_and_loses_no_bar(
    tmp_path: Path, base_run: Path, real_redis_url: str, key_prefix: str
) -> None:
    async with two_instances(tmp_path, base_run, real_redis_url, key_prefix) as cluster:
        stop = asyncio.Event()
        feeder = asyncio.create_task(_feed(cluster, stop))
        try:
            await asyncio.sleep(1.5)  # under load
            killed_at = time.monotonic()
            cluster.killed.add(cluster.a.name)
            cluster.a.kill()
            takeover_s = await _wait_holder(cluster, A_PARTITIONS, "inst-b", 15.0)
            serving_s = await _first_output_of(cluster, A_PARTITIONS, "run-b", killed_at)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await feeder
        outputs = await _verify(cluster, base_run)
        for p in A_PARTITIONS:
            assert sx.runs_in_order(outputs[p]) == ["run-a", "run-b"]
        rebuilt = [e for e in cluster.b.events() if e.get("event") == "state rebuilt"
                   and e.get("partition") in A_PARTITIONS]
        rebuild_s = max(e["seconds"] for e in rebuilt)
        print(f"\nkill -9 failover: lease taken {takeover_s:.2f}s, first output "
              f"{serving_s:.2f}s after the kill (lease_ms={LEASE_MS}, rebuild {rebuild_s:.3f}s)")
        # The lease expires at most lease_ms after A's last renewal; B polls every lease_ms/4.
        assert takeover_s <= LEASE_MS / 1000 * 1.25 + 1.0
        assert serving_s <= LEASE_MS / 1000 * 1.25 + rebuild_s + 2.0
        metrics = cluster.b.metrics()
        assert metrics["livepred_partitions_owned"] == 4
        for p in A_PARTITIONS:
            assert metrics[f'livepred_lease_acquisitions_total{{partition="{p}"}}'] == 1


async def _first_output_of(cluster: Cluster, partitions: tuple[int, ...], run: str,
                           since: float) -> float:
    async def published() -> bool:
        for p in partitions:
            rows = await cluster.redis.xrevrange(cluster.names.output_key(p), count=1)
            if not rows or sx.decode_prediction(rows[0][1]).run != run:
                return False
        return True

    await sx.wait_until(published, 20.0, f"outputs of {run}", [cluster.b], poll_s=0.01)
    return time.monotonic() - since


@pytest.mark.slow
async def test_an_owner_stopped_past_its_lease_is_fenced_when_it_resumes(
    tmp_path: Path, base_run: Path, real_redis_url: str, key_prefix: str
) -> None:
    async with two_instances(tmp_path, base_run, real_redis_url, key_prefix) as cluster:
        stop = asyncio.Event()
        feeder = asyncio.create_task(_feed(cluster, stop))
        try:
            await asyncio.sleep(1.5)
            cluster.a.signal(signal.SIGSTOP)
            try:
                await _wait_holder(cluster, A_PARTITIONS, "inst-b", 15.0)
                await _first_output_of(cluster, A_PARTITIONS, "run-b", time.monotonic())
            finally:
                cluster.a.signal(signal.SIGCONT)
            # A resumes believing it owns 0 and 1, with reads and a batch in hand.
            await sx.wait_until(lambda: _logged_lease_loss(cluster.a), 15.0,
                                "A to notice it lost its leases", cluster.instances)
            await asyncio.sleep(1.5)  # A keeps running next to B, under load
        finally:
            stop.set()
            await feeder
        outputs = await _verify(cluster, base_run)
        for p in A_PARTITIONS:
            # Nothing from A after B's first output on the partition: the writes were fenced.
            assert sx.runs_in_order(outputs[p]) == ["run-a", "run-b"]
        assert cluster.a.alive(), "the fenced instance must stay up, as a standby"
        metrics = cluster.a.metrics()
        for p in A_PARTITIONS:
            assert metrics[f'livepred_lease_losses_total{{partition="{p}"}}'] == 1
            assert metrics[f'livepred_partition_role{{partition="{p}",role="standby"}}'] == 1
        assert metrics["livepred_partitions_owned"] == 0
        assert await cluster.holders() == {p: "inst-b" for p in range(PARTITIONS)}


async def _logged_lease_loss(instance: sx.Instance) -> bool:
    lost = {e.get("partition") for e in instance.events() if e.get("event", "").startswith(
        "lease lost")}
    return set(A_PARTITIONS) <= lost
