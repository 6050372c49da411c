"""The demo's training run: three tiny models trained in seconds (LightGBM, Keras MLP,
TorchScript LSTM) on the synthetic market's bars (`daemon.demo_market`), written in the
contract's run layout (CONTRACT §2). Pure: no Redis, no clock.

Used by `livepred demo`, the benchmark and the tests. Deterministic for a given seed (model
weights and predictions; the .keras archive also stores its save date).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daemon.demo_market import synthetic_closes
from handlers.artifact_hash import artifact_sha256
from handlers.features import DEFAULT_FEATURES, reference_frame
from handlers.registry import detect_model_file

TARGET = "fwd_ret_5"
HORIZON_BARS = 5
VIEW = "CROSS_SECTIONAL"
SEQUENCE_LENGTH = 20
INTERVAL_MINUTES = 1
FAMILIES = ("LightGBM", "LSTM", "MLP")
SELECTED_FAMILY = "LightGBM"
VALID_FRACTION = 0.2  # the last 20% of each symbol's bars: the holdout for metrics


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows, their sequences and targets, split in time (train first)."""

    x: np.ndarray  # (N, F) float32, all finite
    seq: np.ndarray  # (M, T, F) float32: the T rows ending at each sequence row
    y: np.ndarray  # (N,) float64 forward return
    y_seq: np.ndarray  # (M,)
    train: np.ndarray  # (N,) bool
    train_seq: np.ndarray  # (M,) bool


def make_dataset(closes: np.ndarray, features: Sequence[str] = DEFAULT_FEATURES) -> Dataset:
    """Features from the pandas reference definitions, target = the next 5 bars' return."""
    xs, ys, trains, seqs, y_seqs, train_seqs = [], [], [], [], [], []
    for row in closes:
        close = pd.Series(row)
        frame = reference_frame(close, list(features)).to_numpy(dtype=np.float64)
        y = (close.shift(-HORIZON_BARS) / close - 1.0).to_numpy()
        finite = np.isfinite(frame).all(axis=1)
        usable = finite & np.isfinite(y)
        train = np.arange(len(row)) < int(len(row) * (1 - VALID_FRACTION))
        xs.append(frame[usable])
        ys.append(y[usable])
        trains.append(train[usable])
        # Sequence rows: the last T rows all finite, and a target.
        run = np.convolve(finite.astype(np.int64), np.ones(SEQUENCE_LENGTH, dtype=np.int64))
        full = run[: len(row)] == SEQUENCE_LENGTH
        ends = np.flatnonzero(full & np.isfinite(y))
        windows = np.lib.stride_tricks.sliding_window_view(frame, SEQUENCE_LENGTH, axis=0)
        seqs.append(windows[ends - SEQUENCE_LENGTH + 1].transpose(0, 2, 1))
        y_seqs.append(y[ends])
        train_seqs.append(train[ends])
    return Dataset(
        x=np.concatenate(xs).astype(np.float32),
        seq=np.concatenate(seqs).astype(np.float32),
        y=np.concatenate(ys),
        y_seq=np.concatenate(y_seqs),
        train=np.concatenate(trains),
        train_seq=np.concatenate(train_seqs),
    )


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    ic = float(np.corrcoef(pred, y)[0, 1]) if len(y) > 1 and pred.std() > 0 else 0.0
    rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
    hit = float(np.mean(np.sign(pred) == np.sign(y)))
    return {"ic": round(ic, 6), "rmse": round(rmse, 8), "hit_rate": round(hit, 6)}


# ---- the three families ---------------------------------------------------------------------


def _train_lightgbm(data: Dataset, directory: Path, seed: int) -> dict[str, float]:
    import lightgbm as lgb

    params = {
        "objective": "regression",
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "learning_rate": 0.05,
        "feature_fraction": 0.9,
        "num_threads": 1,
        "verbose": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
    }
    train = lgb.Dataset(data.x[data.train], data.y[data.train], free_raw_data=True)
    booster = lgb.train(params, train, num_boost_round=100)
    booster.save_model(str(directory / "model.txt"))
    valid = ~data.train
    pred = np.asarray(booster.predict(data.x[valid], num_threads=1))
    return regression_metrics(pred, data.y[valid])


def _train_mlp(data: Dataset, directory: Path, seed: int) -> dict[str, float]:
    """Keras 3: Normalization -> Dense(16) -> Dense(1) -> Rescaling to return units; trained on
    standardised targets, saved with the scaling inside so the daemon feeds raw features."""
    from handlers.tf_savedmodel import configure_tensorflow

    configure_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    x, y = data.x[data.train], data.y[data.train]
    y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
    inputs = keras.Input((x.shape[1],), name="features")
    norm = keras.layers.Normalization(mean=x.mean(axis=0), variance=x.var(axis=0) + 1e-12)
    hidden = keras.layers.Dense(16, activation="relu")(norm(inputs))
    z = keras.layers.Dense(1)(hidden)
    core = keras.Model(inputs, z)
    # Eager: tracing the train step would cost more than the 60 small steps themselves.
    core.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    out = keras.layers.Rescaling(scale=y_std, offset=y_mean)(z)
    model = keras.Model(inputs, out, name="demo_mlp")
    valid = ~data.train
    with warnings.catch_warnings():
        # keras' own numpy-2 deprecation chatter (np.array on tensors) in fit and save
        warnings.simplefilter("ignore", DeprecationWarning)
        core.fit(x, ((y - y_mean) / y_std).astype(np.float32), epochs=4, batch_size=256, verbose=0)
        model.save(str(directory / "model.keras"))
        pred = np.asarray(model(data.x[valid], training=False))
    return regression_metrics(pred, data.y[valid])


