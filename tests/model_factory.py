"""Tiny real models written as training-run family directories (CONTRACT section 2), for tests
and the demo. Not a test module.

Every `write_*` takes (run_root, target, family, X, y, features), trains on X (N, F) or, for
the sequence-capable formats, (N, T, F), writes `model_meta.json` (plus any extra meta keys
given as keywords) and returns the family directory. Frameworks are imported only by the
writers that need them.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.artifact_hash import artifact_sha256
from handlers.registry import detect_model_file

VIEW = "CROSS_SECTIONAL"
PICKLE_MODE = 0o644  # the loader refuses group/world-writable pickles, whatever the umask


# --- layout --------------------------------------------------------------------------------


def family_dir(run_root: Path, target: str, family: str, view: str = VIEW) -> Path:
    path = Path(run_root) / "targets" / target / "models" / f"view={view}" / f"family={family}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_meta(
    directory: Path, features: list[str], *, task: str = "regression", **meta_extra: Any
) -> Path:
    meta = {"feature_list": list(features), "task": task, **meta_extra}
    path = directory / "model_meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def write_routing(
    run_root: Path, target: str, selected_family: str | None, view: str = VIEW, **extra: Any
) -> Path:
    directory = Path(run_root) / "targets" / target / "models" / f"view={view}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "routing_decision.json"
    path.write_text(json.dumps({"selected_family": selected_family, **extra}))
    return path


def write_manifest(
    run_root: Path, *, run_id: str = "test-run", include_meta: bool = False
) -> dict[str, Any]:
    """manifest.json with the sha256 of every family's model file (a SavedModel directory: its
    tree hash, see handlers.artifact_hash.tree_sha256), and of model_meta.json if `include_meta`."""
    run_root = Path(run_root)
    artifacts: dict[str, str] = {}
    target_index: dict[str, list[str]] = {}
    for directory in sorted(run_root.glob("targets/*/models/view=*/family=*")):
        target = directory.parents[2].name
        target_index.setdefault(target, []).append(directory.name.removeprefix("family="))
        found = detect_model_file(directory)
        paths = [found[1]] if found else []
        if include_meta and (directory / "model_meta.json").is_file():
            paths.append(directory / "model_meta.json")
        for path in paths:
            artifacts[path.relative_to(run_root).as_posix()] = artifact_sha256(path)
    manifest = {"run_id": run_id, "target_index": target_index, "artifacts": artifacts}
    (run_root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _finish(directory: Path, features: list[str], task: str, meta_extra: dict[str, Any]) -> Path:
    write_meta(directory, features, task=task, **meta_extra)
    return directory


def _sequence_meta(X: np.ndarray, meta_extra: dict[str, Any]) -> dict[str, Any]:
    return {"sequence_length": int(X.shape[1]), **meta_extra} if X.ndim == 3 else meta_extra


def _pickle_to(path: Path, obj: Any) -> None:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.chmod(path, PICKLE_MODE)


# --- trees ---------------------------------------------------------------------------------


def _lgb_params(task: str) -> dict[str, Any]:
    return {
        "objective": "binary" if task == "binary" else "regression",
        "num_leaves": 8,
        "min_data_in_leaf": 5,
        "learning_rate": 0.2,
        "num_threads": 1,
        "verbose": -1,
        "seed": 0,
        "deterministic": True,
    }


def write_lightgbm(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    num_trees: int = 20,
    **meta_extra: Any,
) -> Path:
    import lightgbm as lgb

    directory = family_dir(run_root, target, family, view)
    booster = lgb.train(_lgb_params(task), lgb.Dataset(X, y), num_boost_round=num_trees)
    booster.save_model(str(directory / "model.txt"))
    return _finish(directory, features, task, meta_extra)


def write_lightgbm_pickle(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    num_trees: int = 20,
    file_name: str = "model.pkl",
    **meta_extra: Any,
) -> Path:
    """An LGBMRegressor, or an LGBMClassifier for task="binary", pickled (or joblib-dumped)."""
    import lightgbm as lgb

    directory = family_dir(run_root, target, family, view)
    params = _lgb_params(task)
    params.pop("objective")
    params["n_jobs"] = params.pop("num_threads")
    params["random_state"] = params.pop("seed")
    params["min_child_samples"] = params.pop("min_data_in_leaf")
    cls = lgb.LGBMClassifier if task == "binary" else lgb.LGBMRegressor
    model = cls(n_estimators=num_trees, **params).fit(X, y)
    _dump(directory / file_name, model)
    return _finish(directory, features, task, meta_extra)


def write_xgboost(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    num_trees: int = 20,
    file_name: str = "model.json",
    **meta_extra: Any,
) -> Path:
    """A native Booster saved as model.json or model.ubj."""
    import xgboost as xgb

    directory = family_dir(run_root, target, family, view)
    params = {
        "objective": "binary:logistic" if task == "binary" else "reg:squarederror",
        "max_depth": 3,
        "eta": 0.3,
        "nthread": 1,
        "seed": 0,
    }
    booster = xgb.train(params, xgb.DMatrix(X, y), num_boost_round=num_trees)
    booster.save_model(str(directory / file_name))
    return _finish(directory, features, task, meta_extra)


def write_xgboost_pickle(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    num_trees: int = 20,
    **meta_extra: Any,
) -> Path:
    """An XGBRegressor, or an XGBClassifier for task="binary", pickled."""
    import xgboost as xgb

    directory = family_dir(run_root, target, family, view)
    cls = xgb.XGBClassifier if task == "binary" else xgb.XGBRegressor
    model = cls(n_estimators=num_trees, max_depth=3, n_jobs=1, random_state=0).fit(X, y)
    _pickle_to(directory / "model.pkl", model)
    return _finish(directory, features, task, meta_extra)


# --- other pickles -------------------------------------------------------------------------


@dataclass
class LinearPredictor:
    """A plain object with `predict`: the "anything with predict" pickle."""

    coef: np.ndarray
    intercept: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        rows = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        return rows @ self.coef + self.intercept


@dataclass
class Misbehaving:
    """A pickled model that misbehaves on cue: `hang_if` is a file whose existence makes
    predict sleep for an hour; `exit_on_load` makes unpickling call sys.exit(3); `noise`
    adds fresh random noise to every output (not deterministic)."""

    hang_if: str = ""
    exit_on_load: bool = False
    noise: float = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.exit_on_load:
            raise SystemExit(3)
        if self.hang_if and os.path.exists(self.hang_if + ".load"):
            time.sleep(3600)

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.hang_if and os.path.exists(self.hang_if):
            time.sleep(3600)
        rows = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        out = rows.sum(axis=1) * 0.001
        if self.noise:
            out = out + np.random.default_rng().normal(0, self.noise, len(out))
        return out


def fit_linear(X: np.ndarray, y: np.ndarray) -> LinearPredictor:
    rows = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    design = np.column_stack([rows, np.ones(len(rows))])
    solution, *_ = np.linalg.lstsq(design, np.asarray(y, dtype=np.float64), rcond=None)
    return LinearPredictor(coef=solution[:-1], intercept=float(solution[-1]))


def write_generic_pickle(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    predictor: Any = None,
    file_name: str = "model.pkl",
    **meta_extra: Any,
) -> Path:
    """`predictor` (default: a least-squares LinearPredictor fitted on X, y), pickled."""
    directory = family_dir(run_root, target, family, view)
    _dump(directory / file_name, predictor if predictor is not None else fit_linear(X, y))
    return _finish(directory, features, task, meta_extra)


def write_sklearn_pickle(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    file_name: str = "model.pkl",
    **meta_extra: Any,
) -> Path:
    """LogisticRegression for task="binary", else Ridge: an estimator with predict(_proba)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    directory = family_dir(run_root, target, family, view)
    model = LogisticRegression() if task == "binary" else Ridge(alpha=1e-3)
    _dump(directory / file_name, model.fit(X, y))
    return _finish(directory, features, task, meta_extra)


