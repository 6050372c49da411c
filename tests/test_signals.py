"""Signals and systemd notification of the real `livepred run` (CONTRACT section 7):
SIGTERM under load drains and exits 0 losing nothing; SIGHUP swaps models under load without
a gap, and a broken new run keeps the old models; READY/WATCHDOG/RELOADING/STOPPING arrive."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests import daemon_harness as h
from tests import model_factory as mf

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TARGET = "fwd"
FEATURES_B = [*h.FEATURES, "ret_10d", "vol_20d"]  # other inputs: the swap rebuilds state


def _lgb_run(root: Path, run_id: str, features: list[str], seed: int) -> Path:
    X, y = h.training_frame(seed=seed, features=features)
    mf.write_lightgbm(root, TARGET, "LightGBM", X, y, features)
    mf.write_routing(root, TARGET, "LightGBM")
    mf.write_manifest(root, run_id=run_id)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    broken = base / "broken"
    family = mf.family_dir(broken, TARGET, "LightGBM")
    mf.write_meta(family, h.FEATURES)
    (family / "model.txt").write_text("this is not a LightGBM model\n")
    return {
        "a": _lgb_run(base / "a", "run-a", h.FEATURES, seed=11),
        "b": _lgb_run(base / "b", "run-b", FEATURES_B, seed=22),
        "broken": broken,
    }


def _point(link: Path, target: Path) -> None:
    """Switch the `current` symlink atomically, as a deployment would."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _model(run: Path) -> Path:
    return mf.family_dir(run, TARGET, "LightGBM") / "model.txt"


