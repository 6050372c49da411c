"""Compiled tree models predict exactly what LightGBM's own Booster.predict does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from handlers import tree_compiler
from handlers.lightgbm_booster import LightGBMBoosterHandler
from handlers.meta import ModelMeta
from handlers.tree_compiler import compiled_predictor
from tests.model_factory import write_lightgbm

pytest.importorskip("tl2cgen")
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler (gcc)")

FEATURES = [f"f{i}" for i in range(6)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    monkeypatch.setattr(tree_compiler, "enabled", True)


def _data(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES))) * 10.0 ** rng.integers(-3, 4, (rows, 1))
    x[rng.random(x.shape) < 0.1] = np.nan  # trained with missing values: NaN branches
    x[rng.random(x.shape) < 0.03] = 0.0
    return x


def _model(tmp_path: Path, task: str) -> tuple[Path, ModelMeta]:
    x = _data(600, 1)
    signal = np.nan_to_num(x[:, 0]) - 0.5 * np.nan_to_num(x[:, 3]) + np.isnan(x[:, 1])
    y = (signal > 0).astype(float) if task == "binary" else signal
    directory = write_lightgbm(tmp_path / "run", "t", "LightGBM", x, y, FEATURES, task=task,
                               num_trees=60)
    meta = ModelMeta.from_dict({"feature_list": FEATURES, "task": task}, "LightGBM")
    return directory / "model.txt", meta


@pytest.mark.parametrize("task", ["regression", "binary"])
def test_the_compiled_model_predicts_what_lightgbm_predicts(tmp_path: Path, task: str) -> None:
    import lightgbm as lgb

    path, meta = _model(tmp_path, task)
    handler = LightGBMBoosterHandler.load(path, meta)
    assert handler.compiled
    booster = lgb.Booster(model_file=str(path))
    rows = _data(2000, 2).astype(np.float32)
    rows[::97] = np.inf
    want = booster.predict(rows, num_threads=1)
    got = handler.predict(rows)
    np.testing.assert_array_equal(got, want)
    # One row at a time too (the latency path).
    for i in range(0, 40):
        np.testing.assert_array_equal(handler.predict(rows[i : i + 1]), want[i : i + 1])


def test_a_compiled_model_that_differs_is_not_used(tmp_path: Path) -> None:
    import lightgbm as lgb

    path, _ = _model(tmp_path, "regression")
    booster = lgb.Booster(model_file=str(path))

    def off_by_a_hair(rows: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(rows, num_threads=1)) + 1e-12

    assert compiled_predictor(path, "lightgbm", off_by_a_hair, len(FEATURES)) is None


def test_the_library_is_built_once_and_reused(tmp_path: Path) -> None:
    path, meta = _model(tmp_path, "regression")
    assert LightGBMBoosterHandler.load(path, meta).compiled
    libraries = list((tmp_path / "cache").rglob("*.so"))
    assert len(libraries) == 1
    built = libraries[0].stat().st_mtime_ns
    assert LightGBMBoosterHandler.load(path, meta).compiled
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.so")] == [built]


def test_compiling_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree_compiler, "enabled", False)
    path, meta = _model(tmp_path, "regression")
    handler = LightGBMBoosterHandler.load(path, meta)
    assert not handler.compiled
    assert handler.predict(_data(5, 3).astype(np.float32)).shape == (5,)


@pytest.mark.parametrize("setting", ["true", "false"])
def test_models_compile_trees_decides_for_the_daemon(tmp_path: Path, setting: str) -> None:
    from daemon.model_setup import build_engine
    from daemon.settings import load_settings

    _model(tmp_path, "regression")
    env = {"LIVEPRED_MODELS__RUN_ROOT": str(tmp_path / "run"),
           "LIVEPRED_MODELS__COMPILE_TREES": setting}
    engine = build_engine(load_settings(None, env))
    (family,) = engine.families()
    assert family.model.compiled is (setting == "true")
    engine.close()


def test_a_model_with_categorical_splits_stays_with_lightgbm(tmp_path: Path) -> None:
    # The compiled code reads a category in (-1, 0) as category 0; LightGBM takes any
    # negative category as missing. Such a model is not compiled.
    import lightgbm as lgb

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 8))
    x[:, 2] = rng.integers(0, 12, 3000)
    y = x[:, 0] + (x[:, 2] % 3) + rng.normal(0, 0.1, 3000)
    path = tmp_path / "model.txt"
    lgb.train({"verbose": -1, "num_leaves": 15}, lgb.Dataset(x, y, categorical_feature=[2]),
              30).save_model(str(path))
    meta = ModelMeta.from_dict({"feature_list": [f"f{i}" for i in range(8)]}, "Cat")
    handler = LightGBMBoosterHandler.load(path, meta)
    assert not handler.compiled
    rows = rng.normal(size=(2000, 8)).astype(np.float32)
    rows[:, 2] = -rng.random(2000)  # the categorical feature in (-1, 0)
    want = lgb.Booster(model_file=str(path)).predict(rows, num_threads=1)
    np.testing.assert_array_equal(handler.predict(rows), want)
    # compiled anyway, it differs on these rows: the case is real
    forced = compiled_predictor(path, "lightgbm", handler._native, 8)
    if forced is not None:
        assert not np.array_equal(forced(rows), want)


NOBODY = 65534


def _as_root_with_a_private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A LightGBM model file, with the temporary folder (the cache's fallback) in tmp_path;
    the test skipped unless it can act for another user (root)."""
    import os
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    path, _ = _model(tmp_path, "regression")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return path


