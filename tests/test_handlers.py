"""Every model-format handler against its framework's own predict, on tiny real models."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from handlers.errors import ModelLoadError
from handlers.run import ModelLoader
from tests import model_factory as mf

TARGET = "ret_1d"
FEATURES = ["f0", "f1", "f2", "f3"]
T = 5


@dataclass(frozen=True)
class Spec:
    format_name: str
    ndim: int  # 2: (B, F) rows; 3: (B, T, F) sequences
    task: str
    accepts_nan: bool


SPECS: dict[str, Spec] = {
    "LightGBM": Spec("lightgbm", 2, "regression", True),
    "LightGBMBinary": Spec("lightgbm", 2, "binary", True),
    "XGBoostJSON": Spec("xgboost", 2, "regression", True),
    "XGBoostUBJBinary": Spec("xgboost", 2, "binary", True),
    "LGBMRegressorPkl": Spec("pickle", 2, "regression", True),
    "LGBMClassifierPkl": Spec("pickle", 2, "binary", True),
    "LGBMJoblib": Spec("pickle", 2, "regression", True),
    "XGBClassifierPkl": Spec("pickle", 2, "binary", True),
    "SklearnLogistic": Spec("pickle", 2, "binary", True),
    "GenericPkl": Spec("pickle", 2, "regression", True),
    "TorchPkl": Spec("pickle", 2, "regression", False),
    "KerasMLP": Spec("keras", 2, "regression", False),
    "KerasH5Binary": Spec("keras", 2, "binary", False),
    "KerasSoftmax": Spec("keras", 2, "binary", False),
    "LSTM": Spec("keras", 3, "regression", False),
    "CNN1D": Spec("keras", 3, "regression", False),
    "SavedModel": Spec("tf_savedmodel", 2, "regression", False),
    "SavedModelSeq": Spec("tf_savedmodel", 3, "binary", False),
    "TorchMLP": Spec("torchscript", 2, "regression", False),
    "TorchLSTM": Spec("torchscript", 3, "regression", False),
    "TorchExport": Spec("torch_export", 3, "regression", False),
    "TorchExportStatic": Spec("torch_export", 2, "binary", False),
    "Onnx": Spec("onnx", 2, "regression", False),
    "OnnxSeqBinary": Spec("onnx", 3, "binary", False),
}
BINARY = [name for name, spec in SPECS.items() if spec.task == "binary"]
TREES = [
    "LightGBM",
    "LightGBMBinary",
    "XGBoostJSON",
    "XGBoostUBJBinary",
    "LGBMRegressorPkl",
    "LGBMClassifierPkl",
    "XGBClassifierPkl",
]


@pytest.fixture(scope="session")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    X = rng.standard_normal((256, 4)).astype(np.float32)
    X3 = rng.standard_normal((128, T, 4)).astype(np.float32)
    # Only feature 0 matters (of the last step, for sequences).
    return {
        "X": X,
        "y": 3.0 * X[:, 0] + 0.05 * rng.standard_normal(256),
        "yb": (X[:, 0] > 0).astype(np.int64),
        "X3": X3,
        "y3": 3.0 * X3[:, -1, 0],
        "yb3": (X3[:, -1, 0] > 0).astype(np.int64),
    }


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory, data: dict[str, np.ndarray]) -> Path:
    root = tmp_path_factory.mktemp("handlers") / "run"
    X, y, yb, X3, y3, yb3 = (data[k] for k in ("X", "y", "yb", "X3", "y3", "yb3"))
    args = (root, TARGET)
    mf.write_lightgbm(*args, "LightGBM", X, y, FEATURES)
    mf.write_lightgbm(*args, "LightGBMBinary", X, yb, FEATURES, task="binary")
    mf.write_xgboost(*args, "XGBoostJSON", X, y, FEATURES)
    mf.write_xgboost(
        *args, "XGBoostUBJBinary", X, yb, FEATURES, task="binary", file_name="model.ubj"
    )
    mf.write_lightgbm_pickle(*args, "LGBMRegressorPkl", X, y, FEATURES)
    mf.write_lightgbm_pickle(*args, "LGBMClassifierPkl", X, yb, FEATURES, task="binary")
    mf.write_lightgbm_pickle(*args, "LGBMJoblib", X, y, FEATURES, file_name="model.joblib")
    mf.write_xgboost_pickle(*args, "XGBClassifierPkl", X, yb, FEATURES, task="binary")
    mf.write_sklearn_pickle(*args, "SklearnLogistic", X, yb, FEATURES, task="binary")
    mf.write_generic_pickle(*args, "GenericPkl", X, y, FEATURES)
    mf.write_torch_pickle(*args, "TorchPkl", X, y, FEATURES)
    mf.write_keras(*args, "KerasMLP", X, y, FEATURES, epochs=1)
    mf.write_keras(
        *args, "KerasH5Binary", X, yb, FEATURES, task="binary", file_name="model.h5", epochs=4
    )
    mf.write_keras(
        *args, "KerasSoftmax", X, yb, FEATURES, task="binary", softmax_head=True, epochs=4
    )
    mf.write_keras(*args, "LSTM", X3, y3, FEATURES, epochs=1)
    mf.write_keras(*args, "CNN1D", X3, y3, FEATURES, kind="conv", epochs=1)
    mf.write_tf_savedmodel(*args, "SavedModel", X, y, FEATURES)
    mf.write_tf_savedmodel(*args, "SavedModelSeq", X3, yb3, FEATURES, task="binary")
    mf.write_torchscript(*args, "TorchMLP", X, y, FEATURES)
    mf.write_torchscript(*args, "TorchLSTM", X3, y3, FEATURES, file_name="model.ts", epochs=5)
    mf.write_torch_export(*args, "TorchExport", X3, y3, FEATURES, epochs=5)
    mf.write_torch_export(
        *args, "TorchExportStatic", X, yb, FEATURES, task="binary", dynamic_batch=False
    )
    mf.write_onnx(*args, "Onnx", X, y, FEATURES)
    mf.write_onnx(*args, "OnnxSeqBinary", X3, yb3, FEATURES, task="binary")
    return root


@pytest.fixture(scope="session")
def loader(run_root: Path) -> Any:
    with ModelLoader(run_root) as model_loader:
        yield model_loader


def _inputs(family: str, data: dict[str, np.ndarray], rows: int = 64) -> np.ndarray:
    return (data["X3"] if SPECS[family].ndim == 3 else data["X"])[:rows].copy()


def reference_predict(family: str, directory: Path, batch: np.ndarray) -> np.ndarray:
    """The framework's own predict on the saved model, loaded without livepred."""
    spec = SPECS[family]
    binary = spec.task == "binary"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.format_name == "lightgbm":
            import lightgbm as lgb

            return lgb.Booster(model_file=str(directory / "model.txt")).predict(batch)
        if spec.format_name == "xgboost":
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(str(next(directory.glob("model.*[jn]"))))
            return booster.predict(xgb.DMatrix(batch))
        if spec.format_name == "pickle":
            path = next(directory.glob("model.[pj]*"))
            if family == "TorchPkl":
                import torch

                module = torch.load(path, weights_only=False)
                with torch.no_grad():
                    return module(torch.as_tensor(batch)).numpy().ravel()
            if path.suffix == ".joblib":
                import joblib

                model = joblib.load(path)
            else:
                model = pickle.loads(path.read_bytes())
            return model.predict_proba(batch)[:, 1] if binary else model.predict(batch)
        if spec.format_name == "keras":
            import keras

            model = keras.saving.load_model(str(next(directory.glob("model.*[sh5]"))))
            out = model.predict(batch, verbose=0)
            return out[:, 1] if out.shape[1] == 2 else out.ravel()
        if spec.format_name == "tf_savedmodel":
            import tensorflow as tf

            signature = tf.saved_model.load(str(directory / "model")).signatures["serving_default"]
            return signature(inputs=tf.constant(batch))["prediction"].numpy()
        if spec.format_name in ("torchscript", "torch_export"):
            import torch

            if spec.format_name == "torchscript":
                module = torch.jit.load(str(next(directory.glob("model.[pt][ts]"))))
                with torch.no_grad():
                    return module(torch.as_tensor(batch)).numpy().ravel()
            module = torch.export.load(str(directory / "model.pt2")).module()
            with torch.no_grad():  # the static program takes one row at a time
                return np.concatenate(
                    [
                        module(torch.as_tensor(batch[i : i + 1])).numpy().ravel()
                        for i in range(len(batch))
                    ]
                    if family == "TorchExportStatic"
                    else [module(torch.as_tensor(batch)).numpy().ravel()]
                )
        if spec.format_name == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(
                str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
            )
            return session.run(None, {"input": batch})[0].ravel()
    raise AssertionError(f"no reference for {family}")


