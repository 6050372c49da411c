"""Helpers for the tests that run `livepred run` as a subprocess: config files, the daemon and
redis-server processes, feeders, and the independent expectations. Not a test module.

Expectations never come from the daemon's own code: features from the pandas reference
(`FeatureBuilder.build_frame`), predictions from each framework's own predict.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pandas as pd
import redis

from daemon.wire_events import PredictionEvent, decode_prediction
from handlers.features import FeatureBuilder
from tests import model_factory as mf

LIVEPRED = Path(sys.executable).parent / "livepred"
REDIS_SERVER = "redis-server"
MIN_MS = 60_000
T0_MS = 1_700_000_000_000
FEATURES = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]


# ---- bars -----------------------------------------------------------------------------------


def symbols(count: int) -> list[str]:
    return [f"S{i:03d}" for i in range(count)]


def walk_bars(names: Sequence[str], per_symbol: int, seed: int = 1, start: int = 0) -> list[dict]:
    """Interleaved random-walk bars, one per symbol per minute, prices of different scales.

    `start` continues a walk: bars `start .. start + per_symbol - 1` of the same seed.
    """
    rng = np.random.default_rng(seed)
    total = start + per_symbol
    steps = rng.normal(0, 0.01, size=(total, len(names)))
    scales = 10.0 ** rng.uniform(-1, 4, size=len(names))
    closes = scales * np.exp(np.cumsum(steps, axis=0))
    bars = []
    for t in range(start, total):
        for j, name in enumerate(names):
            c = float(closes[t, j])
            bars.append(
                {"symbol": name, "ts": T0_MS + (t + 1) * MIN_MS, "open": c, "high": c * 1.001,
                 "low": c * 0.999, "close": c, "volume": float(100 + t)}
            )
    return bars


def bar_fields(bar: dict, **extra: Any) -> dict[str, bytes]:
    return {"data": msgpack.packb({**bar, **extra}, use_bin_type=True)}


def training_frame(
    per_symbol: int = 600, seed: int = 123, features: Sequence[str] = FEATURES
) -> tuple[np.ndarray, np.ndarray]:
    """Realistic feature rows (pandas reference over a random walk) and a target, so that
    trained models actually react to their inputs."""
    bars = walk_bars(symbols(4), per_symbol, seed=seed)
    frame = pd.DataFrame(bars)
    rows = []
    for _, g in frame.groupby("symbol", sort=False):
        rows.append(FeatureBuilder(list(features)).build_frame(g.reset_index(drop=True)))
    X = pd.concat(rows).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    y = np.nan_to_num(X[:, 0]) * 50 + np.nan_to_num(X[:, -1]) * 0.5 + rng.normal(0, 0.1, len(X))
    return X, y


def sequences_of(X: np.ndarray, length: int) -> np.ndarray:
    """(N - T + 1, T, F) windows of the finite rows of X (training data for sequence models)."""
    finite = X[np.isfinite(X).all(axis=1)]
    return np.stack([finite[i : i + length] for i in range(len(finite) - length + 1)])


# ---- expectations ---------------------------------------------------------------------------


def feature_frames(bars: Iterable[dict], features: Sequence[str] = FEATURES) -> dict[str, pd.DataFrame]:
    """Symbol -> the pandas-reference feature frame after each of its bars, with `ts`."""
    frame = pd.DataFrame(list(bars))
    out = {}
    for name, g in frame.groupby("symbol", sort=False):
        g = g.reset_index(drop=True)
        features_frame = FeatureBuilder(list(features)).build_frame(g)
        features_frame.index = g["ts"].astype(np.int64).to_numpy()
        out[str(name)] = features_frame
    return out


def expected_lightgbm(model_file: Path, frames: dict[str, pd.DataFrame]) -> dict[tuple[str, int], float]:
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(model_file))
    out = {}
    for name, f in frames.items():
        preds = booster.predict(f.to_numpy(dtype=np.float32).astype(np.float64))
        out.update({(name, int(ts)): float(p) for ts, p in zip(f.index, preds, strict=True)})
    return out


def expected_keras(model_file: Path, frames: dict[str, pd.DataFrame]) -> dict[tuple[str, int], float]:
    """Keras MLP: only bars whose inputs are all finite."""
    import keras

    model = keras.saving.load_model(str(model_file), compile=False)
    out = {}
    for name, f in frames.items():
        x = f.to_numpy(dtype=np.float64).astype(np.float32)
        ready = np.isfinite(x).all(axis=1)
        if not ready.any():
            continue
        preds = np.asarray(model.predict(x[ready], verbose=0)).reshape(-1)
        out.update(
            {(name, int(ts)): float(p) for ts, p in zip(f.index[ready], preds, strict=True)}
        )
    return out


def expected_torch_sequence(
    model_file: Path, frames: dict[str, pd.DataFrame], length: int
) -> dict[tuple[str, int], float]:
    """TorchScript sequence model: the last T rows of the frame, (1, T, F) float32, once all
    T rows are finite."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        module = torch.jit.load(str(model_file)).eval()
    out = {}
    for name, f in frames.items():
        x = f.to_numpy(dtype=np.float64).astype(np.float32)
        windows, stamps = [], []
        for i in range(length - 1, len(x)):
            window = x[i - length + 1 : i + 1]
            if np.isfinite(window).all():
                windows.append(window)
                stamps.append(int(f.index[i]))
        if not windows:
            continue
        with torch.inference_mode():
            preds = module(torch.from_numpy(np.stack(windows))).numpy().reshape(-1)
        out.update({(name, ts): float(p) for ts, p in zip(stamps, preds, strict=True)})
    return out


