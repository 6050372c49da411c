"""daemon.demo_run: the demo training run loads with ModelLoader and predicts like its frameworks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daemon.demo_run import (
    SEQUENCE_LENGTH,
    TARGET,
    build_demo_run,
    make_dataset,
    synthetic_closes,
)
from handlers.engine import InferenceEngine
from handlers.errors import ModelLoadError
from handlers.features import DEFAULT_FEATURES, reference_frame
from handlers.run import ModelLoader

FAMILIES = ["LSTM", "LightGBM", "MLP"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_run(tmp_path_factory.mktemp("demo") / "run", seed=7)


def family_dir(run: Path, family: str) -> Path:
    return run / "targets" / TARGET / "models" / "view=CROSS_SECTIONAL" / f"family={family}"


def test_layout_routing_and_meta(demo_run: Path) -> None:
    loader = ModelLoader(demo_run)
    assert loader.list_available_targets() == [TARGET]
    assert loader.list_available_families(TARGET) == FAMILIES
    assert loader.get_routing_decision(TARGET) == "LightGBM"
    assert loader.run_id == "demo-seed7"
    for family in FAMILIES:
        meta = loader.load_meta(TARGET, family)
        assert list(meta.feature_list) == list(DEFAULT_FEATURES)
        assert meta.task == "regression"
        assert meta.interval_minutes == 1
        assert {"ic", "rmse"} <= set(meta.metrics)
        assert meta.sequential == (family == "LSTM")
    assert loader.load_meta(TARGET, "LSTM").sequence_length == SEQUENCE_LENGTH


def test_manifest_hashes_every_model_file(demo_run: Path) -> None:
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert manifest["run_id"] == "demo-seed7"
    artifacts = manifest["artifacts"]
    model_files = {"LightGBM": "model.txt", "MLP": "model.keras", "LSTM": "model.pt"}
    for family, name in model_files.items():
        rel = (family_dir(demo_run, family) / name).relative_to(demo_run).as_posix()
        assert rel in artifacts
    for rel, digest in artifacts.items():
        assert hashlib.sha256((demo_run / rel).read_bytes()).hexdigest() == digest


def test_loads_all_three_families_with_their_handlers(demo_run: Path) -> None:
    loader = ModelLoader(demo_run, interval_minutes=1)
    formats = {f: loader.load_model(TARGET, f)[0].format_name for f in FAMILIES}
    assert formats == {"LSTM": "torchscript", "LightGBM": "lightgbm", "MLP": "keras"}
    engine = InferenceEngine(loader).load_all()
    assert engine.load_errors == {}
    assert engine.selected == {TARGET: "LightGBM"}


def test_a_changed_model_file_is_refused(demo_run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_run, tmp_path / "run")
    with (family_dir(copy, "LightGBM") / "model.txt").open("a") as handle:
        handle.write("\n")
    loader = ModelLoader(copy)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        loader.load_model(TARGET, "LightGBM")
    loader.load_model(TARGET, "MLP")  # the others still load


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load, keras' numpy use
def test_predictions_match_the_frameworks(demo_run: Path) -> None:
    rng = np.random.default_rng(99)
    close = pd.Series(synthetic_closes(rng, 1, 80)[0])
    rows = reference_frame(close, list(DEFAULT_FEATURES)).to_numpy()[-30:].astype(np.float32)
    assert np.isfinite(rows).all()
    loader = ModelLoader(demo_run)

    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(family_dir(demo_run, "LightGBM") / "model.txt"))
    handler, _ = loader.load_model(TARGET, "LightGBM")
    np.testing.assert_allclose(handler.predict(rows), booster.predict(rows), rtol=1e-6)

    import keras

    model = keras.saving.load_model(str(family_dir(demo_run, "MLP") / "model.keras"))
    handler, _ = loader.load_model(TARGET, "MLP")
    expected = np.asarray(model(rows, training=False)).reshape(-1)
    np.testing.assert_allclose(handler.predict(rows), expected, rtol=1e-5, atol=1e-9)

    import torch

    module = torch.jit.load(str(family_dir(demo_run, "LSTM") / "model.pt"))
    windows = np.stack(
        [rows[i : i + SEQUENCE_LENGTH] for i in range(len(rows) - SEQUENCE_LENGTH + 1)]
    )
    handler, _ = loader.load_model(TARGET, "LSTM")
    with torch.inference_mode():
        expected = module(torch.from_numpy(windows)).numpy().reshape(-1)
    np.testing.assert_allclose(handler.predict(windows), expected, rtol=1e-5, atol=1e-9)
    # Regression outputs in return units, not standardised ones.
    assert np.abs(expected).max() < 0.05


def test_dataset_targets_and_sequences() -> None:
    closes = synthetic_closes(np.random.default_rng(1), 2, 120)
    data = make_dataset(closes)
    assert data.x.shape[1] == len(DEFAULT_FEATURES)
    assert data.seq.shape[1:] == (SEQUENCE_LENGTH, len(DEFAULT_FEATURES))
    assert np.isfinite(data.x).all() and np.isfinite(data.seq).all()
    # The last row of each sequence is a feature row of the same bar.
    first = pd.Series(closes[0])
    frame = reference_frame(first, list(DEFAULT_FEATURES)).to_numpy()
    end = 20 + SEQUENCE_LENGTH - 1  # first bar whose last T rows are all finite
    np.testing.assert_allclose(data.seq[0], frame[end - SEQUENCE_LENGTH + 1 : end + 1], rtol=1e-6)
    assert data.y_seq[0] == pytest.approx(closes[0][end + 5] / closes[0][end] - 1)


def test_same_seed_same_models(demo_run: Path, tmp_path: Path) -> None:
    again = build_demo_run(tmp_path / "again", seed=7)
    lgb_text = (family_dir(demo_run, "LightGBM") / "model.txt").read_text()
    assert (family_dir(again, "LightGBM") / "model.txt").read_text() == lgb_text
    for family in FAMILIES:
        first = json.loads((family_dir(demo_run, family) / "model_meta.json").read_text())
        second = json.loads((family_dir(again, family) / "model_meta.json").read_text())
        assert first["metrics"] == second["metrics"]  # same weights, same holdout scores


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(FileExistsError):
        build_demo_run(tmp_path)
