"""The baselines and the component benchmarks: the naive per-event service (pandas recompute,
one single-row predict per family), the feature-state update cost, the state memory per symbol
and the per-handler single vs batched predict.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from daemon.bench_procs import Feeder
from daemon.observe import process_rss_bytes

NAIVE_HISTORY_BARS = 256  # the seed's recompute window


# ---- the naive baseline --------------------------------------------------------------------


class NaiveModels:
    """The three demo families called the seed's way: sklearn-API LightGBM (an LGBMRegressor
    trained with the booster's parameters on the same data), Keras `model.predict`, torch."""

    def __init__(self, run_dir: Path, seed: int) -> None:
        import lightgbm as lgb
        import torch

        from daemon.demo_market import synthetic_closes
        from daemon.demo_run import SEQUENCE_LENGTH, TARGET, VIEW, make_dataset
        from handlers.tf_savedmodel import configure_tensorflow
        from handlers.torchscript import configure_torch

        configure_tensorflow()
        configure_torch()
        import keras

        base = run_dir / "targets" / TARGET / "models" / f"view={VIEW}"
        # build_demo_run's data: the same seed, symbols and bars.
        data = make_dataset(synthetic_closes(np.random.default_rng(seed), 8, 600))
        self.lgbm = lgb.LGBMRegressor(
            n_estimators=100, num_leaves=15, min_child_samples=20, learning_rate=0.05,
            colsample_bytree=0.9, n_jobs=1, random_state=seed, deterministic=True,
            force_row_wise=True, verbose=-1,
        ).fit(data.x[data.train], data.y[data.train])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.keras = keras.saving.load_model(str(base / "family=MLP" / "model.keras"))
            self.lstm = torch.jit.load(str(base / "family=LSTM" / "model.pt"))
        self.lstm.eval()
        self.torch = torch
        self.sequence_length = SEQUENCE_LENGTH

    def predict(self, frame: np.ndarray) -> dict[str, float]:
        """`frame`: the features after each bar of the history (rows, F), last row = now."""
        x = frame[-1:].astype(np.float32)
        out = {"LightGBM": float(self.lgbm.predict(x)[0])}
        if np.isfinite(x).all():
            out["MLP"] = float(np.asarray(self.keras.predict(x, verbose=0)).reshape(-1)[0])
        seq = frame[-self.sequence_length :].astype(np.float32)
        if len(seq) == self.sequence_length and np.isfinite(seq).all():
            with self.torch.no_grad():
                y = self.lstm(self.torch.from_numpy(seq[None]))
            out["LSTM"] = float(y.reshape(-1)[0])
        return out


