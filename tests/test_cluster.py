"""The daemon on a real Redis Cluster of three masters (CONTRACT section 9): with
`redis.cluster = true` every key of a partition shares the hash tag `{p}`, so the fenced
scripts run unchanged while the partitions live on different nodes. The cluster is started by
the test on free loopback ports and always shut down."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from daemon.client import BarPublisher
from tests import daemon_harness as h
from tests import scaleout_support as sx

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

PARTITIONS = 6  # with three masters, the tags {0}..{5} fall on all three nodes
NODES = 3


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports() -> list[int]:
    """Ports P with P and its cluster bus port P + 10000 both free."""
    ports: list[int] = []
    while len(ports) < NODES:
        port = sx.free_port()
        if port + 10000 < 65536 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


def _wait(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{what} (last error: {last})")


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server and redis-cli are needed to start a cluster")
    ports = _cluster_ports()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", "5000", "--dir", str(tmp_path),
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--logfile", str(tmp_path / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        clients = [redis.Redis(port=p, socket_timeout=5) for p in ports]
        try:
            _wait(lambda: all(c.ping() for c in clients), 15, "cluster nodes to answer")
        except TimeoutError as exc:
            pytest.skip(f"redis-server cannot start cluster nodes here: {exc}")
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60,
        )
        if created.returncode != 0:
            pytest.skip("redis-cli cannot create a cluster here: "
                        + created.stdout.decode(errors="replace")[-300:])

        def healthy() -> bool:
            return all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients)

        _wait(healthy, 30, "cluster_state:ok on every node")
        for c in clients:
            c.close()
        yield ports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _slot_owners(port: int) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) for every slot range of the cluster."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        rows = client.execute_command("CLUSTER SLOTS")
    finally:
        client.close()
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in rows]


async def test_the_daemon_serves_partitions_spread_over_three_masters(
    redis_cluster: list[int], tmp_path: Path
) -> None:
    seed_port = redis_cluster[0]
    url = f"redis://127.0.0.1:{seed_port}/0"
    names = sx.Names("lpcluster:")
    base = sx.write_run(tmp_path / "run-base")
    run_root = sx.copy_run(base, tmp_path / "run-c", "run-cluster")
    port = sx.free_port()
    config = sx.write_config(
        tmp_path / "c.toml", redis_url=url, names=names, consumer="inst-c", run_root=run_root,
        partitions=PARTITIONS, lease_ms=2000, metrics_port=port, cluster=True,
    )
    client = RedisCluster.from_url(url, socket_timeout=10)
    instance = sx.Instance("inst-c", config, tmp_path / "c.log", port)
    try:
        # Where the partitions live: each partition's keys in one slot, the slots on every node.
        sync = redis.Redis(port=seed_port, socket_timeout=5)
        owners = _slot_owners(seed_port)
        node_of: dict[int, int] = {}
        for p in range(PARTITIONS):
            keys = [names.input_key(p), names.output_key(p), names.lease(p),
                    f"{names.dead}:{{{p}}}"]
            slots = {int(sync.execute_command("CLUSTER KEYSLOT", k)) for k in keys}
            assert len(slots) == 1, f"partition {p}'s keys span slots {slots}"
            slot = slots.pop()
            node_of[p] = next(node for lo, hi, node in owners if lo <= slot <= hi)
        sync.close()
        assert set(node_of.values()) == set(redis_cluster), node_of

        await sx.create_groups(client, names, PARTITIONS)
        # `run --check` looks at every partition's keys on their nodes, and writes nothing.
        check = h.run_cli("run", "--config", str(config), "--check", timeout_s=120)
        assert check.returncode == 0, check.stderr
        assert "Redis ?" not in check.stderr
        for p in range(PARTITIONS):
            assert f"group   {names.input_key(p)} " in check.stderr
            assert f"lease   {names.lease(p)}: free" in check.stderr
        instance.start()

        async def all_leases() -> bool:
            holders = await sx.lease_holders(client, names, PARTITIONS)
            return all(sx.holder_consumer(t) == "inst-c" for t in holders.values())

        await sx.wait_until(all_leases, 60.0, "leases on every partition", [instance])
        publisher = BarPublisher(client, stream=names.bars, partitions=PARTITIONS, cluster=True)
        walk = sx.BarWalk(sx.symbols_for(PARTITIONS, 3))
        bars: list[dict] = []
        published: dict[str, tuple[str, int]] = {}
        for _ in range(30):
            step = walk.step()
            ids = await publisher.publish_many(step)
            for bar, entry_id in zip(step, ids, strict=True):
                published[f"{publisher.stream_for(bar['symbol'])}/{entry_id}"] = (
                    bar["symbol"], bar["ts"])
            bars.extend(step)

        async def done() -> bool:
            return await sx.count_outputs(client, names, PARTITIONS) >= len(published)

        await sx.wait_until(done, 60.0, f"{len(published)} outputs", [instance])
        await asyncio.sleep(0.3)
        outputs = await sx.read_outputs(client, names, PARTITIONS)
        duplicates = sx.check_exactly_once(outputs, published, sx.expected_predictions(base, bars))
        assert duplicates == 0
        assert all(outputs[p] for p in range(PARTITIONS))
        metrics = instance.metrics()
        assert metrics["livepred_partitions_owned"] == PARTITIONS
        assert instance.stop() == 0
        # SIGTERM released every lease.
        assert all(t is None for t in (await sx.lease_holders(client, names, PARTITIONS)).values())
    finally:
        instance.stop()
        await client.aclose()
