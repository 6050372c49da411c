"""Helpers for running several real `livepred run` processes against Redis (scale-out and
failover tests, and scripts/scaleout.py). Not a test module.

An `Instance` is one daemon subprocess with its own TOML config, log file and consumer name.
Each instance is given its own copy of the training run with its own `run_id`, so the `run`
field of every output says which instance published it (the models are byte-identical).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from daemon.partitions import partition_for_symbol, partition_key
from daemon.wire_events import PredictionEvent, decode_prediction
from handlers import FeatureBuilder
from tests import model_factory as mf

FEATURES = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
TARGET, FAMILY = "fwd", "LightGBM"
BAR_MS = 60_000
LIVEPRED = Path(sys.executable).parent / "livepred"
STOP_TIMEOUT_S = 20.0


# --- the model ---------------------------------------------------------------------------


def write_run(root: Path, run_id: str = "run-base") -> Path:
    """A one-family LightGBM run (regression on the six standard features)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(FEATURES)))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = np.nan_to_num(X[:, 0]) * 0.5 + np.nan_to_num(X[:, 3]) * 0.01 + rng.normal(0, 0.1, 400)
    mf.write_lightgbm(root, TARGET, FAMILY, X, y, FEATURES)
    mf.write_routing(root, TARGET, FAMILY)
    mf.write_manifest(root, run_id=run_id)
    return root


def copy_run(base: Path, dest: Path, run_id: str) -> Path:
    """The same model files under another run_id (tells which instance published an output)."""
    shutil.copytree(base, dest)
    mf.write_manifest(dest, run_id=run_id)
    return dest


def model_file(run_root: Path) -> Path:
    return mf.family_dir(run_root, TARGET, FAMILY) / "model.txt"


def expected_predictions(run_root: Path, bars: Sequence[dict]) -> dict[tuple[str, int], float]:
    """(symbol, ts) -> the framework's prediction on the pandas-reference features: what one
    uninterrupted single instance publishes for every bar."""
    booster = lgb.Booster(model_file=str(model_file(run_root)))
    out: dict[tuple[str, int], float] = {}
    frame = pd.DataFrame(list(bars))
    for symbol, group in frame.groupby("symbol", sort=False):
        history = group.reset_index(drop=True)
        features = FeatureBuilder(FEATURES).build_frame(history)
        preds = booster.predict(features.to_numpy(dtype=np.float32).astype(np.float64))
        for ts, pred in zip(history["ts"], preds, strict=True):
            out[(str(symbol), int(ts))] = float(pred)
    return out


# --- bars --------------------------------------------------------------------------------


def symbols_for(partitions: int, per_partition: int) -> list[str]:
    """Symbol names, `per_partition` of them routed to each partition."""
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < per_partition for v in chosen.values()):
        name = f"S{i:04d}"
        p = partition_for_symbol(name, partitions)
        if len(chosen[p]) < per_partition:
            chosen[p].append(name)
        i += 1
    return [s for p in range(partitions) for s in chosen[p]]


class BarWalk:
    """Random-walk bars, one per symbol per step, `ts` increasing per symbol."""

    def __init__(self, symbols: Sequence[str], seed: int = 1) -> None:
        self.symbols = list(symbols)
        self.rng = np.random.default_rng(seed)
        self.closes = {s: 50.0 + 10.0 * i for i, s in enumerate(self.symbols)}
        self.step_no = 0

    def step(self) -> list[dict]:
        self.step_no += 1
        bars = []
        moves = self.rng.normal(0, 0.01, len(self.symbols))
        for s, move in zip(self.symbols, moves, strict=True):
            c = self.closes[s] * float(np.exp(move))
            self.closes[s] = c
            bars.append({"symbol": s, "ts": self.step_no * BAR_MS, "open": c, "high": c * 1.001,
                         "low": c * 0.999, "close": c, "volume": 1000.0 + self.step_no})
        return bars

    def steps(self, n: int) -> list[dict]:
        return [bar for _ in range(n) for bar in self.step()]


# --- config and processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Names:
    """Stream, group and key names under a test's key prefix."""

    prefix: str

    @property
    def bars(self) -> str:
        return f"{self.prefix}bars"

    @property
    def predictions(self) -> str:
        return f"{self.prefix}predictions"

    @property
    def dead(self) -> str:
        return f"{self.prefix}bars:dead"

    @property
    def group(self) -> str:
        return f"{self.prefix}livepred"

    def lease(self, p: int) -> str:
        return partition_key(f"{self.group}:lease", p)

    def input_key(self, p: int) -> str:
        return partition_key(self.bars, p)

    def output_key(self, p: int) -> str:
        return partition_key(self.predictions, p)


def write_config(
    path: Path,
    *,
    redis_url: str,
    names: Names,
    consumer: str,
    run_root: Path,
    partitions: int,
    owned: Sequence[int] = (),
    lease_ms: int = 1000,
    metrics_port: int = 0,
    cluster: bool = False,
    batch: int = 512,
    block_ms: int = 50,
) -> Path:
    owned_list = ", ".join(str(p) for p in owned)
    path.write_text(
        f"""[redis]
url = "{redis_url}"
cluster = {"true" if cluster else "false"}

[streams]
input = ["{names.bars}"]
output = "{names.predictions}"
dead_letter = "{names.dead}"
group = "{names.group}"
consumer = "{consumer}"
batch = {batch}
block_ms = {block_ms}
partitions = {partitions}
partitions_owned = [{owned_list}]
lease_ms = {lease_ms}

[models]
run_root = "{run_root}"

[metrics]
port = {metrics_port}

[log]
level = "info"
format = "json"
"""
    )
    return path


