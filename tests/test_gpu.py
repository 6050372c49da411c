"""`models.device = "cuda"`: torch models (TorchScript, `torch.export`, a pickled module) run
on the GPU through the engine's batch path and through the real `livepred run`, and agree with
the same models on the CPU.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine with a Redis on
127.0.0.1:6379: `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FEATS = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
T = 8
TARGET = "fwd"
# Float32 on both (livepred turns cuDNN's TF32 off): GPU and CPU agree to float32 rounding
# (kernels sum in another order, and by batch size), not to the last bit.
REL, ABS = 1e-4, 1e-5


def _torch_families(root: Path, X: np.ndarray, y: np.ndarray, features: list[str]) -> Path:
    """MLP and LSTM as TorchScript, an LSTM as a torch.export program, a pickled MLP and
    LSTM."""
    from tests import model_factory as mf

    windows = np.stack([X[i - T + 1 : i + 1] for i in range(T - 1, len(X))])
    targets = y[T - 1 :]
    mf.write_torchscript(root, TARGET, "MLP", X, y, features, epochs=5)
    mf.write_torchscript(root, TARGET, "LSTM", windows, targets, features, epochs=5)
    mf.write_torch_export(root, TARGET, "ExportLSTM", windows, targets, features, epochs=5)
    mf.write_torch_pickle(root, TARGET, "PickledMLP", X, y, features, epochs=5)
    mf.write_torch_pickle(root, TARGET, "PickledLSTM", windows, targets, features, epochs=5)
    mf.write_routing(root, TARGET, "LSTM")
    mf.write_manifest(root, run_id="gpu-run")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, len(FEATS))).astype(np.float32)
    return _torch_families(tmp_path_factory.mktemp("gpu-run"), X, X[:, 0], FEATS)


def test_cuda_engine_matches_cpu_and_runs_on_the_gpu(
    run: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from daemon.state import SymbolTable
    from handlers.engine import InferenceEngine
    from handlers.run import ModelLoader

    cpu = InferenceEngine(ModelLoader(run, device="cpu"), device="cpu").load_all()
    gpu = InferenceEngine(ModelLoader(run, device="cuda"), device="cuda").load_all()
    families = ["ExportLSTM", "LSTM", "MLP", "PickledLSTM", "PickledMLP"]
    assert not gpu.load_errors and sorted(gpu.models[TARGET]) == families
    assert {f.family: f.device for f in gpu.families()} == dict.fromkeys(families, "cuda")
    assert {f.family: f.device for f in cpu.families()} == dict.fromkeys(families, "cpu")
    tables = [SymbolTable(e.input_spec, ttl_s=10**6) for e in (cpu, gpu)]
    compared = dict.fromkeys(families, 0)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        _compare(tables, cpu, gpu, compared)
    # cuDNN warns at every call (on stderr, from TorchScript) when an RNN's weights are not
    # one buffer: a journal line per batch. They are laid out at load.
    said = capfd.readouterr().err + "".join(str(w.message) for w in raised)
    assert "contiguous chunk" not in said, said[:500]
    # 300 symbols x 40 bars: the MLPs from bar 20 (bb_position needs 20), the LSTMs 7 later.
    assert compared == {"MLP": 300 * 21, "PickledMLP": 300 * 21, "LSTM": 300 * 14,
                        "ExportLSTM": 300 * 14, "PickledLSTM": 300 * 14}
    laid_out = {f.family: f.model.rnns_laid_out for f in gpu.families()}
    assert laid_out == {"ExportLSTM": 1, "LSTM": 1, "MLP": 0, "PickledLSTM": 1, "PickledMLP": 0}
    assert torch.cuda.max_memory_allocated() > 0


def _compare(tables: list, cpu: object, gpu: object, compared: dict[str, int]) -> None:
    from daemon.wire import Bar

    rng = np.random.default_rng(1)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (40, 300)), axis=0))
    for t in range(40):
        bars = [Bar(f"S{i}", (t + 1) * 60_000, c, c, c, c, 1.0, "bars", f"{t}-{i}")
                for i, c in enumerate(closes[t].tolist())]
        rows = []
        for table, engine in zip(tables, (cpu, gpu), strict=True):
            applied = table.apply(bars)
            assert applied.inputs is not None
            rows.append(engine.predict_batch(applied.inputs).rows())
        for a, b in zip(*rows, strict=True):
            assert a[TARGET]["warming"] == b[TARGET]["warming"]
            assert not a[TARGET]["failed"] and not b[TARGET]["failed"]
            assert set(a[TARGET]["preds"]) == set(b[TARGET]["preds"])
            for fam, value in a[TARGET]["preds"].items():
                assert b[TARGET]["preds"][fam] == pytest.approx(value, rel=REL, abs=ABS)
                compared[fam] += 1


# ---- the real daemon ------------------------------------------------------------------------


def _expected_on_the_cpu(run: Path, frames: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """Each family's own module on the CPU over the pandas reference features: one row (MLPs)
    or the last T rows (LSTMs), once every input is finite."""
    from tests import model_factory as mf

    def family(name: str) -> Path:
        return mf.family_dir(run, TARGET, name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = {
            "MLP": torch.jit.load(str(family("MLP") / "model.pt")),
            "PickledMLP": torch.load(family("PickledMLP") / "model.pkl", weights_only=False),
            "LSTM": torch.jit.load(str(family("LSTM") / "model.pt")),
            "ExportLSTM": torch.export.load(str(family("ExportLSTM") / "model.pt2")).module(),
            "PickledLSTM": torch.load(family("PickledLSTM") / "model.pkl", weights_only=False),
        }
    out: dict[str, dict] = {name: {} for name in modules}
    for name, f in frames.items():
        x = f.to_numpy(dtype=np.float64).astype(np.float32)
        rows = {"MLP": 1, "PickledMLP": 1}
        for fam, module in modules.items():
            length = rows.get(fam, T)
            windows = np.stack([x[i - length + 1 : i + 1] for i in range(length - 1, len(x))])
            ready = np.isfinite(windows).all(axis=(1, 2))
            inputs = windows[ready] if length > 1 else windows[ready][:, 0]
            with torch.inference_mode():
                preds = module(torch.from_numpy(inputs)).numpy().reshape(-1)
            stamps = f.index[length - 1 :][ready]
            out[fam].update({(name, int(ts)): float(p)
                             for ts, p in zip(stamps, preds, strict=True)})
    return out


def _gpu_processes() -> set[int] | None:
    """Pids nvidia-smi lists as using the GPU (None: it cannot tell here)."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30,
    )
    if done.returncode != 0:
        return None
    return {int(line) for line in done.stdout.split() if line.strip().isdigit()}