@pytest.fixture
def client(real_redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(real_redis_url)
    yield c
    c.close()


# ---- SIGTERM --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_drains_exits_zero_and_loses_nothing(
    runs: dict[str, Path], key_prefix: str, real_redis_url: str, client: redis.Redis,
    tmp_path: Path,
) -> None:
    keys = h.Keys(key_prefix)
    h.create_group(client, keys)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=runs["a"], streams={"batch": 128})
    bars = h.walk_bars(h.symbols(30), 150, seed=5)
    feeder = h.Feeder(real_redis_url, keys.input, [h.bar_fields(b) for b in bars], 2500)
    with h.Daemon(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        daemon.wait_serving()
        feeder.start()
        h.wait_for(lambda: client.xlen(keys.output) >= 500, 60, "outputs under load",
                   check=daemon.check_alive)
        assert feeder.is_alive(), "the feeder finished before the signal: no load"
        stopped_at = time.monotonic()
        assert daemon.stop(timeout_s=30) == 0, daemon.log_tail()
        drain_s = time.monotonic() - stopped_at
        feeder.finish(60)

        # Right after the exit: every entry the group acknowledged has its output, and
        # every output's entry is acknowledged; what was read and not finished is pending.
        published = [f"{keys.input}/{i}" for i in feeder.published]
        pending = {
            f"{keys.input}/{r['message_id'].decode()}"
            for r in client.xpending_range(keys.input, keys.group, "-", "+", count=100_000)
        }
        info = h.group_info(client, keys)
        assert info is not None
        last = tuple(int(x) for x in info["last-delivered-id"].decode().split("-"))
        delivered = {s for s in published if _id(s) <= last}
        acked = delivered - pending
        outputs = {e.src for e in h.read_outputs(client, keys.output)}
        assert outputs == acked, "an entry acknowledged without its output, or the reverse"
        assert client.xlen(keys.output) == len(outputs)
        assert 0 < len(acked) < len(published)
        print(f"drained in {drain_s:.2f}s: {len(acked)} done, {len(pending)} pending, "
              f"{len(published) - len(delivered)} not read")

        # The next start finishes the rest: every bar exactly one output.
        daemon.start()
        h.wait_for(lambda: client.xlen(keys.output) >= len(bars), 90, "the rest",
                   check=daemon.check_alive)
        h.wait_for(lambda: h.pending_count(client, keys) == 0, 30, "nothing pending")
        assert daemon.stop() == 0

    events = h.read_outputs(client, keys.output)
    assert sorted(e.src for e in events) == sorted(published)
    expected = h.expected_lightgbm(_model(runs["a"]), h.feature_frames(bars))
    h.assert_outputs_match(events, {"LightGBM": expected}, target=TARGET,
                           rel={"LightGBM": 1e-6}, abs_={"LightGBM": 1e-9})


# The pickled class lives in tests/: the daemon imports it from this checkout.
_WITH_TESTS = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _hanging_run(root: Path, trigger: Path) -> Path:
    """A LightGBM family beside a pickled one that hangs for an hour once `trigger` exists
    (in predict), or `trigger`.load (in unpickling)."""
    X, y = h.training_frame(seed=3, features=h.FEATURES)
    mf.write_lightgbm(root, TARGET, "LightGBM", X, y, h.FEATURES)
    mf.write_generic_pickle(root, TARGET, "Hangs", X, y, h.FEATURES,
                            predictor=mf.Misbehaving(hang_if=str(trigger)))
    return root


@pytest.mark.slow
def test_sigterm_with_a_model_call_that_never_returns_exits_in_bounded_time(
    key_prefix: str, real_redis_url: str, client: redis.Redis, tmp_path: Path,
) -> None:
    # The hung call holds its thread for an hour: the process leaves without it (systemd
    # would SIGKILL it after TimeoutStopSec=30; outside systemd it would hang for ever).
    trigger = tmp_path / "hang"
    run = _hanging_run(tmp_path / "run", trigger)
    keys = h.Keys(key_prefix)
    h.create_group(client, keys)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=run)
    bars = h.walk_bars(["AAA", "BBB"], 3, seed=5)
    with h.Daemon(config, tmp_path / "daemon.log", env=h.daemon_env(**_WITH_TESTS)) as daemon:
        daemon.start()
        daemon.wait_serving()
        for bar in bars[:2]:
            client.xadd(keys.input, h.bar_fields(bar))
        h.wait_for(lambda: client.xlen(keys.output) >= 2, 60, "the first outputs",
                   check=daemon.check_alive)
        trigger.touch()
        for bar in bars[2:]:
            client.xadd(keys.input, h.bar_fields(bar))
        h.wait_for(lambda: h.pending_count(client, keys) > 0, 30, "the batch to hang")
        time.sleep(0.5)
        stopped_at = time.monotonic()
        assert daemon.stop(timeout_s=28) == 0, daemon.log_tail()
        assert time.monotonic() - stopped_at < 25
    log = daemon.log_text()
    assert "a model call did not finish within 3 s of the stop" in log
    assert "thread(s) still running" in log
    assert client.xlen(keys.output) == 2  # the hung batch was not published: it stays pending
    assert h.pending_count(client, keys) == len(bars) - 2


@pytest.mark.slow
def test_sigterm_while_a_model_load_hangs_exits_at_once(
    key_prefix: str, real_redis_url: str, tmp_path: Path,
) -> None:
    trigger = tmp_path / "hang"
    run = _hanging_run(tmp_path / "run", trigger)
    Path(str(trigger) + ".load").touch()
    config = h.write_config(tmp_path / "livepred.toml", keys=h.Keys(key_prefix),
                            redis_url=real_redis_url, run_root=run)
    with h.Daemon(config, tmp_path / "daemon.log", env=h.daemon_env(**_WITH_TESTS)) as daemon:
        daemon.start()
        # The last line names the file being loaded.
        h.wait_for(lambda: "model.pkl (pickle)" in daemon.log_text(), 60, "the hung load",
                   check=daemon.check_alive)
        stopped_at = time.monotonic()
        assert daemon.stop(timeout_s=20) == 0, daemon.log_tail()
        assert time.monotonic() - stopped_at < 15
    log = daemon.log_text()
    assert "stopped while starting" in log
    assert "model refused" not in log and "model loaded" not in log  # it hung in the pickle


def _id(src: str) -> tuple[int, int]:
    ms, seq = src.rsplit("/", 1)[1].split("-")
    return int(ms), int(seq)