def _dump(path: Path, obj: Any) -> None:
    if path.suffix == ".joblib":
        import joblib

        joblib.dump(obj, path)
        os.chmod(path, PICKLE_MODE)
    else:
        _pickle_to(path, obj)


# --- Keras / TensorFlow --------------------------------------------------------------------


def write_keras(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    file_name: str = "model.keras",
    kind: str = "lstm",
    softmax_head: bool = False,
    epochs: int = 2,
    **meta_extra: Any,
) -> Path:
    """An MLP for X (N, F); for X (N, T, F) an LSTM (kind="lstm") or Conv1D (kind="conv") with
    `sequence_length` = T in the meta. Binary: a sigmoid unit, or 2-unit softmax if asked."""
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input(X.shape[1:])]
    if X.ndim == 3 and kind == "conv":
        layers += [
            keras.layers.Conv1D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
        ]
    elif X.ndim == 3:
        layers += [keras.layers.LSTM(4)]
    else:
        layers += [keras.layers.Dense(8, activation="relu")]
    if task == "binary" and softmax_head:
        layers.append(keras.layers.Dense(2, activation="softmax"))
        loss, target_y = "sparse_categorical_crossentropy", y.astype(np.int64)
    elif task == "binary":
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
        loss, target_y = "binary_crossentropy", y.astype(np.float32)
    else:
        layers.append(keras.layers.Dense(1))
        loss, target_y = "mse", y.astype(np.float32)
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.02), loss=loss)
    directory = family_dir(run_root, target, family, view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keras' own numpy-2 deprecation chatter during fit
        model.fit(X.astype(np.float32), target_y, epochs=epochs, batch_size=32, verbose=0)
        model.save(str(directory / file_name))
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))