@pytest.mark.e2e
@pytest.mark.redis
def test_the_daemon_serves_torch_models_on_the_gpu(
    tmp_path_factory: pytest.TempPathFactory, key_prefix: str, real_redis_url: str, tmp_path: Path
) -> None:
    import redis

    from tests import daemon_harness as h

    X, y = h.training_frame()
    finite = np.isfinite(X).all(axis=1)
    run = _torch_families(tmp_path_factory.mktemp("gpu-daemon-run"), X[finite], y[finite],
                          h.FEATURES)
    keys = h.Keys(key_prefix)
    client = redis.Redis.from_url(real_redis_url)
    h.create_group(client, keys)
    config = h.write_config(tmp_path / "livepred.toml", keys=keys, redis_url=real_redis_url,
                            run_root=run, models={"device": "cuda"}, streams={"batch": 256})
    bars = h.walk_bars(h.symbols(40), 100, seed=7)  # 4000 bars
    # The pickled module's class lives in the tests package: the daemon must import it.
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = h.daemon_env(PYTHONPATH=os.pathsep.join(p for p in path if p))
    with h.Daemon(config, tmp_path / "daemon.log", env=env) as daemon:
        daemon.start()
        daemon.wait_serving(timeout_s=180)
        feeder = h.Feeder(real_redis_url, keys.input, [h.bar_fields(b) for b in bars], 2000)
        feeder.start()
        feeder.finish(120)
        h.wait_settled(lambda: client.xlen(keys.output), len(bars), quiet_s=30, timeout_s=180,
                       check=daemon.check_alive)
        on_gpu = _gpu_processes()
        assert daemon.stop() == 0, daemon.log_tail()

    assert "contiguous chunk" not in daemon.log_text()  # cuDNN's per-call warning, see above
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    loaded = {e["family"]: e.get("device") for e in lines if e.get("event") == "model loaded"}
    families = ["ExportLSTM", "LSTM", "MLP", "PickledLSTM", "PickledMLP"]
    assert loaded == dict.fromkeys(families, "cuda"), loaded
    if on_gpu:  # where nvidia-smi lists processes, the daemon is among them
        assert daemon.pid in on_gpu, (daemon.pid, on_gpu)
    events = h.read_outputs(client, keys.output)
    assert len(events) == len(bars)
    assert client.xlen(keys.dead) == 0
    assert h.pending_count(client, keys) == 0
    expected = _expected_on_the_cpu(run, h.feature_frames(bars))
    compared = h.assert_outputs_match(
        events, expected, target=TARGET, rel=dict.fromkeys(families, REL),
        abs_=dict.fromkeys(families, ABS),
    )
    # 40 symbols x 100 bars: the MLPs from bar 20 (81 bars each), the LSTMs from bar 27.
    assert compared == {"MLP": 40 * 81, "PickledMLP": 40 * 81, "LSTM": 40 * 74,
                        "ExportLSTM": 40 * 74, "PickledLSTM": 40 * 74}
    for e in events:
        assert not e.targets[TARGET].failed
        assert e.targets[TARGET].pred == e.targets[TARGET].preds.get("LSTM")
    client.close()
