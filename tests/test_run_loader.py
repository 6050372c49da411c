"""ModelLoader: the seed API, caching, and every integrity refusal (CONTRACT sections 2, 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handlers import run as run_module
from handlers.artifact_hash import artifact_sha256, file_sha256, tree_sha256
from handlers.errors import MissingDependencyError, ModelLoadError
from handlers.run import ModelLoader, RunLayoutError, load_model_from_run
from tests import model_factory as mf

FEATURES = ["ret_1d", "vol_10d", "rsi_14"]


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run: two targets, a native booster and two pickles, routing and a manifest."""
    root = tmp_path_factory.mktemp("template") / "run-2024-01-01"
    rng = np.random.default_rng(1)
    X = rng.standard_normal((120, 3))
    y = 2.0 * X[:, 0]
    mf.write_lightgbm(
        root,
        "ret_1d",
        "LightGBM",
        X,
        y,
        FEATURES,
        num_trees=5,
        metrics={"ic": 0.05},
        interval_minutes=5,
    )
    mf.write_lightgbm_pickle(root, "ret_1d", "LGBMPkl", X, y, FEATURES, num_trees=5)
    mf.write_generic_pickle(root, "ret_1d", "Linear", X, y, FEATURES)
    mf.write_lightgbm(root, "ret_5d", "LightGBM", X, -y, FEATURES, num_trees=5)
    mf.write_routing(root, "ret_1d", "LightGBM", reason="best ic")
    mf.write_manifest(root, run_id="run-42")
    return root