# ---- Redis ----------------------------------------------------------------------------------



def write_lightgbm_run(root: Path, target: str, run_id: str) -> Path:
    """A run with one LightGBM family trained on realistic feature rows, routed and hashed."""
    X, y = training_frame()
    mf.write_lightgbm(root, target, "LightGBM", X, y, FEATURES)
    mf.write_routing(root, target, "LightGBM")
    mf.write_manifest(root, run_id=run_id)
    return root

@dataclass(frozen=True)
class Keys:
    """The daemon's stream names, all under the test's key prefix (cleaned up afterwards)."""

    prefix: str

    @property
    def input(self) -> str:
        return f"{self.prefix}bars"

    @property
    def output(self) -> str:
        return f"{self.prefix}predictions"

    @property
    def dead(self) -> str:
        return f"{self.prefix}bars:dead"

    @property
    def group(self) -> str:
        return f"{self.prefix}livepred"


def create_group(client: redis.Redis, keys: Keys) -> None:
    """The group at `$` before anything is published: every bar from now on is live."""
    with contextlib.suppress(redis.ResponseError):
        client.xgroup_create(keys.input, keys.group, id="$", mkstream=True)


def read_outputs(client: redis.Redis, stream: str) -> list[PredictionEvent]:
    out: list[PredictionEvent] = []
    start = "-"
    while True:
        rows = client.xrange(stream, min=start, max="+", count=5000)
        out.extend(decode_prediction(f) for _, f in rows)
        if len(rows) < 5000:
            return out
        start = "(" + rows[-1][0].decode()


def pending_count(client: redis.Redis, keys: Keys) -> int:
    return int(client.xpending(keys.input, keys.group)["pending"])


def group_info(client: redis.Redis, keys: Keys) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(keys.input)
    except redis.ResponseError:
        return None
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == keys.group:
            return g
    return None


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, *,
             interval_s: float = 0.05, check: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def wait_settled(count: Callable[[], int], target: int, *, quiet_s: float, timeout_s: float,
                 check: Callable[[], None] | None = None) -> int:
    """Until `count()` reaches `target`, or stops moving for `quiet_s` (then the test's own
    assertions say what is missing, instead of a bare time-out). Returns the last count."""
    deadline = time.monotonic() + timeout_s
    last, moved = count(), time.monotonic()
    while last < target:
        if check is not None:
            check()
        now = time.monotonic()
        if now - moved > quiet_s or now > deadline:
            break
        time.sleep(0.05)
        value = count()
        if value != last:
            last, moved = value, time.monotonic()
    return last


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Feeder(threading.Thread):
    """Publishes field maps (`bar_fields(bar)` or anything else) at a steady rate.

    Each chunk goes out as one MULTI/EXEC: a chunk the server never ran leaves no entry, so
    a connection error is retried without publishing anything twice.
    """

    def __init__(self, url: str, stream: str, entries: Sequence[dict], rate_per_s: float,
                 chunk: int = 20) -> None:
        super().__init__(daemon=True)
        self.url, self.stream, self.rate_per_s, self.chunk = url, stream, rate_per_s, chunk
        self.entries = list(entries)  # field maps: bar_fields(bar), or anything to publish
        self.published: list[str] = []  # entry ids, in order
        self.error: BaseException | None = None
        self.retries = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=5)
            started = time.monotonic()
            i = 0
            while i < len(self.entries) and not self._halt.is_set():
                chunk = self.entries[i : i + self.chunk]
                try:
                    pipe = client.pipeline(transaction=True)
                    for fields in chunk:
                        pipe.xadd(self.stream, fields)
                    ids = pipe.execute()
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    self.retries += 1
                    time.sleep(0.1)
                    continue
                self.published.extend(x.decode() for x in ids)
                i += len(chunk)
                delay = started + i / self.rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            client.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()

    def finish(self, timeout_s: float) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "feeder did not finish"
        if self.error is not None:
            raise self.error


