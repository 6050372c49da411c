"""The real `livepred run` as a subprocess against the real Redis: LightGBM, Keras and a
TorchScript LSTM in one run, every output equal to the framework's own predict on the pandas
reference features; `run --check` and start-up errors as one line naming the key."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import redis

from tests import daemon_harness as h
from tests import model_factory as mf

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TARGET = "fwd"
SEQUENCE_LENGTH = 10


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.write_lightgbm_run(tmp_path_factory.mktemp("lgb_run"), TARGET, "lgb-run")


@pytest.fixture(scope="module")
def three_framework_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nn_run")
    X, y = h.training_frame()
    mf.write_lightgbm(root, TARGET, "LightGBM", X, y, h.FEATURES)
    finite = np.isfinite(X).all(axis=1)
    mf.write_keras(root, TARGET, "MLP", X[finite], y[finite], h.FEATURES, epochs=2)
    windows = h.sequences_of(X, SEQUENCE_LENGTH)
    mf.write_torchscript(root, TARGET, "LSTM", windows, y[: len(windows)], h.FEATURES, epochs=10)
    mf.write_routing(root, TARGET, "MLP")
    mf.write_manifest(root, run_id="three-frameworks")
    return root


@pytest.mark.slow
def test_one_run_serves_lightgbm_keras_and_torchscript_exactly(
    three_framework_run: Path, key_prefix: str, real_redis_url: str, tmp_path: Path
) -> None:
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    h.create_group(client, keys)
    config = h.write_config(
        tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
        run_root=three_framework_run, streams={"batch": 256},
    )
    bars = h.walk_bars(h.symbols(40), 100, seed=7)  # 4000 bars, interleaved by minute
    with h.Daemon(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        feeder = h.Feeder(real_redis_url, keys.input, [h.bar_fields(b) for b in bars], 2000)
        feeder.start()
        feeder.finish(120)
        h.wait_settled(lambda: client.xlen(keys.output), len(bars), quiet_s=30, timeout_s=180,
                       check=daemon.check_alive)
        h.wait_settled(lambda: -h.pending_count(client, keys), 0, quiet_s=10, timeout_s=30)
        assert h.pending_count(client, keys) == 0
        assert daemon.stop() == 0, daemon.log_tail()

    events = h.read_outputs(client, keys.output)
    assert len(events) == len(bars)
    assert sorted(e.src for e in events) == sorted(f"{keys.input}/{i}" for i in feeder.published)
    assert client.xlen(keys.dead) == 0
    assert {e.run for e in events} == {"three-frameworks"}

    frames = h.feature_frames(bars)
    family = mf.family_dir
    expected = {
        "LightGBM": h.expected_lightgbm(family(three_framework_run, TARGET, "LightGBM") / "model.txt", frames),
        "MLP": h.expected_keras(family(three_framework_run, TARGET, "MLP") / "model.keras", frames),
        "LSTM": h.expected_torch_sequence(
            family(three_framework_run, TARGET, "LSTM") / "model.pt", frames, SEQUENCE_LENGTH
        ),
    }
    compared = h.assert_outputs_match(
        events, expected, target=TARGET,
        rel={"LightGBM": 1e-6, "MLP": 1e-5, "LSTM": 1e-5},
        abs_={"LightGBM": 1e-9, "MLP": 1e-6, "LSTM": 1e-6},
    )
    # 40 symbols: every bar for the tree, from bar 20 for the MLP, from bar 29 for the LSTM.
    assert compared == {"LightGBM": 4000, "MLP": 40 * 81, "LSTM": 40 * 72}
    for e in events:
        result = e.targets[TARGET]
        assert result.selected == "MLP"
        assert result.pred == result.preds.get("MLP")
        assert not result.failed
        assert e.lat_us >= 0
        if "LSTM" in result.warming:
            assert result.warming["LSTM"] >= 1
    client.close()


# ---- run --check and start-up errors -----------------------------------------------------


def _config(tmp_path: Path, run_root: Path, **sections: dict) -> Path:
    keys = h.Keys("lpcheck:unused:")
    return h.write_config(
        tmp_path / "livepred.toml", keys=keys, redis_url="redis://127.0.0.1:6379/13",
        run_root=run_root, **sections,
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("livepred: error: "), lines[0]
    return lines[0]


@pytest.mark.e2e
def test_check_accepts_a_good_config(lgb_run: Path, tmp_path: Path) -> None:
    done = h.run_cli("run", "--config", str(_config(tmp_path, lgb_run)), "--check")
    assert done.returncode == 0, done.stderr
    assert "LightGBM" in done.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("streams", "key"),
    [({"batch": 0}, "streams.batch"), ({"block_ms": 0}, "streams.block_ms"),
     ({"lease_ms": "soon"}, "streams.lease_ms")],
)
def test_check_rejects_a_bad_key_in_one_line(
    lgb_run: Path, tmp_path: Path, streams: dict, key: str
) -> None:
    done = h.run_cli("run", "--config", str(_config(tmp_path, lgb_run, streams=streams)), "--check")
    assert done.returncode != 0
    assert key in _one_error_line(done.stderr)


@pytest.mark.e2e
def test_check_tries_the_metrics_port_as_run_would(lgb_run: Path, tmp_path: Path) -> None:
    # `run --check` said "config ok" for a port another process held; `run` then exited 2.
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        env = h.daemon_env(LIVEPRED_METRICS__PORT=str(port), LIVEPRED_METRICS__HOST="127.0.0.1")
        done = h.run_cli("run", "--config", str(_config(tmp_path, lgb_run)), "--check",
                         "--offline", env=env)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"livepred: error: metrics.port = {port}") and "another process" in line


@pytest.mark.e2e
def test_livepred_config_names_the_file_when_config_is_not_given(
    lgb_run: Path, tmp_path: Path
) -> None:
    # LIVEPRED_CONFIG was reserved (no key may be called that) but read by nothing: the
    # daemon started on the defaults, another run root and Redis, without a word.
    config = _config(tmp_path, lgb_run, state={"symbol_ttl_s": 0})  # invalid: shows it is read
    done = h.run_cli("run", "--check", "--offline",
                     env=h.daemon_env(LIVEPRED_CONFIG=str(config)))
    assert done.returncode == 2
    assert "state.symbol_ttl_s" in _one_error_line(done.stderr)


@pytest.mark.e2e
def test_an_environment_override_is_checked_too(lgb_run: Path, tmp_path: Path) -> None:
    env = h.daemon_env(LIVEPRED_STATE__SYMBOL_TTL_S="0")
    done = h.run_cli("run", "--config", str(_config(tmp_path, lgb_run)), "--check", env=env)
    assert done.returncode != 0
    line = _one_error_line(done.stderr)
    assert "state.symbol_ttl_s" in line and "LIVEPRED_STATE__SYMBOL_TTL_S" in line


@pytest.mark.e2e
@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_an_unreadable_run_root_exits_with_one_line(tmp_path: Path, check: bool, kind: str) -> None:
    run_root = tmp_path / "no-such-run"
    if kind == "file":
        run_root.write_text("not a directory")
    args = ["run", "--config", str(_config(tmp_path, run_root))] + (["--check"] if check else [])
    done = h.run_cli(*args, timeout_s=60)
    assert done.returncode == 2  # a configuration error: systemd does not restart it
    assert "run_root" in _one_error_line(done.stderr)


@pytest.mark.e2e
def test_a_redis_url_that_redis_refuses_exits_with_one_line(
    lgb_run: Path, tmp_path: Path, real_redis_url: str
) -> None:
    # Reachable but refused (here a database index the server does not have): waiting will
    # not fix it, so the start fails at once, before the models load (exit 2, no restart).
    config = h.write_config(
        tmp_path / "livepred.toml", keys=h.Keys("lpcheck:unused:"),
        redis_url=real_redis_url.rsplit("/", 1)[0] + "/999", run_root=lgb_run,
    )
    done = h.run_cli("run", "--config", str(config), timeout_s=60)
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "redis.url" in line and "/999" in line and "refused" in line


@pytest.mark.e2e
def test_check_reports_the_streams_group_and_lease(
    lgb_run: Path, key_prefix: str, real_redis_url: str, tmp_path: Path
) -> None:
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    for i in range(5):
        client.xadd(keys.input, {"symbol": "A", "ts": str(i + 1)})
    client.xgroup_create(keys.input, keys.group, id="0")
    client.xreadgroup(keys.group, "someone", {keys.input: ">"}, count=2)  # 2 pending
    client.set(f"{keys.group}:lease", "host-1", px=60_000)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=lgb_run)
    done = h.run_cli("run", "--config", str(config), "--check", timeout_s=120)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert f"stream  {keys.input} (streams.input): 5 entries" in err
    assert f"group   {keys.input} {keys.group}: 2 pending, 1 consumers" in err
    assert "3 entries not yet read" in err
    assert f"stream  {keys.output} (streams.output): absent" in err
    assert f"lease   {keys.group}:lease: held by 'host-1'" in err
    assert err.rstrip().endswith("config ok")
    assert client.exists(keys.output, keys.dead) == 0  # a look: nothing created
    client.close()


@pytest.mark.e2e
def test_check_refuses_a_stream_key_of_another_type_in_one_line(
    lgb_run: Path, key_prefix: str, real_redis_url: str, tmp_path: Path
) -> None:
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    client.set(keys.input, "not a stream")
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=lgb_run)
    done = h.run_cli("run", "--config", str(config), "--check", timeout_s=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("livepred: error")]
    assert len(errors) == 1
    assert "streams.input" in errors[0] and repr(keys.input) in errors[0]
    assert "holds a Redis string" in errors[0]
    client.close()


@pytest.mark.e2e
def test_check_says_when_redis_does_not_answer(lgb_run: Path, tmp_path: Path) -> None:
    config = h.write_config(tmp_path / "livepred.toml", keys=h.Keys("lpcheck:unused:"),
                            redis_url="redis://127.0.0.1:1/0", run_root=lgb_run)
    done = h.run_cli("run", "--config", str(config), "--check", timeout_s=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("livepred: error")]
    assert len(errors) == 1 and "redis.url" in errors[0] and "--offline" in errors[0]
    assert "config ok" not in done.stderr
    offline = h.run_cli("run", "--config", str(config), "--check", "--offline", timeout_s=120)
    assert offline.returncode == 0 and "config ok" in offline.stderr


@pytest.mark.e2e
def test_a_metrics_port_in_use_exits_with_one_line(lgb_run: Path, tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = _config(tmp_path, lgb_run, metrics={"port": port})
        done = h.run_cli("run", "--config", str(config), timeout_s=120)
    finally:
        taken.close()
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert f"metrics.port = {port}" in line and "cannot listen" in line


@pytest.mark.e2e
def test_sigterm_before_any_bar_exits_zero(lgb_run: Path, key_prefix: str, real_redis_url: str,
                                          tmp_path: Path) -> None:
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=lgb_run)
    with h.Daemon(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        h.wait_for(lambda: h.group_info(client, keys) is not None, 60,
                   "the daemon to create its group", check=daemon.check_alive)
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 0, daemon.log_tail()
    client.close()
