"""`kill -9` the real daemon at random points while a feeder publishes (and while it is down):
after the last restart every bar has exactly the output an uninterrupted run gives it, every
bad entry exactly one dead letter, and nothing is left pending (CONTRACT sections 4 and 5)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import redis

from tests import daemon_harness as h
from tests import model_factory as mf

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TARGET = "fwd"


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.write_lightgbm_run(tmp_path_factory.mktemp("lgb_run"), TARGET, "crash-run")


def _feed(bars: list[dict], every: int) -> tuple[list[dict], set[int]]:
    """The bars with a bad entry after every `every`-th one; returns the entries and the
    positions of the bad ones."""
    entries: list[dict] = []
    bad: set[int] = set()
    for i, bar in enumerate(bars):
        entries.append(h.bar_fields(bar))
        if i % every == every - 1:
            bad.add(len(entries))
            entries.append({"data": b"\xc1 not msgpack", "n": str(i).encode()})
    return entries, bad


@pytest.mark.slow
def test_kill_9_at_random_points_loses_and_repeats_nothing(
    lgb_run: Path, key_prefix: str, real_redis_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CRASH_TEST_SEED", "0") or 0) or random.randrange(2**32)
    rng = random.Random(seed)
    print(f"crash schedule seed: {seed}")
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    h.create_group(client, keys)
    config = h.write_config(
        tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url, run_root=lgb_run,
        streams={"batch": 64, "block_ms": 20, "lease_ms": 800},
        state={"warmup_bars": 40},  # replay caps at 40 bars: still more than any window
    )
    bars = h.walk_bars(h.symbols(30), 120, seed=seed % 1000)
    entries, bad = _feed(bars, every=400)
    feeder = h.Feeder(real_redis_url, keys.input, entries, rate_per_s=200, chunk=100)
    kills: list[str] = []
    with h.Daemon(config, tmp_path / "daemon.log") as daemon:
        started = time.monotonic()
        daemon.start()
        feeder.start()
        h.wait_for(lambda: client.xlen(keys.output) > 0, 90, "the first output",
                   check=daemon.check_alive)
        startup_s = time.monotonic() - started
        for k in range(4):
            if k % 2 == 0:
                # Serving: right after a commit, while the overlapped next read is in hand.
                seen = client.xlen(keys.output)
                h.wait_for(
                    lambda seen=seen: client.xlen(keys.output) > seen or not feeder.is_alive(),
                    90, "the restarted daemon to publish", check=daemon.check_alive,
                    interval_s=0.005,
                )
                time.sleep(rng.uniform(0.0, 0.05))
                kills.append("serving")
            else:
                # Anywhere from loading the models to serving.
                time.sleep(rng.uniform(0.2, startup_s + 1.0))
                kills.append("anytime")
            daemon.check_alive()
            daemon.kill9()
            time.sleep(rng.uniform(0.0, 1.0))  # the feeder keeps publishing while it is down
            daemon.start()
        feeder.finish(120)
        total_ok = len(bars) + len(bad)

        h.wait_settled(lambda: client.xlen(keys.output) + client.xlen(keys.dead), total_ok,
                       quiet_s=15, timeout_s=120, check=daemon.check_alive)
        h.wait_settled(lambda: -h.pending_count(client, keys), 0, quiet_s=10, timeout_s=30)
        assert daemon.stop() == 0, daemon.log_tail()
    print(f"kills: {kills}; feeder retries: {feeder.retries}")

    published = [f"{keys.input}/{i}" for i in feeder.published]
    assert len(published) == len(entries)
    bad_srcs = {published[i] for i in bad}
    good_srcs = [s for i, s in enumerate(published) if i not in bad]

    events = h.read_outputs(client, keys.output)
    by_src = {e.src: e for e in events}
    repeated = len(events) - len(by_src)
    missing = set(good_srcs) - set(by_src)
    assert not missing, f"{len(missing)} bars without an output, e.g. {sorted(missing)[:3]}"
    assert set(by_src) == set(good_srcs)
    # The publish and the ack are one atomic write: a crash can't make a second output.
    assert repeated == 0, f"{repeated} bars published twice"
    dead = client.xrange(keys.dead)
    dead_srcs = [f"{f[b'src_stream'].decode()}/{f[b'src_id'].decode()}" for _, f in dead]
    assert sorted(dead_srcs) == sorted(bad_srcs)
    assert {f[b"error"] for _, f in dead} == {b"decode_error"}

    expected = h.expected_lightgbm(
        mf.family_dir(lgb_run, TARGET, "LightGBM") / "model.txt", h.feature_frames(bars)
    )
    compared = h.assert_outputs_match(
        list(by_src.values()), {"LightGBM": expected}, target=TARGET,
        rel={"LightGBM": 1e-6}, abs_={"LightGBM": 1e-9},
    )
    assert compared == {"LightGBM": len(bars)}
    assert h.pending_count(client, keys) == 0
    client.close()
