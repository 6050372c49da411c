"""Redis goes away under the running daemon and comes back (same port, same append-only
file): the daemon reconnects by itself, in the same process, and every bar gets exactly one
output equal to the expected value (CONTRACT section 5)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import redis

from tests import daemon_harness as h
from tests import model_factory as mf

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which(h.REDIS_SERVER) is None, reason="no redis-server on PATH"),
]

TARGET = "fwd"


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.write_lightgbm_run(tmp_path_factory.mktemp("lgb_run"), TARGET, "restart-run")


def _publish(client: redis.Redis, stream: str, bars: list[dict]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for bar in bars:
        pipe.xadd(stream, h.bar_fields(bar))
    return [x.decode() for x in pipe.execute()]


@pytest.mark.slow
def test_the_daemon_rides_out_a_redis_restart(lgb_run: Path, tmp_path: Path) -> None:
    server = h.RedisServer(tmp_path / "redis")
    keys = h.Keys("restart:")
    names = h.symbols(20)
    before = h.walk_bars(names, 60, seed=3)
    after = h.walk_bars(names, 40, seed=3, start=60)
    try:
        server.start()
        client = server.client()
        h.create_group(client, keys)
        config = h.write_config(
            tmp_path / "livepred.toml", keys=keys, redis_url=server.url, run_root=lgb_run,
            streams={"batch": 50, "lease_ms": 1000},
        )
        with h.Daemon(config, tmp_path / "daemon.log") as daemon:
            daemon.start()
            pid = daemon.pid
            ids = _publish(client, keys.input, before[:200])
            h.wait_for(lambda: client.xlen(keys.output) >= 200, 90, "the first outputs",
                       check=daemon.check_alive)
            # Redis stops while the daemon has work in hand.
            ids += _publish(client, keys.input, before[200:])
            client.close()
            server.shutdown()
            time.sleep(3.0)  # several retries, and the lease runs out meanwhile
            daemon.check_alive()
            server.start()
            client = server.client()
            ids += _publish(client, keys.input, after)
            total = len(before) + len(after)
            h.wait_settled(lambda: client.xlen(keys.output), total, quiet_s=20, timeout_s=90,
                           check=daemon.check_alive)
            h.wait_settled(lambda: -h.pending_count(client, keys), 0, quiet_s=10, timeout_s=30)
            assert h.pending_count(client, keys) == 0
            assert daemon.pid == pid and daemon.alive()
            log = daemon.log_text()
            assert "retrying" in log, "the daemon never noticed the outage"
            assert daemon.stop() == 0, daemon.log_tail()

        events = h.read_outputs(client, keys.output)
        srcs = [e.src for e in events]
        assert len(srcs) == len(set(srcs)), "a bar was published twice"
        assert sorted(srcs) == sorted(f"{keys.input}/{i}" for i in ids)
        expected = h.expected_lightgbm(
            mf.family_dir(lgb_run, TARGET, "LightGBM") / "model.txt",
            h.feature_frames(before + after),
        )
        compared = h.assert_outputs_match(
            events, {"LightGBM": expected}, target=TARGET,
            rel={"LightGBM": 1e-6}, abs_={"LightGBM": 1e-9},
        )
        assert compared == {"LightGBM": total}
        client.close()
    finally:
        server.close()