# ---- SIGHUP ---------------------------------------------------------------------------------


def _reloads(daemon: h.Daemon) -> int:
    log = daemon.log_text()
    return log.count("models reloaded") + log.count("reload failed")


def _serve_with_reloads(
    runs: dict[str, Path], switch_to: list[str], keys: h.Keys, redis_url: str,
    client: redis.Redis, tmp_path: Path,
) -> tuple[list, list[dict], h.Daemon]:
    """Start on run a (through a `current` symlink), feed steadily, and at intervals point
    the symlink at each of `switch_to` and send SIGHUP. Returns the outputs and bars."""
    link = tmp_path / "current"
    _point(link, runs["a"])
    h.create_group(client, keys)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=redis_url,
                            run_root=link, streams={"batch": 64})
    bars = h.walk_bars(h.symbols(25), 120, seed=9)
    feeder = h.Feeder(redis_url, keys.input, [h.bar_fields(b) for b in bars], 500)
    daemon = h.Daemon(config, tmp_path / "daemon.log")
    with daemon:
        daemon.start()
        feeder.start()
        for k, name in enumerate(switch_to):
            goal = (k + 1) * len(bars) // (len(switch_to) + 2)
            h.wait_for(lambda goal=goal: client.xlen(keys.output) >= goal, 90,
                       f"{goal} outputs", check=daemon.check_alive)
            assert feeder.is_alive(), "the feeder finished before the reload: no load"
            _point(link, runs[name])
            reloads = _reloads(daemon)
            daemon.signal(signal.SIGHUP)
            h.wait_for(lambda reloads=reloads: _reloads(daemon) > reloads, 60,
                       "the reload to finish", check=daemon.check_alive)
        feeder.finish(90)
        h.wait_for(lambda: client.xlen(keys.output) >= len(bars), 90, "every output",
                   check=daemon.check_alive)
        h.wait_for(lambda: h.pending_count(client, keys) == 0, 30, "nothing pending")
        assert daemon.stop() == 0, daemon.log_tail()
    events = h.read_outputs(client, keys.output)
    assert sorted(e.src for e in events) == sorted(f"{keys.input}/{i}" for i in feeder.published)
    assert client.xlen(keys.dead) == 0
    return events, bars, daemon


@pytest.mark.slow
def test_sighup_swaps_models_under_load_without_a_gap(
    runs: dict[str, Path], key_prefix: str, real_redis_url: str, client: redis.Redis,
    tmp_path: Path,
) -> None:
    events, bars, daemon = _serve_with_reloads(
        runs, ["b"], h.Keys(key_prefix), real_redis_url, client, tmp_path
    )
    assert "models reloaded" in daemon.log_text()
    # In stream order: run a, then run b from one bar on, never back.
    order = [e.run for e in events]
    switch = order.index("run-b")
    assert 0 < switch and set(order[:switch]) == {"run-a"} and set(order[switch:]) == {"run-b"}
    old = [e for e in events if e.run == "run-a"]
    new = [e for e in events if e.run == "run-b"]
    want_a = h.expected_lightgbm(_model(runs["a"]), h.feature_frames(bars))
    want_b = h.expected_lightgbm(_model(runs["b"]), h.feature_frames(bars, FEATURES_B))
    tol = {"rel": {"LightGBM": 1e-6}, "abs_": {"LightGBM": 1e-9}}
    h.assert_outputs_match(old, {"LightGBM": want_a}, target=TARGET, **tol)
    # Run b reads more features: its state was rebuilt from the stream at the swap, so the
    # first bars after it already carry the full-history values.
    h.assert_outputs_match(new, {"LightGBM": want_b}, target=TARGET, **tol)


@pytest.mark.slow
def test_sighup_with_a_broken_run_keeps_serving_the_old_models(
    runs: dict[str, Path], key_prefix: str, real_redis_url: str, client: redis.Redis,
    tmp_path: Path,
) -> None:
    events, bars, daemon = _serve_with_reloads(
        runs, ["broken"], h.Keys(key_prefix), real_redis_url, client, tmp_path
    )
    assert "reload failed" in daemon.log_text()
    assert {e.run for e in events} == {"run-a"}
    want_a = h.expected_lightgbm(_model(runs["a"]), h.feature_frames(bars))
    h.assert_outputs_match(events, {"LightGBM": want_a}, target=TARGET,
                           rel={"LightGBM": 1e-6}, abs_={"LightGBM": 1e-9})