@dataclass
class Instance:
    """One `livepred run` subprocess. Always `stop()` it (in a finally)."""

    name: str
    config: Path
    log_path: Path
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> Instance:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LIVEPRED_")}
        # PYTHONFAULTHANDLER: a stuck instance dumps its threads' stacks on SIGABRT (below).
        env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                    **self.env})
        env.pop("NOTIFY_SOCKET", None)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(LIVEPRED), "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a signal to the test's group never reaches it
        )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (after SIGCONT, in case it is stopped), then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)  # type: ignore[union-attr]

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        # (faulthandler's list of extension modules is one very long, useless line)
        return "\n".join(
            line for line in text[-lines:] if not line.startswith("Extension modules")
        )

    def metrics(self, timeout_s: float = 5.0) -> dict[str, float]:
        """The instance's /metrics as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            text = reply.read().decode()
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def stop_all(instances: Iterable[Instance]) -> None:
    for inst in instances:
        try:
            inst.stop()
        except Exception:  # noqa: BLE001 - cleanup must reach every instance
            if inst.proc is not None and inst.proc.poll() is None:
                inst.proc.kill()


# --- waiting and reading -----------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    timeout_s: float,
    what: str,
    instances: Sequence[Instance] = (),
    poll_s: float = 0.05,
) -> float:
    """Poll until `predicate()`; returns the seconds waited. Fails with the instances' logs."""
    started = time.monotonic()
    while not await predicate():
        dead = [i for i in instances if i.proc is not None and not i.alive()]
        if dead or time.monotonic() - started > timeout_s:
            states = {i.name: _state_of(i) for i in instances}
            if not dead:
                for inst in instances:  # where is it stuck? (faulthandler prints the stacks)
                    inst.signal(signal.SIGABRT)
                await asyncio.sleep(1.0)
            detail = "\n".join(f"--- {i.name} (exit {i.proc.poll() if i.proc else None}, "
                               f"{states[i.name]}):\n{i.log_tail()}" for i in instances)
            reason = f"instance {dead[0].name} exited" if dead else f"timed out after {timeout_s}s"
            raise AssertionError(f"waiting for {what}: {reason}\n{detail}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - started


def _state_of(instance: Instance) -> str:
    """The instance's partition roles and lease counters, from /metrics if it answers."""
    if not instance.metrics_port or not instance.alive():
        return "no metrics"
    try:
        metrics = instance.metrics(timeout_s=2.0)
    except OSError as exc:
        return f"metrics unavailable: {exc}"
    keep = ("livepred_partition_role", "livepred_lease", "livepred_partitions_owned",
            "livepred_redis_errors", "livepred_bars_in_total")
    return ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())
                     if k.startswith(keep) and v)


async def lease_holders(redis: Any, names: Names, partitions: int) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for p in range(partitions):
        value = await redis.get(names.lease(p))
        out[p] = value.decode() if value is not None else None
    return out


def holder_consumer(token: str | None) -> str | None:
    """The consumer name in a lease token (`<consumer>:<random>`)."""
    return token.rsplit(":", 1)[0] if token else None


async def create_groups(redis: Any, names: Names, partitions: int) -> None:
    """The consumer group at `$` on every input partition: every bar published afterwards is
    live (gets an output), whichever instance starts first."""
    for p in range(partitions):
        await redis.xgroup_create(names.input_key(p), names.group, id="$", mkstream=True)


async def count_outputs(redis: Any, names: Names, partitions: int) -> int:
    return sum([await redis.xlen(names.output_key(p)) for p in range(partitions)])


async def read_outputs(
    redis: Any, names: Names, partitions: int
) -> dict[int, list[tuple[str, PredictionEvent]]]:
    """Every output entry per partition, in stream order: (entry id, event)."""
    out: dict[int, list[tuple[str, PredictionEvent]]] = {}
    for p in range(partitions):
        rows = await redis.xrange(names.output_key(p))
        out[p] = [(i.decode() if isinstance(i, bytes) else i, decode_prediction(f))
                  for i, f in rows]
    return out


def check_exactly_once(
    outputs: dict[int, list[tuple[str, PredictionEvent]]],
    published: dict[str, tuple[str, int]],
    expected: dict[tuple[str, int], float],
) -> int:
    """Every published bar (src -> (symbol, ts)) has exactly one output, equal to the
    single-instance expectation, on the right partition. Returns the raw duplicate count
    (outputs whose src was already seen)."""
    seen: dict[str, PredictionEvent] = {}
    duplicates = 0
    for p, rows in outputs.items():
        for _, event in rows:
            # The output partition is the input partition the bar came from.
            assert event.src.rsplit("/", 1)[0].endswith(f":{{{p}}}"), event.src
            if event.src in seen:
                duplicates += 1
                continue
            seen[event.src] = event
    missing = sorted(set(published) - set(seen))
    unknown = sorted(set(seen) - set(published))
    assert not missing, f"{len(missing)} bars without an output, e.g. {missing[:3]}"
    assert not unknown, f"{len(unknown)} outputs for bars never published, e.g. {unknown[:3]}"
    for src, event in seen.items():
        symbol, ts = published[src]
        assert (event.symbol, event.ts) == (symbol, ts), src
        result = event.targets[TARGET]
        want = expected[(symbol, ts)]
        got = result.preds[FAMILY]
        assert abs(got - want) <= max(1e-9, 1e-6 * abs(want)), (src, got, want)
        assert result.pred == got and result.selected == FAMILY
    return duplicates


def runs_in_order(rows: Sequence[tuple[str, PredictionEvent]]) -> list[str]:
    """The sequence of run ids along one output stream, consecutive repeats collapsed."""
    runs: list[str] = []
    for _, event in rows:
        if not runs or runs[-1] != event.run:
            runs.append(event.run)
    return runs


def id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])