def _tolerance(family: str) -> dict[str, float]:
    # Trees and pickled estimators are deterministic; float32 NNs differ by BLAS path.
    if SPECS[family].format_name in ("lightgbm", "xgboost") or (
        SPECS[family].format_name == "pickle" and family != "TorchPkl"
    ):
        return {"rtol": 1e-6, "atol": 1e-9}
    return {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("family", SPECS)
def test_batch_matches_framework_predict(
    loader: ModelLoader, data: dict, run_root: Path, family: str
) -> None:
    handler, meta = loader.load_model(TARGET, family)
    batch = _inputs(family, data)
    before = batch.copy()
    out = handler.predict(batch)
    assert out.dtype == np.float64 and out.shape == (len(batch),)
    np.testing.assert_array_equal(batch, before)  # predict never changes its input
    expected = reference_predict(family, loader.family_dir(TARGET, family), batch)
    np.testing.assert_allclose(out, np.asarray(expected, dtype=np.float64), **_tolerance(family))


@pytest.mark.parametrize("family", SPECS)
def test_batch_equals_single_rows(loader: ModelLoader, data: dict, family: str) -> None:
    handler, _ = loader.load_model(TARGET, family)
    batch = _inputs(family, data, rows=12)
    singles = np.concatenate([handler.predict(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(handler.predict(batch), singles, **_tolerance(family))


@pytest.mark.parametrize("family", SPECS)
def test_handler_identity(loader: ModelLoader, family: str) -> None:
    handler, meta = loader.load_model(TARGET, family)
    spec = SPECS[family]
    assert handler.format_name == spec.format_name
    assert handler.accepts_nan is spec.accepts_nan
    assert meta.sequential is (spec.ndim == 3)
    assert meta.task == spec.task


@pytest.mark.parametrize("family", SPECS)
def test_feature_order_is_honoured(loader: ModelLoader, data: dict, family: str) -> None:
    handler, _ = loader.load_model(TARGET, family)
    batch = _inputs(family, data, rows=32)
    swapped = batch[..., [1, 0, 2, 3]]  # feature 0, the one that matters, moves
    assert not np.allclose(handler.predict(batch), handler.predict(swapped), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", BINARY)
def test_binary_gives_positive_class_probability(
    loader: ModelLoader, data: dict, family: str
) -> None:
    handler, _ = loader.load_model(TARGET, family)
    batch = _inputs(family, data)
    out = handler.predict(batch)
    assert np.all((out >= 0.0) & (out <= 1.0))
    labels = data["yb3" if SPECS[family].ndim == 3 else "yb"][: len(batch)]
    # Trained on "feature 0 > 0": the positive class should get the higher probability.
    assert out[labels == 1].mean() > out[labels == 0].mean()


@pytest.mark.parametrize("family", ["LGBMClassifierPkl", "XGBClassifierPkl", "SklearnLogistic"])
def test_pickled_classifier_equals_predict_proba(
    loader: ModelLoader, data: dict, family: str
) -> None:
    handler, _ = loader.load_model(TARGET, family)
    path = next(loader.family_dir(TARGET, family).glob("model.pkl"))
    model = pickle.loads(path.read_bytes())
    batch = data["X"][:50]
    np.testing.assert_allclose(handler.predict(batch), model.predict_proba(batch)[:, 1], rtol=1e-6)


@pytest.mark.parametrize("task", ["regression", "binary"])
def test_a_pickled_xgboost_model_stops_at_its_early_stopping_round(
    tmp_path: Path, task: str
) -> None:
    # The wrapper's predict uses the trees up to best_iteration; the unwrapped booster must too.
    import xgboost as xgb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 3))
    y = X[:, 0] + rng.normal(0, 1.0, 2000)
    Xv = rng.normal(size=(500, 3))
    yv = Xv[:, 0] + rng.normal(0, 1.0, 500)
    if task == "binary":
        y, yv = (y > 0).astype(int), (yv > 0).astype(int)
    cls = xgb.XGBClassifier if task == "binary" else xgb.XGBRegressor
    model = cls(n_estimators=300, learning_rate=0.3, max_depth=6, early_stopping_rounds=5,
                n_jobs=1, random_state=0)
    model.fit(X, y, eval_set=[(Xv, yv)], verbose=False)
    assert model.best_iteration + 1 < model.get_booster().num_boosted_rounds()
    directory = mf.family_dir(tmp_path, TARGET, "XGB")
    mf._pickle_to(directory / "model.pkl", model)
    mf._finish(directory, ["f0", "f1", "f2"], task, {})
    handler, _ = ModelLoader(tmp_path).load_model(TARGET, "XGB")
    x = rng.normal(size=(64, 3)).astype(np.float32)
    own = model.predict_proba(x)[:, 1] if task == "binary" else model.predict(x)
    every_tree = model.get_booster().inplace_predict(x, iteration_range=(0, 0))
    assert not np.allclose(own, every_tree)  # the case matters for these rows
    np.testing.assert_allclose(handler.predict(x), own, rtol=1e-6)


def test_pickled_lightgbm_wrapper_is_unwrapped(loader: ModelLoader) -> None:
    handler, _ = loader.load_model(TARGET, "LGBMClassifierPkl")
    assert handler.kind == "lightgbm.LGBMClassifier"
    assert (
        getattr(handler._predict_rows, "__self__", None).__class__.__name__
        == "LightGBMBoosterHandler"
    )


@pytest.mark.parametrize("family", TREES)
def test_trees_predict_on_nan(loader: ModelLoader, data: dict, family: str) -> None:
    handler, _ = loader.load_model(TARGET, family)
    batch = data["X"][:20].copy()
    batch[::2, 0] = np.nan
    batch[1, :] = np.nan
    out = handler.predict(batch)
    assert out.shape == (20,) and np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "family", ["LightGBM", "KerasMLP", "TorchLSTM", "Onnx", "GenericPkl", "SavedModel"]
)
def test_wrong_input_shape_raises(loader: ModelLoader, data: dict, family: str) -> None:
    handler, _ = loader.load_model(TARGET, family)
    batch = _inputs(family, data, rows=3)
    with pytest.raises(ValueError, match="expected a"):
        handler.predict(np.concatenate([batch, batch[..., :1]], axis=-1))


class WrongLengthPredictor:
    """A pickled object that returns one value too many."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X) + 1)


def test_output_of_wrong_length_raises(tmp_path: Path, data: dict) -> None:
    mf.write_generic_pickle(
        tmp_path, TARGET, "Bad", data["X"], data["y"], FEATURES, predictor=WrongLengthPredictor()
    )
    handler, _ = ModelLoader(tmp_path).load_model(TARGET, "Bad")
    with pytest.raises(ValueError, match="model output has shape"):
        handler.predict(data["X"][:4])


def test_cuda_without_gpu_falls_back_to_cpu(
    run_root: Path, data: dict, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with caplog.at_level(logging.WARNING):
        handler, _ = ModelLoader(run_root, device="cuda").load_model(TARGET, "TorchMLP")
    assert "using the CPU" in caplog.text
    assert handler.predict(data["X"][:3]).shape == (3,)


def test_static_batch_export_takes_any_batch(loader: ModelLoader, data: dict) -> None:
    handler, _ = loader.load_model(TARGET, "TorchExportStatic")
    batch = data["X"][:7]
    np.testing.assert_allclose(
        handler.predict(batch), [handler.predict(batch[i : i + 1])[0] for i in range(7)], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("family", "meta_change", "needle"),
    [
        ("KerasMLP", {"feature_list": ["f0", "f1", "f2"]}, "model input is (B, 4)"),
        ("LSTM", {"sequence_length": 7}, "model input is (B, 5, 4)"),
        ("Onnx", {"feature_list": ["f0", "f1", "f2", "f3", "f4"]}, "model input is (B, 4)"),
        ("SavedModel", {"feature_list": ["f0"]}, "model input is (B, 4)"),
    ],
)
def test_model_input_must_match_meta(
    tmp_path: Path, run_root: Path, family: str, meta_change: dict, needle: str
) -> None:
    source = ModelLoader(run_root).family_dir(TARGET, family)
    copy = ModelLoader(tmp_path).family_dir(TARGET, family)
    shutil.copytree(source, copy)
    meta = json.loads((copy / "model_meta.json").read_text())
    (copy / "model_meta.json").write_text(json.dumps({**meta, **meta_change}))
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        ModelLoader(tmp_path).load_model(TARGET, family)


@pytest.mark.parametrize("damage", ["garbage", "cut short"])
def test_a_damaged_keras_file_is_refused_with_what_is_wrong(
    run_root: Path, tmp_path: Path, damage: str
) -> None:
    # Keras itself reports "File not found" for a .keras file that is there but not a zip.
    import shutil

    copy = tmp_path / "run"
    family = copy / "targets" / TARGET / "models" / "view=CROSS_SECTIONAL" / "family=KerasMLP"
    family.mkdir(parents=True)
    for name in ("model.keras", "model_meta.json"):
        shutil.copy(run_root / family.relative_to(copy) / name, family / name)
    model = family / "model.keras"
    data = model.read_bytes()
    model.write_bytes(b"not a model" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        ModelLoader(copy).load_model(TARGET, "KerasMLP")
    assert "not a .keras zip archive" in info.value.reason


@pytest.mark.parametrize("framework", ["lightgbm", "xgboost"])
def test_a_multiclass_tree_model_is_refused_at_load(tmp_path: Path, framework: str) -> None:
    # One value per row is what a family publishes: a model with a column per class would
    # load and then fail on every bar.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = rng.integers(0, 3, 300)
    directory = mf.family_dir(tmp_path, TARGET, "Multi")
    if framework == "lightgbm":
        import lightgbm as lgb

        booster = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                            lgb.Dataset(X, y), 3)
        booster.save_model(str(directory / "model.txt"))
    else:
        import xgboost as xgb

        booster = xgb.train({"objective": "multi:softprob", "num_class": 3},
                            xgb.DMatrix(X, y), 3)
        booster.save_model(str(directory / "model.json"))
    mf.write_meta(directory, ["f0", "f1"])
    with pytest.raises(ModelLoadError, match=r"model output has shape \(1, 3\)"):
        ModelLoader(tmp_path).load_model(TARGET, "Multi")


def test_a_plain_tf_module_savedmodel_is_sized_by_its_signatures_variables(
    tmp_path: Path,
) -> None:
    # tf.saved_model.load of a plain tf.Module lists no variables on the loaded object; its
    # serving signature captures them. A large model must get a small fixed batch.
    import tensorflow as tf

    from handlers.registry import FIXED_BATCH_MIN

    class Wide(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = tf.Variable(tf.random.normal((4, 4000), seed=1))
            self.w2 = tf.Variable(tf.random.normal((4000, 1), seed=2))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            return tf.nn.relu(x @ self.w1) @ self.w2

    directory = mf.family_dir(tmp_path, TARGET, "Wide")
    module = Wide()
    tf.saved_model.save(module, str(directory / "model"),
                        signatures={"serving_default": module.__call__})
    mf.write_meta(directory, FEATURES)
    handler, _ = ModelLoader(tmp_path).load_model(TARGET, "Wide")
    assert handler.fixed_batch == FIXED_BATCH_MIN
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    want = module(tf.constant(x)).numpy().reshape(-1)
    np.testing.assert_allclose(handler.predict(x), want, rtol=1e-5)


def test_a_keras_rows_value_does_not_depend_on_its_place_in_the_call(tmp_path: Path) -> None:
    # A call's last rows fall in a partial kernel panel unless the call's size is a multiple of
    # it (on AVX2: 3 x 8 rows); measured, 4,096-row calls rounded the last rows apart.
    import keras

    from handlers.engine import _predict_padded
    from handlers.registry import FIXED_BATCH_SIZES

    keras.utils.set_random_seed(0)
    n_features = 20
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(6, n_features)).astype(np.float32)
    for width in (64, 32, 16):
        model = keras.Sequential([
            keras.Input((n_features,)), keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1),
        ])
        directory = mf.family_dir(tmp_path, TARGET, f"MLP{width}")
        model.save(directory / "model.keras")
        mf.write_meta(directory, [f"f{i}" for i in range(n_features)])
        handler, _ = ModelLoader(tmp_path).load_model(TARGET, f"MLP{width}")
        assert handler.fixed_batch in FIXED_BATCH_SIZES
        for size in FIXED_BATCH_SIZES:  # any size a model may be given
            handler.fixed_batch = size
            for row in rows:
                values = set()
                for place in (0, 1, size // 2, size - 3, size - 2, size - 1):
                    x = rng.normal(size=(size, n_features)).astype(np.float32)
                    x[place] = row
                    values.add(float(handler.predict(x)[place]))
                for n in (1, 130):  # the engine's calls: padded to the fixed size
                    x = rng.normal(size=(n, n_features)).astype(np.float32)
                    x[n - 1] = row
                    values.add(float(_predict_padded(handler, x)[n - 1]))
                assert len(values) == 1, (width, size, values)


def test_a_pickle_whose_rows_round_by_their_place_is_called_row_by_row(tmp_path: Path) -> None:
    # An sklearn MLP on float32 multiplies through OpenBLAS, whose kernel rounds rows by their
    # place in the call (measured on AVX2: alternate groups of 6 rows). The engine must give a
    # row the same value wherever it sits, as a restart or a replay would batch it otherwise.
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    from handlers.engine import _predict_padded

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(0, 0.02, (3000, 3)), rng.uniform(10, 90, 3000)])
    X = X.astype(np.float32)
    y = (X[:, 0] + X[:, 3] / 5000).astype(np.float32)
    for name, model in (("SkMLP", MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=20, random_state=0)),
                        ("Ridge", Ridge())):
        directory = mf.family_dir(tmp_path, TARGET, name)
        mf._pickle_to(directory / "model.pkl", model.fit(X, y))
        mf.write_meta(directory, FEATURES)
        handler, _ = ModelLoader(tmp_path).load_model(TARGET, name)
        own = model.predict  # does the model itself round rows by their place?
        shifted = np.roll(own(np.roll(X[:96], 6, axis=0)), -6)
        assert handler.row_by_row == (not np.array_equal(shifted, own(X[:96])))
        if name == "Ridge":
            assert not handler.row_by_row
        for row in X[:4]:
            values = set()
            for n, place in ((1, 0), (40, 7), (96, 95), (300, 150)):
                batch = X[500 : 500 + n].copy()
                batch[place] = row
                values.add(float(_predict_padded(handler, batch)[place]))
            assert len(values) == 1, (name, values)


NAMED = ["ret_1d", "ret_5d", "vol_10d"]


def _named_model(directory: Path, framework: str, X: pd.DataFrame, y: np.ndarray) -> None:
    """A model trained on a DataFrame, so that the file remembers the column names."""
    if framework == "lightgbm":
        import lightgbm as lgb

        booster = lgb.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 5},
                            lgb.Dataset(X, y), 5)
        booster.save_model(str(directory / "model.txt"))
    elif framework == "xgboost":
        import xgboost as xgb

        xgb.train({"max_depth": 2}, xgb.DMatrix(X, y), 5).save_model(str(directory / "model.json"))
    elif framework == "lightgbm-sklearn":
        import lightgbm as lgb

        mf._dump(directory / "model.pkl",
                 lgb.LGBMRegressor(n_estimators=5, min_child_samples=5, verbose=-1).fit(X, y))
    else:
        from sklearn.linear_model import LinearRegression

        mf._dump(directory / "model.pkl", LinearRegression().fit(X, y))


@pytest.mark.parametrize("framework", ["lightgbm", "xgboost", "lightgbm-sklearn", "sklearn"])
def test_a_feature_list_in_another_order_than_the_models_own_names_is_refused(
    tmp_path: Path, framework: str
) -> None:
    # Columns are fed in feature_list order: a model that names its columns otherwise would
    # read swapped inputs on every bar. The same list in the model's order loads, and gives
    # the framework's own prediction on the DataFrame.
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(300, 3)), columns=NAMED)
    y = X["ret_1d"].to_numpy() * 2.0 - X["vol_10d"].to_numpy()
    wrong = mf.family_dir(tmp_path, TARGET, "Wrong")
    _named_model(wrong, framework, X, y)
    mf.write_meta(wrong, list(reversed(NAMED)))
    right = mf.family_dir(tmp_path, TARGET, "Right")
    _named_model(right, framework, X, y)
    mf.write_meta(right, NAMED)
    loader = ModelLoader(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'vol_10d' in column 2, model_meta.json"
                                             r" feature_list has it in column 0"):
        loader.load_model(TARGET, "Wrong")
    model, _ = loader.load_model(TARGET, "Right")
    rows = X.iloc[:16]
    got = model.predict(rows.to_numpy(dtype=np.float32))
    assert np.abs(got - y[:16]).max() < np.abs(y[:16]).max()  # not swapped: it tracks y
    if framework == "lightgbm-sklearn" or framework == "sklearn":
        import pickle

        with (right / "model.pkl").open("rb") as handle:
            reference = pickle.load(handle).predict(rows.astype(np.float32))
        np.testing.assert_allclose(got, reference, rtol=1e-6)


def test_names_a_framework_made_up_or_a_renamed_list_load(tmp_path: Path, caplog) -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 3))
    y = X[:, 0]
    generic = mf.family_dir(tmp_path, TARGET, "Generic")  # Column_0, Column_1, ...
    lgb.train({"verbose": -1}, lgb.Dataset(X, y), 3).save_model(str(generic / "model.txt"))
    mf.write_meta(generic, list(reversed(NAMED)))
    renamed = mf.family_dir(tmp_path, TARGET, "Renamed")  # no name in common
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    lgb.train({"verbose": -1}, lgb.Dataset(frame, y), 3).save_model(str(renamed / "model.txt"))
    mf.write_meta(renamed, NAMED)
    loader = ModelLoader(tmp_path)
    loader.load_model(TARGET, "Generic")
    with caplog.at_level("WARNING"):
        loader.load_model(TARGET, "Renamed")
    assert "names its inputs a, b, c" in caplog.text


def test_a_pickle_that_exits_while_loading_is_refused_and_the_others_load(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 2))
    mf.write_generic_pickle(tmp_path, TARGET, "Exits", X, X[:, 0], ["ret_1d", "ret_5d"],
                            predictor=mf.Misbehaving(exit_on_load=True))
    mf.write_lightgbm(tmp_path, TARGET, "LightGBM", X, X[:, 0], ["ret_1d", "ret_5d"])
    from handlers.engine import InferenceEngine

    engine = InferenceEngine(ModelLoader(tmp_path)).load_all()
    assert "SystemExit" in engine.load_errors[(TARGET, "Exits")]
    assert [f.family for f in engine.families()] == ["LightGBM"]


def test_a_model_that_is_not_deterministic_is_said_not_taken_for_blas_rounding(
    tmp_path: Path, caplog
) -> None:
    # One row per call would not make its values reproducible: batched as any other.
    rng = np.random.default_rng(6)
    X = rng.normal(size=(200, 2))
    mf.write_generic_pickle(tmp_path, TARGET, "Noisy", X, X[:, 0], ["ret_1d", "ret_5d"],
                            predictor=mf.Misbehaving(noise=1e-9))
    with caplog.at_level("WARNING"):
        model, _ = ModelLoader(tmp_path).load_model(TARGET, "Noisy")
    assert "model.pkl: the model gives other values for the same rows" in caplog.text
    assert "BLAS" not in caplog.text and not model.row_by_row


def test_feature_name_edge_cases() -> None:
    from handlers.feature_names import embedded_names, feature_names_refusal

    # Made-up names only when each is its own position; others are compared.
    assert feature_names_refusal(["Column_0", "Column_1"], ["b", "a"]) is None
    assert feature_names_refusal(["f1", "f0"], ["f0", "f1"]) is not None
    assert feature_names_refusal(["x2", "x1"], ["x1", "x2"]) is not None
    # LightGBM keeps "ret 1d" as "ret_1d": the same name.
    assert feature_names_refusal(["ret_1d", "ret_5d"], ["ret 1d", "ret_5d"]) is None
    assert "'ret 1d' in column 1" in feature_names_refusal(["ret_5d", "ret_1d"],
                                                          ["ret 1d", "ret_5d"])
    # A column count that differs is said at load, not on every bar.
    assert "trained on 4 columns" in feature_names_refusal(["f0", "f1", "f2", "f3"],
                                                          ["a", "b", "c"])

    # A custom object's attributes of those names mean what its author meant.
    class Custom:
        feature_names = ("b", "a")

        def feature_name(self, i: int) -> str:
            return "x"

    assert embedded_names(Custom()) is None


def test_an_sklearn_model_fitted_on_more_columns_is_refused_at_load(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(7)
    X = rng.normal(size=(100, 4))
    directory = mf.family_dir(tmp_path, TARGET, "Wide")
    mf._dump(directory / "model.pkl", LinearRegression().fit(X, X[:, 0]))
    mf.write_meta(directory, ["ret_1d", "ret_5d", "vol_10d"])
    with pytest.raises(ModelLoadError, match="trained on 4 columns, model_meta.json"):
        ModelLoader(tmp_path).load_model(TARGET, "Wide")


def test_the_api_names_load_on_first_use_and_errors_survive_pickling() -> None:
    # handlers' names load on first use (a config read or `livepred tail` needs no engine);
    # its submodules stay reachable as attributes, and its errors cross process boundaries
    # (multiprocessing pickles them; a missing __reduce__ made them fail to unpickle).
    import pickle
    import subprocess
    import sys

    code = ("import sys, handlers; from handlers.errors import ModelLoadError; "
            "assert 'handlers.engine' not in sys.modules; "
            "from handlers import InferenceEngine, predict, FeatureBuilder; "
            "assert handlers.engine.InferenceEngine is InferenceEngine; "
            "print(sorted(n for n in handlers.__all__ if not hasattr(handlers, n)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"
    from handlers import InferenceError, MissingDependencyError, ModelLoadError

    for error in (ModelLoadError("LSTM", "fwd", "sha256 mismatch"),
                  InferenceError("LSTM", "AAPL", "warming"),
                  MissingDependencyError("onnxruntime", "onnx")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert vars(again) == vars(error)