# ---- systemd notify -------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_systemd_notifications_ready_watchdog_reloading_stopping(
    runs: dict[str, Path], key_prefix: str, real_redis_url: str, client: redis.Redis,
    tmp_path: Path,
) -> None:
    directory = tempfile.mkdtemp(prefix="lpn")  # a socket path must stay short
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.05)
    received: list[str] = []

    def collect() -> None:
        try:
            while True:
                received.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            pass

    def count(message: str) -> int:
        collect()
        return received.count(message)

    keys = h.Keys(key_prefix)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=runs["a"])
    env = h.daemon_env(NOTIFY_SOCKET=address)
    try:
        with h.Daemon(config, tmp_path / "daemon.log", env=env) as daemon:
            daemon.start()
            h.wait_for(lambda: count("READY=1") > 0, 90, "READY=1", check=daemon.check_alive)
            h.wait_for(lambda: count("WATCHDOG=1") > 0, 10, "WATCHDOG=1",
                       check=daemon.check_alive)
            daemon.signal(signal.SIGHUP)
            h.wait_for(lambda: count("RELOADING=1") > 0, 30, "RELOADING=1",
                       check=daemon.check_alive)
            h.wait_for(lambda: count("READY=1") > 1, 60, "READY=1 after the reload",
                       check=daemon.check_alive)
            watchdogs = count("WATCHDOG=1")
            h.wait_for(lambda: count("WATCHDOG=1") > watchdogs, 10, "WATCHDOG=1 again")
            assert daemon.stop() == 0, daemon.log_tail()
            h.wait_for(lambda: count("STOPPING=1") > 0, 5, "STOPPING=1")
        assert received.index("READY=1") < received.index("WATCHDOG=1")
        reloading = received.index("RELOADING=1")
        assert "READY=1" in received[reloading:]
        assert received.index("STOPPING=1") > reloading
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)



_HUP_WHILE_STARTING = """
import os, signal, sys
import daemon.settings as settings
real = settings.load_settings
def hup_then_load(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)  # the config is read after the heavy imports
    return real(*args, **kwargs)
settings.load_settings = hup_then_load
from daemon import cli
sys.exit(cli.main(["run", "--config", sys.argv[1], "--check", "--offline"]))
"""


def test_a_sighup_while_the_command_starts_does_not_kill_it(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    # SIGHUP's default action ends a process; `livepred run` catches it before anything slow.
    config = h.write_config(tmp_path / "livepred.toml", keys=h.Keys("unused:"),
                            redis_url="redis://127.0.0.1:1/0", run_root=runs["a"])
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _HUP_WHILE_STARTING, str(config)],
                          env=h.daemon_env(), capture_output=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])
    assert "config ok" in done.stderr.decode()


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (/proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_sighup_while_the_daemon_starts_is_a_reload_once_it_serves(
    runs: dict[str, Path], key_prefix: str, real_redis_url: str, tmp_path: Path,
) -> None:
    # SIGHUP's default action ends the process: one sent as soon as the command runs (its
    # handler is the first thing it sets), while the models still load, must not kill it.
    keys = h.Keys(key_prefix)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=runs["a"])
    with h.Daemon(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        h.wait_for(lambda: _catches(daemon.pid, signal.SIGHUP), 30, "a SIGHUP handler",
                   check=daemon.check_alive)
        assert "models loaded" not in daemon.log_text() and "model loaded" not in daemon.log_text()
        daemon.signal(signal.SIGHUP)
        daemon.wait_serving()
        h.wait_for(lambda: "models reloaded" in daemon.log_text(), 60, "the reload",
                   check=daemon.check_alive)
        assert daemon.stop() == 0, daemon.log_tail()