def write_tf_savedmodel(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    input_name: str = "inputs",
    **meta_extra: Any,
) -> Path:
    """A tf.Module (least-squares linear model over the flattened row, sigmoid if binary)
    saved with `tf.saved_model.save` and a `serving_default` signature; X may be 3-D."""
    import tensorflow as tf

    linear = fit_linear(X, _logit_target(y) if task == "binary" else y)
    binary = task == "binary"

    class LinearServing(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(linear.coef.astype(np.float32))
            self.b = tf.Variable(np.float32(linear.intercept))

        @tf.function(
            input_signature=[tf.TensorSpec([None, *X.shape[1:]], tf.float32, name=input_name)]
        )
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            flat = tf.reshape(x, [tf.shape(x)[0], -1])
            out = tf.linalg.matvec(flat, self.w) + self.b
            return {"prediction": tf.sigmoid(out) if binary else out}

    module = LinearServing()
    directory = family_dir(run_root, target, family, view)
    tf.saved_model.save(
        module, str(directory / "model"), signatures={"serving_default": module.serve}
    )
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))


def _logit_target(y: np.ndarray) -> np.ndarray:
    """0/1 labels as logits a linear least-squares fit can aim at."""
    return np.where(np.asarray(y) > 0.5, 2.0, -2.0)


# --- torch ---------------------------------------------------------------------------------

_torch_classes_cache: dict[str, type] = {}


def _torch_classes() -> dict[str, type]:
    """TinyMLP and TinyLSTM, defined on first use so that importing this module skips torch.
    Module-level names (see __getattr__) so that torch.save pickles of them load again."""
    if _torch_classes_cache:
        return _torch_classes_cache
    import torch

    class TinyMLP(torch.nn.Module):
        def __init__(self, inputs: int, binary: bool = False) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(inputs, 8)
            self.out = torch.nn.Linear(8, 1)
            self.binary = binary

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.out(torch.relu(self.hidden(x.flatten(1))))
            return torch.sigmoid(z) if self.binary else z

    class TinyLSTM(torch.nn.Module):
        def __init__(self, inputs: int, binary: bool = False) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(inputs, 8, batch_first=True)
            self.out = torch.nn.Linear(8, 1)
            self.binary = binary

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq, _ = self.lstm(x)
            z = self.out(seq[:, -1, :])
            return torch.sigmoid(z) if self.binary else z

    for cls in (TinyMLP, TinyLSTM):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
        _torch_classes_cache[cls.__name__] = cls
    return _torch_classes_cache


