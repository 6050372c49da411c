"""Model file detection, lazy handler import, output shaping."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from handlers import registry
from handlers.errors import MissingDependencyError
from handlers.meta import ModelMeta
from handlers.registry import (
    MODEL_FORMATS,
    detect_model_file,
    expected_input_shape,
    handler_class,
    to_prediction_vector,
)
from tests import model_factory as mf

FILE_CASES = [
    (fmt.name, name) for fmt in MODEL_FORMATS for name in fmt.file_names if not fmt.is_directory
]


def _touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"x")


@pytest.mark.parametrize(("format_name", "file_name"), FILE_CASES)
def test_each_file_name_maps_to_its_format(
    tmp_path: Path, format_name: str, file_name: str
) -> None:
    _touch(tmp_path, file_name, "model_meta.json")
    assert detect_model_file(tmp_path) == (format_name, tmp_path / file_name)


def test_savedmodel_directory_needs_saved_model_pb(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    assert detect_model_file(tmp_path) is None
    _touch(tmp_path / "model", "saved_model.pb")
    assert detect_model_file(tmp_path) == ("tf_savedmodel", tmp_path / "model")


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (["model.pkl", "model.txt"], "model.txt"),
        (["model.onnx", "model.json"], "model.json"),
        (["model.ubj", "model.json"], "model.json"),
        (["model.h5", "model.keras"], "model.keras"),
        (["model.pt2", "model.pt"], "model.pt"),
        (["model.joblib", "model.onnx"], "model.onnx"),
    ],
)
def test_table_order_decides(tmp_path: Path, present: list[str], expected: str) -> None:
    _touch(tmp_path, *present)
    found = detect_model_file(tmp_path)
    assert found is not None and found[1].name == expected


def test_nothing_known_is_none(tmp_path: Path) -> None:
    _touch(tmp_path, "model_meta.json", "model.bin", "weights.h5")
    (tmp_path / "model.txt").mkdir()  # a directory with a file's name is not that file
    assert detect_model_file(tmp_path) is None


def test_file_names_listed_in_table_order() -> None:
    assert registry.MODEL_FILE_NAMES[:3] == ("model.txt", "model.json", "model.ubj")
    assert "model/" in registry.MODEL_FILE_NAMES
    assert registry.MODEL_FILE_NAMES[-1] == "model.joblib"


@pytest.mark.parametrize("fmt", MODEL_FORMATS, ids=lambda f: f.name)
def test_handler_class_per_format(fmt: registry.ModelFormat) -> None:
    cls = handler_class(fmt.name)
    assert cls.format_name == fmt.name
    assert callable(cls.load) and callable(cls.predict) and callable(cls.close)
    assert cls.accepts_nan is (fmt.name in ("lightgbm", "xgboost", "pickle"))


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model format 'caffe'"):
        handler_class("caffe")


@pytest.mark.parametrize(
    ("missing", "extra"),
    [("torch", "torch"), ("tensorflow", "keras"), ("onnxruntime", "onnx"), ("xgboost", "xgboost")],
)
def test_missing_framework_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, missing: str, extra: str
) -> None:
    def fail(name: str) -> None:
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    monkeypatch.setattr(registry.importlib, "import_module", fail)
    with pytest.raises(MissingDependencyError, match=rf"pip install 'livepred\[{extra}\]'") as info:
        handler_class("torchscript")
    assert info.value.extra == extra


def test_unrelated_import_error_is_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> None:
        raise ModuleNotFoundError("No module named 'handlers.typo'", name="handlers.typo")

    monkeypatch.setattr(registry.importlib, "import_module", fail)
    with pytest.raises(ModuleNotFoundError, match="handlers.typo"):
        handler_class("lightgbm")


def test_lightgbm_only_run_imports_no_other_framework(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 3))
    mf.write_lightgbm(tmp_path, "ret_1d", "LightGBM", X, X[:, 0], ["a", "b", "c"], num_trees=3)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from handlers.run import ModelLoader
        loader = ModelLoader({str(tmp_path)!r})
        handler, meta = loader.load_model("ret_1d", "LightGBM")
        handler.predict(np.zeros((2, 3), dtype=np.float32))
        loader.describe()
        heavy = ["tensorflow", "keras", "torch", "onnxruntime", "onnx", "xgboost"]
        print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("raw", "binary", "expected"),
    [
        (np.array([1.0, 2.0], dtype=np.float32), False, [1.0, 2.0]),
        (np.array([[1.0], [2.0]]), False, [1.0, 2.0]),
        (np.array([[0.3, 0.7], [0.9, 0.1]]), True, [0.7, 0.1]),
        ([0.25, 0.5], True, [0.25, 0.5]),
    ],
)
def test_output_shaping(raw: object, binary: bool, expected: list[float]) -> None:
    out = to_prediction_vector(raw, 2, binary=binary)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("raw", "binary"),
    [
        (np.zeros(3), False),  # one value too many
        (np.zeros((2, 2)), False),  # two columns for a regression
        (np.zeros((2, 3)), True),  # three classes
        (np.zeros((2, 1, 1)), False),
    ],
)
def test_output_of_wrong_shape_raises(raw: np.ndarray, binary: bool) -> None:
    with pytest.raises(ValueError, match="model output has shape"):
        to_prediction_vector(raw, 2, binary=binary)


def test_expected_input_shape() -> None:
    flat = ModelMeta.from_dict({"feature_list": ["a", "b"]})
    sequential = ModelMeta.from_dict({"feature_list": ["a", "b"], "sequence_length": 7})
    by_name = ModelMeta.from_dict({"feature_list": ["a", "b"]}, family="LSTM")
    raw = ModelMeta.from_dict(
        {
            "input_mode": "raw_sequence",
            "sequence_length": 4,
            "sequence_channels": ["close", "volume"],
        }
    )
    assert expected_input_shape(flat) == (2,)
    assert expected_input_shape(sequential) == (7, 2)
    assert expected_input_shape(by_name) == (by_name.window, 2)
    assert expected_input_shape(raw) == (4, 2)


def test_fixed_batch_is_as_large_as_the_padding_work_allows() -> None:
    from handlers.registry import FIXED_BATCH_MAX, FIXED_BATCH_MIN, PADDING_WORK, fixed_batch_for

    assert fixed_batch_for(177) == FIXED_BATCH_MAX >= 4096  # the demo's MLP: one call a drain
    assert fixed_batch_for(18_944, steps=20) == FIXED_BATCH_MIN  # 64 recurrent units, T = 20
    mid = fixed_batch_for(1_000)
    assert mid % 96 == 0  # whole kernel panels on AVX2 (24 rows) and AVX-512 (48), and 32
    assert mid * 2 * 1_000 <= PADDING_WORK
    assert all(size % 96 == 0 for size in (fixed_batch_for(p) for p in (1, 50, 500, 5_000)))