def naive_baseline(
    redis_url: str, run_dir: Path, feeder: Feeder, prefix: str, *, symbols: int, bars: int,
    seed: int,
) -> dict[str, Any]:
    """Per event: read one entry, recompute the features from the symbol's last 256 bars with
    pandas (FeatureBuilder), one single-row predict per family, publish + ack in MULTI."""
    import pandas as pd
    import redis

    from handlers.features import DEFAULT_FEATURES, FeatureBuilder

    models = NaiveModels(run_dir, seed)
    builder = FeatureBuilder(DEFAULT_FEATURES)
    client: Any = redis.Redis.from_url(redis_url)  # replies used untyped, as parsed
    stream, output, group = f"{prefix}bars", f"{prefix}predictions", f"{prefix}g"
    feeder.market(prefix, symbols, seed=seed)
    feeder.backlog(prefix, stream, NAIVE_HISTORY_BARS * symbols)
    history: dict[str, deque[float]] = {}
    for _, fields in client.xrange(stream):
        bar = msgpack.unpackb(fields[b"data"], raw=False)
        history.setdefault(bar["symbol"], deque(maxlen=NAIVE_HISTORY_BARS)).append(bar["close"])
    client.xgroup_create(stream, group, id="$")
    ids = feeder.backlog(prefix, stream, bars)
    done_at: list[float] = []
    try:
        for _ in range(bars):
            reply = client.xreadgroup(group, "naive", {stream: ">"}, count=1, block=1000)
            if not reply:
                break
            entry_id, fields = reply[0][1][0]
            bar = msgpack.unpackb(fields[b"data"], raw=False)
            closes = history.setdefault(bar["symbol"], deque(maxlen=NAIVE_HISTORY_BARS))
            closes.append(bar["close"])
            frame = builder.build_frame(pd.DataFrame({"close": list(closes)}))
            preds = models.predict(frame.to_numpy(dtype=np.float64))
            doc = {"v": 1, "symbol": bar["symbol"], "ts": bar["ts"],
                   "src": f"{stream}/{entry_id.decode()}", "preds": preds}
            pipe = client.pipeline(transaction=True)
            pipe.xadd(output, {"symbol": bar["symbol"], "data": msgpack.packb(doc)})
            pipe.xack(stream, group, entry_id)
            pipe.execute()
            done_at.append(time.perf_counter())
        published = int(client.xlen(output))
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    skip = max(1, len(done_at) // 10)  # the first calls pay one-off costs (warm-up)
    span = done_at[-1] - done_at[skip - 1] if len(done_at) > skip else float("nan")
    return {
        "bars_per_s": (len(done_at) - skip) / span if span > 0 else float("nan"),
        "bars": len(done_at),
        "symbols": symbols,
        "history_bars": NAIVE_HISTORY_BARS,
        "outputs_match": published == len(done_at) == len(ids),
    }


# ---- feature state, memory, handlers ---------------------------------------------------------


def feature_state(sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Incremental update cost per symbol-bar vs the pandas recompute, at each (symbols, bars)."""
    from handlers.features_bench import bench_feature_update

    return [bench_feature_update(symbols, bars) for symbols, bars in sizes]


def state_memory(engine: Any, symbols: int, ttl_s: float = 900.0) -> dict[str, Any]:
    """The symbol table of the loaded models holding `symbols` symbols (2 bars each): the
    measured RSS growth per symbol and the arrays' bytes per slot."""
    from daemon.state import SymbolTable
    from daemon.wire import Bar

    gc.collect()
    before = process_rss_bytes()
    table = SymbolTable(engine.input_spec, ttl_s=ttl_s)
    names = [f"M{i:06d}" for i in range(symbols)]
    chunk = 20_000
    for bar_index in range(2):
        ts = 1_704_205_800_000 + bar_index * 60_000
        for start in range(0, symbols, chunk):
            bars = [Bar(n, ts, 100.0, 100.0, 100.0, 100.0 + bar_index, 1.0)
                    for n in names[start : start + chunk]]
            table.apply(bars, gather=False)
            del bars
    del names
    gc.collect()
    after = process_rss_bytes()
    held = len(table)
    result = {
        "symbols": held,
        "bytes_per_symbol": (after - before) / held,
        "nbytes_per_slot": table.nbytes_per_slot(),
        "capacity": table.capacity,
        "features": len(engine.input_spec.feature_names),
        "sequences": [
            {"length": s.length, "columns": len(s.columns)} for s in engine.input_spec.sequences
        ],
    }
    del table
    gc.collect()
    return result


def handler_microbench(run_dir: Path, batch: int, min_time_s: float) -> list[dict[str, Any]]:
    from handlers.microbench import PAUSE_S, bench_run

    return [
        {
            "target": row.target, "family": row.family, "format": row.format_name,
            "batch": row.batch_size, "single_us_per_row": row.single_us_per_row,
            "batched_us_per_row": row.batched_us_per_row, "speedup": row.speedup,
            "single_after_pause_us": row.single_after_pause_us, "pause_ms": PAUSE_S * 1e3,
            "refusal": row.refusal,
        }
        for row in bench_run(run_dir, batch_size=batch, min_time_s=min_time_s)
    ]