def _lstm_class() -> type:
    import torch

    class DemoLSTM(torch.nn.Module):
        """Standardise the (T, F) input, LSTM, linear head, back to return units."""

        def __init__(self, mean: Any, std: Any, y_mean: float, y_std: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.y_mean = y_mean
            self.y_std = y_std
            self.lstm = torch.nn.LSTM(len(mean), 16, batch_first=True)
            self.head = torch.nn.Linear(16, 1)

        def standardised(self, x: torch.Tensor) -> torch.Tensor:
            seq, _ = self.lstm((x - self.mean) / self.std)  # type: ignore[operator]
            return self.head(seq[:, -1, :])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.standardised(x) * self.y_std + self.y_mean

    return DemoLSTM


def _train_lstm(data: Dataset, directory: Path, seed: int) -> dict[str, float]:
    from handlers.torchscript import configure_torch

    configure_torch()
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread beats two, and is deterministic
    try:
        return _fit_lstm(torch, data, directory, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_lstm(torch: Any, data: Dataset, directory: Path, seed: int) -> dict[str, float]:
    x, y = data.seq[data.train_seq], data.y_seq[data.train_seq]
    flat = x.reshape(-1, x.shape[2])
    y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
    module = _lstm_class()(flat.mean(axis=0), flat.std(axis=0) + 1e-6, y_mean, y_std)
    inputs = torch.from_numpy(x)
    target = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32)).reshape(-1, 1)
    step = _adam(torch, list(module.parameters()), lr=0.02)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        order = torch.randperm(len(inputs), generator=generator)
        for batch in order.split(512):
            module.zero_grad()
            loss = torch.nn.functional.mse_loss(module.standardised(inputs[batch]), target[batch])
            loss.backward()
            step()
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; loading still works
        torch.jit.save(torch.jit.script(module), str(directory / "model.pt"))
    valid = ~data.train_seq
    with torch.inference_mode():
        pred = module(torch.from_numpy(data.seq[valid])).numpy()
    return regression_metrics(pred, data.y_seq[valid])


def _adam(
    torch: Any, params: list[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> Any:
    """A plain Adam step. torch.optim's first use imports torch._dynamo, which costs seconds."""
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    count = [0]

    def step() -> None:
        count[0] += 1
        fix1, fix2 = 1 - betas[0] ** count[0], 1 - betas[1] ** count[0]
        with torch.no_grad():
            for p, (m, v) in zip(params, moments, strict=True):
                if p.grad is None:
                    continue
                m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                p.addcdiv_(m, (v / fix2).sqrt_().add_(1e-8), value=-lr / fix1)

    return step


TRAINERS = {"LightGBM": _train_lightgbm, "MLP": _train_mlp, "LSTM": _train_lstm}


# ---- the run ----------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def build_demo_run(
    root: Path,
    *,
    seed: int = 7,
    symbols: int = 8,
    bars: int = 600,
    families: Sequence[str] = FAMILIES,
) -> Path:
    """Write a demo training run under `root` (created; must be absent or empty); returns it.

    `symbols` x `bars` one-minute bars are simulated; each family trains on the 9 default
    features of the first 80% of every symbol's bars and is scored on the rest.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: the demo run needs a new or empty directory")
    unknown = sorted(set(families) - set(TRAINERS))
    if unknown:
        raise ValueError(f"unknown demo families {unknown}; choose from {sorted(TRAINERS)}")
    rng = np.random.default_rng(seed)
    closes = synthetic_closes(rng, symbols, bars)
    data = make_dataset(closes)
    features = list(DEFAULT_FEATURES)
    view_dir = root / "targets" / TARGET / "models" / f"view={VIEW}"
    metrics: dict[str, dict[str, float]] = {}
    for family in families:
        directory = view_dir / f"family={family}"
        directory.mkdir(parents=True, exist_ok=True)
        metrics[family] = TRAINERS[family](data, directory, seed)
        meta: dict[str, Any] = {
            "feature_list": features,
            "task": "regression",
            "target": TARGET,
            "family": family,
            "interval_minutes": INTERVAL_MINUTES,
            "metrics": metrics[family],
            "n_train": int(data.train_seq.sum() if family == "LSTM" else data.train.sum()),
        }
        if family == "LSTM":
            meta["sequence_length"] = SEQUENCE_LENGTH
        _write_json(directory / "model_meta.json", meta)
    selected = SELECTED_FAMILY if SELECTED_FAMILY in families else families[0]
    _write_json(
        view_dir / "routing_decision.json",
        {
            "selected_family": selected,
            "reason": "demo: the tree model predicts from the first bar and trains fastest",
            "candidates": metrics,
        },
    )
    artifacts: dict[str, str] = {}
    for directory in sorted(view_dir.glob("family=*")):
        found = detect_model_file(directory)
        for path in ([found[1]] if found else []) + [directory / "model_meta.json"]:
            artifacts[path.relative_to(root).as_posix()] = artifact_sha256(path)
    _write_json(
        root / "manifest.json",
        {
            "run_id": f"demo-seed{seed}",
            "target_index": {TARGET: sorted(families)},
            "artifacts": artifacts,
            "data": {
                "kind": "synthetic random walk",
                "symbols": symbols,
                "bars": bars,
                "seed": seed,
            },
        },
    )
    return root