def __getattr__(name: str) -> Any:
    if name in ("TinyMLP", "TinyLSTM"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train_torch_module(
    X: np.ndarray, y: np.ndarray, *, task: str = "regression", epochs: int = 30
) -> Any:
    """TinyMLP for X (N, F), TinyLSTM for X (N, T, F); full-batch Adam for a few epochs,
    returned in eval mode."""
    import torch

    torch.manual_seed(0)
    classes = _torch_classes()
    binary = task == "binary"
    if X.ndim == 3:
        module = classes["TinyLSTM"](X.shape[2], binary)
    else:
        module = classes["TinyMLP"](X.shape[1], binary)
    inputs = torch.as_tensor(X, dtype=torch.float32)
    target = torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
    loss_fn = torch.nn.BCELoss() if binary else torch.nn.MSELoss()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss_fn(module(inputs), target).backward()
        optimizer.step()
    return module.eval()


def write_torchscript(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    file_name: str = "model.pt",
    epochs: int = 30,
    **meta_extra: Any,
) -> Path:
    """TinyMLP (X 2-D) or TinyLSTM (X 3-D) scripted with torch.jit.script, saved as model.pt/.ts."""
    import torch

    module = train_torch_module(X, y, task=task, epochs=epochs)
    directory = family_dir(run_root, target, family, view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        torch.jit.save(torch.jit.script(module), str(directory / file_name))
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))


def write_torch_export(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    dynamic_batch: bool = True,
    epochs: int = 30,
    **meta_extra: Any,
) -> Path:
    """A torch.export program (batch dimension dynamic unless asked otherwise) as model.pt2."""
    import torch

    module = train_torch_module(X, y, task=task, epochs=epochs)
    example = torch.as_tensor(X[:4], dtype=torch.float32)
    dynamic = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    if not dynamic_batch:
        example = example[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LSTM flat-weights notice
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    directory = family_dir(run_root, target, family, view)
    torch.export.save(program, str(directory / "model.pt2"))
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))


def write_torch_pickle(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    epochs: int = 30,
    **meta_extra: Any,
) -> Path:
    """A whole torch.nn.Module saved with torch.save as model.pkl."""
    import torch

    module = train_torch_module(X, y, task=task, epochs=epochs)
    directory = family_dir(run_root, target, family, view)
    torch.save(module, directory / "model.pkl")
    os.chmod(directory / "model.pkl", PICKLE_MODE)
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))


# --- ONNX ----------------------------------------------------------------------------------


def write_onnx(
    run_root: Path,
    target: str,
    family: str,
    X: np.ndarray,
    y: np.ndarray,
    features: list[str],
    *,
    task: str = "regression",
    view: str = VIEW,
    hidden: int = 16,
    seed: int = 0,
    batch: int | None = None,
    **meta_extra: Any,
) -> Path:
    """A one-hidden-layer MLP built with onnx.helper: random ReLU features, output layer fitted
    by least squares (sigmoid on top if binary). X may be 3-D (flattened in the graph).
    `batch`: a fixed batch size in the graph's input and output (default: dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    flat = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    width = flat.shape[1]
    w1 = rng.standard_normal((width, hidden)) / np.sqrt(width)
    b1 = rng.standard_normal(hidden) * 0.1
    features_hidden = np.maximum(flat @ w1 + b1, 0.0)
    linear = fit_linear(features_hidden, _logit_target(y) if task == "binary" else y)
    initializers = [
        numpy_helper.from_array(np.array([-1, width], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(linear.coef.astype(np.float32).reshape(hidden, 1), "w2"),
        numpy_helper.from_array(np.array([linear.intercept], dtype=np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z" if task == "binary" else "output"]),
    ]
    if task == "binary":
        nodes.append(helper.make_node("Sigmoid", ["z"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "batch", *X.shape[1:]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch or "batch", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    directory = family_dir(run_root, target, family, view)
    onnx.save(model, str(directory / "model.onnx"))
    return _finish(directory, features, task, _sequence_meta(X, meta_extra))