# ---- processes ------------------------------------------------------------------------------


def write_config(path: Path, *, keys: Keys, redis_url: str, run_root: Path,
                 **sections: dict[str, Any]) -> Path:
    """A TOML config whose streams and group are all under the test's key prefix."""
    values: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "streams": {
            "input": [keys.input], "output": keys.output, "dead_letter": keys.dead,
            "group": keys.group, "block_ms": 50, "lease_ms": 1000,
        },
        "models": {"run_root": str(run_root)},
        "metrics": {"port": 0},
        "log": {"format": "json"},
    }
    for section, table in sections.items():
        values.setdefault(section, {}).update(table)
    lines = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LIVEPRED_")}
    env.pop("NOTIFY_SOCKET", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def run_cli(*args: str, timeout_s: float = 120, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LIVEPRED), *args], capture_output=True, text=True, timeout=timeout_s,
        env=env or daemon_env(), cwd=cwd,
    )


class Daemon:
    """`livepred run --config PATH` in the background; its stderr (JSON logs) goes to a file
    that accumulates over restarts."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log_path = config, log_path
        self.env = env or daemon_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"----- start {self.starts} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(LIVEPRED), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd=self.config.parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"daemon exited with {self.proc.returncode if self.proc else None}"
                                 f"; log tail:\n{self.log_tail()}")

    def wait_serving(self, timeout_s: float = 90) -> None:
        """Until this start's worker is active (the log accumulates over restarts)."""
        marker = '"role": "active"'
        h_start = self.log_text().rfind(f"----- start {self.starts} -----")
        wait_for(lambda: marker in self.log_text()[h_start:], timeout_s,
                 "the daemon to serve", check=self.check_alive)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer:
    """A private redis-server on a loopback port, with an append-only file in `directory`
    so that its data survives a restart."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.directory), "--protected-mode", "no"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                return False

        wait_for(up, timeout_s, "redis-server to answer")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def shutdown(self, timeout_s: float = 15) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def assert_outputs_match(
    events: Sequence[PredictionEvent],
    expected: dict[str, dict[tuple[str, int], float]],
    *,
    target: str,
    rel: dict[str, float],
    abs_: dict[str, float],
) -> dict[str, int]:
    """Every family's published value equals the framework's own prediction, and a family is
    published exactly for the bars the expectation covers. Returns values compared per family."""
    compared = dict.fromkeys(expected, 0)
    problems: list[str] = []
    for e in events:
        result = e.targets[target]
        for family, table in expected.items():
            want = table.get((e.symbol, e.ts))
            got = result.preds.get(family)
            if want is None:
                if got is not None:
                    problems.append(f"{family} {e.symbol}@{e.ts}: published {got}, expected none")
                elif family not in result.warming:
                    problems.append(f"{family} {e.symbol}@{e.ts}: neither value nor warming")
                continue
            if got is None:
                problems.append(f"{family} {e.symbol}@{e.ts}: missing, expected {want} "
                                f"(warming={result.warming}, failed={result.failed})")
                continue
            if not abs(got - want) <= abs_[family] + rel[family] * abs(want):
                problems.append(f"{family} {e.symbol}@{e.ts}: {got} != {want}")
            compared[family] += 1
    assert not problems, f"{len(problems)} mismatches, first: " + "; ".join(problems[:5])
    return compared