@pytest.fixture
def run_root(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template run, free to damage."""
    root = tmp_path / template.name
    shutil.copytree(template, root)
    return root


def said(err: str) -> list[str]:
    """The command's own lines on stderr: not the JSON log lines of a logging set up by an
    earlier test in the same process."""
    return [line for line in err.strip().splitlines() if not line.startswith("{")]


def fam(root: Path, family: str, target: str = "ret_1d") -> Path:
    return root / "targets" / target / "models" / "view=CROSS_SECTIONAL" / f"family={family}"


def refusal(loader: ModelLoader, family: str, target: str = "ret_1d") -> str:
    with pytest.raises(ModelLoadError) as info:
        loader.load_model(target, family)
    assert info.value.family == family and info.value.target == target
    assert "\n" not in info.value.reason
    return info.value.reason


def assert_others_load(loader: ModelLoader, *, except_family: str) -> None:
    for family in loader.list_available_families("ret_1d"):
        if family != except_family:
            handler, _ = loader.load_model("ret_1d", family)
            assert handler.predict(np.zeros((2, 3), dtype=np.float32)).shape == (2,)


# --- the seed API --------------------------------------------------------------------------


def test_invalid_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ModelLoader(tmp_path / "does-not-exist")


def test_load_returns_model_and_meta(run_root: Path) -> None:
    model, meta = ModelLoader(run_root).load_model("ret_1d", "LightGBM")
    assert meta["feature_list"] == FEATURES
    assert meta.feature_list == tuple(FEATURES)
    out = model.predict(np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=np.float32))
    assert out.shape == (2,) and out[0] > out[1]


def test_load_is_cached(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    first = loader.load_model("ret_1d", "LightGBM")
    second = loader.load_model("ret_1d", "LightGBM")
    assert first[0] is second[0] and first[1] is second[1]


def test_feature_list(run_root: Path) -> None:
    assert ModelLoader(run_root).get_feature_list("ret_1d", "Linear") == FEATURES


def test_feature_list_from_older_alias(run_root: Path) -> None:
    meta_path = fam(run_root, "Linear") / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["features"] = meta.pop("feature_list")
    meta_path.write_text(json.dumps(meta))
    loader = ModelLoader(run_root)
    assert loader.get_feature_list("ret_1d", "Linear") == FEATURES
    assert loader.load_model("ret_1d", "Linear")[1]["feature_list"] == FEATURES


def test_targets_and_families_sorted(run_root: Path) -> None:
    for name in ("zeta", "Alpha", "beta"):
        shutil.copytree(fam(run_root, "Linear"), fam(run_root, name))
    (fam(run_root, "x").parent / "notes.txt").write_text("not a family")
    loader = ModelLoader(run_root)
    assert loader.list_available_targets() == ["ret_1d", "ret_5d"]
    assert loader.list_available_families("ret_1d") == sorted(
        ["Alpha", "LGBMPkl", "LightGBM", "Linear", "beta", "zeta"]
    )
    assert loader.list_available_families("ret_5d") == ["LightGBM"]
    assert loader.list_available_families("no_such_target") == []
    assert loader.list_available_families("ret_1d", view="SYMBOL_SPECIFIC") == []


def test_no_targets_directory(tmp_path: Path) -> None:
    assert ModelLoader(tmp_path).list_available_targets() == []


def test_routing_decision_present_and_absent(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    assert loader.get_routing_decision("ret_1d") == "LightGBM"
    assert loader.get_routing_decision("ret_5d") is None


def test_malformed_routing_decision(run_root: Path) -> None:
    (fam(run_root, "x").parent / "routing_decision.json").write_text("{oops")
    loader = ModelLoader(run_root)
    with pytest.raises(RunLayoutError, match="routing_decision.json"):
        loader.get_routing_decision("ret_1d")
    described = {t.target: t for t in loader.describe(load=False)}
    assert described["ret_1d"].routing_error and described["ret_1d"].selected_family is None


def test_model_metrics(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    assert loader.get_model_metrics("ret_1d", "LightGBM") == {"ic": 0.05}
    assert loader.get_model_metrics("ret_1d", "Linear") == {}


def test_load_model_from_run(run_root: Path) -> None:
    model, meta = load_model_from_run(run_root, "ret_5d", "LightGBM")
    assert meta.feature_list == tuple(FEATURES)
    assert model.format_name == "lightgbm"


def test_run_id_and_manifest(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    assert loader.run_id == "run-42"
    assert loader.manifest["run_id"] == "run-42"
    (run_root / "manifest.json").unlink()
    bare = ModelLoader(run_root)
    assert bare.manifest == {}
    assert bare.run_id == "run-2024-01-01"  # the run directory's name


def test_run_id_follows_a_current_symlink_to_the_run(run_root: Path) -> None:
    (run_root / "manifest.json").unlink()
    link = run_root.parent / "current"
    link.symlink_to(run_root)
    assert ModelLoader(link).run_id == "run-2024-01-01"


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"artifacts": {"a": "not-a-hash"}}', '{"run_id": 7}']
)
def test_malformed_manifest_is_a_clear_error(run_root: Path, content: str) -> None:
    (run_root / "manifest.json").write_text(content)
    with pytest.raises(RunLayoutError, match="manifest.json"):
        ModelLoader(run_root)


@pytest.mark.parametrize(
    ("option", "value", "key"),
    [("device", "tpu", "models.device"), ("interval_minutes", -1, "models.interval_minutes")],
)
def test_bad_options_name_the_key(run_root: Path, option: str, value: object, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ModelLoader(run_root, **{option: value})


def test_unknown_family_lists_the_available_ones(run_root: Path) -> None:
    reason = refusal(ModelLoader(run_root), "XGBoost")
    assert "family=XGBoost" in reason and "LightGBM" in reason


@pytest.mark.parametrize("family", ["..", "a/b", ""])
def test_names_cannot_escape_the_run(run_root: Path, family: str) -> None:
    with pytest.raises(ModelLoadError, match="invalid name"):
        ModelLoader(run_root).load_model("ret_1d", family)


# --- refusals ------------------------------------------------------------------------------


def test_missing_meta(run_root: Path) -> None:
    (fam(run_root, "LGBMPkl") / "model_meta.json").unlink()
    loader = ModelLoader(run_root)
    assert "model_meta.json" in refusal(loader, "LGBMPkl")
    assert_others_load(loader, except_family="LGBMPkl")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{broken", "not valid JSON"),
        ('{"feature_list": []}', "feature_list"),
        ('{"feature_list": ["a"], "task": "multiclass"}', "task"),
    ],
)
def test_invalid_meta(run_root: Path, content: str, needle: str) -> None:
    (fam(run_root, "Linear") / "model_meta.json").write_text(content)
    loader = ModelLoader(run_root)
    reason = refusal(loader, "Linear")
    assert reason.startswith("model_meta.json") and needle in reason
    assert_others_load(loader, except_family="Linear")


def test_unknown_model_format(run_root: Path) -> None:
    directory = fam(run_root, "Caffe")
    shutil.copytree(fam(run_root, "Linear"), directory)
    (directory / "model.pkl").rename(directory / "model.caffemodel")
    loader = ModelLoader(run_root)
    reason = refusal(loader, "Caffe")
    assert "no model file" in reason
    assert "expected one of model.txt, model.json, model.ubj, model.keras" in reason
    assert_others_load(loader, except_family="Caffe")


def test_corrupt_model_file(run_root: Path) -> None:
    (fam(run_root, "LightGBM") / "model.txt").write_text("tree\nversion=v4\ngarbage\n")
    (run_root / "manifest.json").unlink()
    loader = ModelLoader(run_root)
    reason = refusal(loader, "LightGBM")
    assert "could not load" in reason and "model.txt as lightgbm" in reason
    assert_others_load(loader, except_family="LightGBM")


@pytest.mark.parametrize("where", ["in a tree", "before end of trees", "in the parameters"])
def test_a_lightgbm_model_cut_short_is_refused_not_a_crash(run_root: Path, where: str) -> None:
    # LightGBM reads a truncated model.txt past its end and kills the process (seen: SIGSEGV
    # for cuts in the trees and in the parameters); a half-copied deploy must be refused
    # like any corrupt file. Loaded in a child process, so a regression fails this test
    # instead of killing the test run.
    path = fam(run_root, "LightGBM") / "model.txt"
    text = path.read_text()
    cut = {
        "in a tree": text.index("Tree=1") + 40,
        "before end of trees": text.index("end of trees") - 2,
        "in the parameters": text.index("parameters:") + 60,
    }[where]
    path.write_text(text[:cut])
    (run_root / "manifest.json").unlink()
    script = (
        "import sys\n"
        "from handlers.run import ModelLoader\n"
        "from handlers.errors import ModelLoadError\n"
        "loader = ModelLoader(sys.argv[1])\n"
        "try:\n"
        "    loader.load_model('ret_1d', 'LightGBM')\n"
        "    print('LOADED')\n"
        "except ModelLoadError as exc:\n"
        "    print('REFUSED', exc.reason)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(run_root)], capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-1500:])
    assert "REFUSED" in done.stdout and "cut short" in done.stdout, done.stdout
    assert_others_load(ModelLoader(run_root), except_family="LightGBM")


def test_corrupt_pickle(run_root: Path) -> None:
    (fam(run_root, "LGBMPkl") / "model.pkl").write_bytes(b"\x80\x05not a pickle")
    (run_root / "manifest.json").unlink()
    reason = refusal(ModelLoader(run_root), "LGBMPkl")
    assert "could not load" in reason and "as pickle" in reason


def test_pickle_without_predict(run_root: Path) -> None:
    mf._pickle_to(fam(run_root, "Linear") / "model.pkl", {"weights": [1, 2, 3]})
    (run_root / "manifest.json").unlink()
    assert "has no predict method" in refusal(ModelLoader(run_root), "Linear")


def test_manifest_sha256_mismatch(run_root: Path) -> None:
    model_path = fam(run_root, "LightGBM") / "model.txt"
    expected = artifact_sha256(model_path)
    with model_path.open("a") as handle:
        handle.write("\n")  # still a loadable booster: only the checksum can tell
    actual = artifact_sha256(model_path)
    loader = ModelLoader(run_root)
    reason = refusal(loader, "LightGBM")
    assert "sha256 mismatch" in reason and "manifest.json" in reason
    assert "targets/ret_1d/models/view=CROSS_SECTIONAL/family=LightGBM/model.txt" in reason
    assert expected[:12] in reason and actual[:12] in reason
    assert_others_load(loader, except_family="LightGBM")
    assert loader.load_model("ret_5d", "LightGBM")[0] is not None


def test_manifest_entry_for_a_missing_file(run_root: Path) -> None:
    manifest = json.loads((run_root / "manifest.json").read_text())
    extra = "targets/ret_1d/models/view=CROSS_SECTIONAL/family=Linear/scaler.pkl"
    manifest["artifacts"][extra] = "0" * 64
    (run_root / "manifest.json").write_text(json.dumps(manifest))
    assert "scaler.pkl, which is missing" in refusal(ModelLoader(run_root), "Linear")


def test_manifest_covers_meta_too(run_root: Path) -> None:
    mf.write_manifest(run_root, include_meta=True)
    meta_path = fam(run_root, "Linear") / "model_meta.json"
    meta_path.write_text(meta_path.read_text().replace('"regression"', '"binary"'))
    assert "model_meta.json" in refusal(ModelLoader(run_root), "Linear")


def test_model_checksum_mismatch(run_root: Path) -> None:
    (run_root / "manifest.json").unlink()
    directory = fam(run_root, "LGBMPkl")
    actual = file_sha256(directory / "model.pkl")
    meta = json.loads((directory / "model_meta.json").read_text())
    meta["model_checksum"] = "ab" * 32
    (directory / "model_meta.json").write_text(json.dumps(meta))
    reason = refusal(ModelLoader(run_root), "LGBMPkl")
    assert "model_checksum" in reason and "abababababab" in reason and actual[:12] in reason


def test_model_checksum_match_loads(run_root: Path) -> None:
    directory = fam(run_root, "LGBMPkl")
    meta = json.loads((directory / "model_meta.json").read_text())
    meta["model_checksum"] = file_sha256(directory / "model.pkl").upper()
    (directory / "model_meta.json").write_text(json.dumps(meta))
    assert ModelLoader(run_root).load_model("ret_1d", "LGBMPkl")[0].format_name == "pickle"


def test_savedmodel_directory_checksum(run_root: Path) -> None:
    """A SavedModel is checked by its tree hash (or per file) before TensorFlow is touched."""
    directory = fam(run_root, "SavedModel")
    shutil.copytree(fam(run_root, "Linear"), directory)
    (directory / "model.pkl").unlink()
    (directory / "model" / "variables").mkdir(parents=True)
    (directory / "model" / "saved_model.pb").write_bytes(b"graph")
    (directory / "model" / "variables" / "variables.index").write_bytes(b"index")
    manifest = mf.write_manifest(run_root)
    key = "targets/ret_1d/models/view=CROSS_SECTIONAL/family=SavedModel/model"
    assert manifest["artifacts"][key] == tree_sha256(directory / "model")
    (directory / "model" / "variables" / "variables.index").write_bytes(b"tampered")
    loader = ModelLoader(run_root)
    reason = refusal(loader, "SavedModel")
    assert "sha256 mismatch" in reason and key in reason
    assert_others_load(loader, except_family="SavedModel")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_group_or_world_writable_pickle(run_root: Path, mode: int) -> None:
    path = fam(run_root, "LGBMPkl") / "model.pkl"
    os.chmod(path, mode)
    loader = ModelLoader(run_root)
    reason = refusal(loader, "LGBMPkl")
    assert f"chmod go-w {path.resolve()}" in reason
    assert_others_load(loader, except_family="LGBMPkl")


def test_pickles_refused_when_not_allowed(run_root: Path) -> None:
    loader = ModelLoader(run_root, allow_pickle=False)
    for family in ("LGBMPkl", "Linear"):
        assert "models.allow_pickle" in refusal(loader, family)
    assert loader.load_model("ret_1d", "LightGBM")[0].format_name == "lightgbm"


@pytest.mark.parametrize(("interval", "loads"), [(0, True), (5, True), (5.0, True), (1, False)])
def test_interval_minutes(run_root: Path, interval: float, loads: bool) -> None:
    loader = ModelLoader(run_root, interval_minutes=interval)
    if loads:
        loader.load_model("ret_1d", "LightGBM")
    else:
        reason = refusal(loader, "LightGBM")
        assert "interval_minutes" in reason and "models.interval_minutes = 1" in reason
    loader.load_model("ret_1d", "Linear")  # no interval in its meta: never refused for it


def test_missing_framework_names_the_extra(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(format_name: str) -> type:
        raise MissingDependencyError("torch", "torch")

    monkeypatch.setattr(run_module, "handler_class", missing)
    assert "pip install 'livepred[torch]'" in refusal(ModelLoader(run_root), "LightGBM")


def test_refusal_is_cached_and_repeated(run_root: Path) -> None:
    (fam(run_root, "Linear") / "model_meta.json").unlink()
    loader = ModelLoader(run_root)
    first = refusal(loader, "Linear")
    (fam(run_root, "Linear") / "model_meta.json").write_text(json.dumps({"feature_list": FEATURES}))
    assert refusal(loader, "Linear") == first  # until close() forgets it
    loader.close()
    assert loader.load_model("ret_1d", "Linear")[1].feature_list == tuple(FEATURES)


# --- describe / close ----------------------------------------------------------------------


def test_describe(run_root: Path) -> None:
    os.chmod(fam(run_root, "LGBMPkl") / "model.pkl", 0o666)
    described = {t.target: t for t in ModelLoader(run_root).describe()}
    assert list(described) == ["ret_1d", "ret_5d"]
    ret_1d = described["ret_1d"]
    assert ret_1d.selected_family == "LightGBM" and ret_1d.routing_error is None
    families = {f.family: f for f in ret_1d.families}
    light = families["LightGBM"]
    assert light.loaded and light.refusal is None
    assert light.format_name == "lightgbm" and light.handler == "LightGBMBoosterHandler"
    assert light.features == tuple(FEATURES) and light.metrics == {"ic": 0.05}
    assert light.accepts_nan is True and light.sequence_length is None
    assert light.interval_minutes == 5.0 and light.task == "regression"
    assert light.model_file.endswith("family=LightGBM/model.txt")
    refused = families["LGBMPkl"]
    assert not refused.loaded and "chmod go-w" in refused.refusal
    assert refused.format_name == "pickle"
    json.dumps(ret_1d.as_dict())  # printable by `inspect --json`


def test_describe_without_loading(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    described = loader.describe(load=False)
    assert all(not f.loaded for t in described for f in t.families)
    assert not loader._models


def test_close_forgets_models(run_root: Path) -> None:
    loader = ModelLoader(run_root)
    handler, _ = loader.load_model("ret_1d", "LightGBM")
    loader.close()
    assert loader.load_model("ret_1d", "LightGBM")[0] is not handler


def test_feature_count_must_match_the_booster(run_root: Path) -> None:
    mf.write_meta(fam(run_root, "LightGBM"), FEATURES[:2])
    (run_root / "manifest.json").unlink()
    reason = refusal(ModelLoader(run_root), "LightGBM")
    assert "booster expects 3 features, model_meta.json feature_list has 2" in reason


# --- microbench (handlers/microbench.py) rides on the same template run ---------------------


def test_microbench_rows(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from handlers import microbench

    os.chmod(fam(run_root, "LGBMPkl") / "model.pkl", 0o666)
    rows = microbench.bench_run(run_root, batch_size=50, min_time_s=0.005)
    by_family = {(r.target, r.family): r for r in rows}
    assert set(by_family) == {("ret_1d", f) for f in ("LGBMPkl", "LightGBM", "Linear")} | {
        ("ret_5d", "LightGBM")
    }
    assert "chmod go-w" in by_family["ret_1d", "LGBMPkl"].refusal
    light = by_family["ret_1d", "LightGBM"]
    assert light.format_name == "lightgbm" and light.single_us_per_row > 0
    assert 0 < light.batched_us_per_row < light.single_us_per_row
    # the pause itself is not timed: a median far below the pause's 3 ms
    assert 0 < light.single_after_pause_us < microbench.PAUSE_S * 1e6
    assert microbench.main([str(run_root), "--batch", "20", "--min-time", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "B=1 us/row" in out and "after pause" in out


def test_microbench_after_pause_times_calls_that_follow_a_pause() -> None:
    import time

    import numpy as np

    from handlers import microbench

    starts: list[float] = []
    durations = iter([0.004, 0.001, 0.002] * 10)

    def predict(batch: np.ndarray) -> np.ndarray:
        starts.append(time.perf_counter())
        time.sleep(next(durations))
        return batch

    us = microbench._us_after_pause(predict, np.zeros((1, 3), np.float32), min_time_s=0.0)
    assert len(starts) == 9  # the minimum number of calls when the time budget is spent
    gaps = np.diff(starts)
    # each call starts a whole pause after the previous call ended (its own 1-4 ms included)
    assert (gaps >= microbench.PAUSE_S + 0.001).all()
    # the median of the calls' own durations (3 x 4 ms, 3 x 1 ms, 3 x 2 ms): ~2 ms
    assert 1800 < us < 3500


def test_a_run_directory_this_user_cannot_list_is_one_line_and_a_config_error(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `<run_root>/targets` not readable by the daemon's user (a deploy with the wrong mode):
    # a 45-line traceback and exit 1, which systemd restarts in a loop. Now one line naming
    # the directory; `run` exits 2 (a restart cannot fix it). Root reads any directory, so
    # the refusal is made by patching the listing.
    from daemon.cli import main
    from daemon.model_setup import NoModelsError, build_engine
    from daemon.settings import load_settings

    real = Path.iterdir

    def refused(self: Path):  # type: ignore[no-untyped-def]
        if self.name == "targets":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    settings = load_settings(None, {"LIVEPRED_MODELS__RUN_ROOT": str(run_root)})
    with pytest.raises(NoModelsError, match=r"targets: cannot list it: Permission denied"):
        build_engine(settings)
    bars = tmp_path / "bars.csv"
    bars.write_text("symbol,ts,open,high,low,close,volume\nA,60000,1,1,1,1,1\n")
    for argv in (["inspect", str(run_root)],
                 ["replay", "--run", str(run_root), "--bars", str(bars), "--out",
                  str(tmp_path / "o.jsonl")]):
        assert main(argv) == 1
        err = said(capsys.readouterr().err)
        assert len(err) == 1 and "targets: cannot list it: Permission denied" in err[0], err