def test_a_library_someone_else_could_have_planted_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library is dlopen()ed into the daemon: a cache folder another user may write to
    # (the shared /tmp fallback was one) would run their code. Only a folder and a file this
    # user owns and nobody else may write are trusted.
    import hashlib
    import os

    import tl2cgen
    import treelite

    path = _as_root_with_a_private_tmp(tmp_path, monkeypatch)
    shared = tmp_path / "cache" / "livepred" / "trees"
    shared.mkdir(parents=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    planted = shared / f"{digest}-tl2cgen{tl2cgen.__version__}-q.so"
    planted.write_bytes(b"not a library")
    os.chown(planted, NOBODY, NOBODY)
    # Another user's folder: not used at all, the library goes to this user's private one.
    os.chown(shared, NOBODY, NOBODY)
    library = tree_compiler._library(path, "lightgbm", treelite, tl2cgen)
    assert library.parent == tmp_path / "tmp" / f"livepred-trees-{os.geteuid()}"
    assert planted.read_bytes() == b"not a library"
    # A folder of ours that others could write (0777): tightened, and the file in it that
    # another user owns is built anew over, not loaded.
    os.chown(shared, os.geteuid(), os.getegid())
    shared.chmod(0o777)
    assert tree_compiler._library(path, "lightgbm", treelite, tl2cgen) == planted
    assert planted.read_bytes() != b"not a library" and planted.stat().st_uid == os.geteuid()
    assert not shared.stat().st_mode & 0o022


def test_a_link_another_user_made_to_a_folder_of_ours_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The /tmp fallback's name made a link by another user, to a folder this user owns: the
    # owner check followed it and passed, and the link's maker could point it at their own
    # folder between the check and the load.
    import os

    import tl2cgen
    import treelite

    path = _as_root_with_a_private_tmp(tmp_path, monkeypatch)
    theirs = tmp_path / "cache" / "livepred"
    theirs.mkdir(parents=True)
    os.chown(theirs, NOBODY, NOBODY)  # the cache unusable: the /tmp fallback is tried
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "tmp" / f"livepred-trees-{os.geteuid()}"
    link.symlink_to(ours)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(PermissionError):
        tree_compiler._library(path, "lightgbm", treelite, tl2cgen)
    assert list(ours.iterdir()) == []


def test_under_umask_002_the_library_is_still_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gcc's output under umask 002 is group-writable: rejected as untrusted, it was compiled
    # again at every load; a cache folder made under that umask was skipped for /tmp.
    import os

    path, meta = _model(tmp_path, "regression")
    old = os.umask(0o002)
    try:
        (tmp_path / "cache" / "livepred" / "trees").mkdir(parents=True, mode=0o775)
        assert LightGBMBoosterHandler.load(path, meta).compiled
        libraries = list((tmp_path / "cache").rglob("*.so"))
        assert len(libraries) == 1 and not libraries[0].stat().st_mode & 0o022
        for folder in (tmp_path / "cache" / "livepred", tmp_path / "cache" / "livepred" / "trees"):
            assert not folder.stat().st_mode & 0o022, folder  # made ours alone
        built = libraries[0].stat().st_mtime_ns
        assert LightGBMBoosterHandler.load(path, meta).compiled
        assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.so")] == [built]
    finally:
        os.umask(old)
