"""What the README and `examples/` show a new user runs: the scripts start, every Python
snippet compiles and its imports resolve, the skew-check snippet computes, and the CSV feeder
publishes timestamps as they are in the file."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import redis

from daemon.cli import main
from handlers.features import FeatureBuilder
from tests import model_factory as mf

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.md"))]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
FEATS = ["ret_1d", "vol_10d", "rsi_14"]


def _python_blocks(path: Path) -> list[str]:
    """```python fences, and `python - <<'PY'` heredocs inside shell fences."""
    text = path.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    blocks += re.findall(r"python - <<'PY'\n(.*?)\nPY\n", text, flags=re.S)
    return blocks


def _snippets() -> list[tuple[str, str]]:
    return [(f"{p.name}#{i}", code) for p in DOCS for i, code in enumerate(_python_blocks(p))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_example_script_starts(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_docs_have_python_snippets() -> None:
    names = [name for name, _ in _snippets()]
    assert any(n.startswith("README.md") for n in names)
    assert any(n.startswith("redis_cli.md") for n in names)


@pytest.mark.parametrize(("name", "code"), _snippets(), ids=[n for n, _ in _snippets()])
def test_every_snippet_compiles_and_its_imports_resolve(name: str, code: str) -> None:
    tree = ast.parse(code, filename=name)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    exec(compile(ast.Module(body=imports, type_ignores=[]), name, "exec"), {})


def test_the_readme_skew_check_runs_and_finds_no_skew(tmp_path: Path, monkeypatch) -> None:
    # The README's snippet, run as written on replay's output and a training-side feature
    # file computed with pandas (FeatureBuilder's frame): it prints each feature's largest
    # difference, all tiny.
    (code,) = [c for c in _python_blocks(ROOT / "README.md") if "training_features" in c]
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(FEATS)))
    mf.write_lightgbm(run, "fwd", "LightGBM", X, X[:, 0], FEATS)
    rows = []
    for symbol, close in (("AAA", 10.0), ("BBB", 3000.0)):
        for t in range(1, 80):
            close *= float(np.exp(rng.normal(0, 0.01)))
            rows.append((symbol, t * 60_000, close, close, close, close, 1.0))
    bars = pd.DataFrame(rows, columns=["symbol", "ts", "open", "high", "low", "close", "volume"])
    bars = bars.sort_values("ts", kind="stable")  # arrival order: symbols interleaved in time
    bars.to_parquet(tmp_path / "bars.parquet")
    train = pd.concat(
        FeatureBuilder(FEATS)
        .build_frame(g.reset_index(drop=True))
        .assign(symbol=symbol, ts=g["ts"].to_numpy())
        for symbol, g in bars.groupby("symbol")
    )
    train.to_parquet(tmp_path / "training_features.parquet")
    assert main(["replay", "--run", str(run), "--bars", str(tmp_path / "bars.parquet"),
                 "--out", str(tmp_path / "preds.jsonl"), "--with-features"]) == 0
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue().split("\n")
    got = {line.split()[0]: float(line.split()[1]) for line in lines if line.strip()}
    assert set(got) == set(FEATS)
    assert all(v < 1e-9 for v in got.values()), got


def test_the_csv_feeder_sends_epoch_ms_as_they_are(
    tmp_path: Path, real_redis_url: str, key_prefix: str
) -> None:
    # A ts column that reads as float (an empty cell makes it so) is epoch milliseconds, not
    # nanoseconds; the row without a ts is reported and skipped, the others are sent.
    path = tmp_path / "bars.csv"
    path.write_text(
        "symbol,ts,open,high,low,close,volume\n"
        "AAA,1700000060000,1,1,1,1,5\n"
        "AAA,,1,1,1,1,5\n"
        "AAA,1700000180000.0,2,2,2,2,5\n"
        "0700,1700000180000,3,3,3,3,oops\n"  # one bad cell: its row only
        "0700,1700000240000,4,4,4,4,5\n"  # a numeric-looking symbol stays text
    )
    stream = f"{key_prefix}bars"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "feed_csv.py"), str(path),
         "--redis-url", real_redis_url, "--stream", stream],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "row 1: skipped" in done.stderr and "row 3: skipped" in done.stderr
    client = redis.Redis.from_url(real_redis_url)
    try:
        sent = [msgpack.unpackb(f[b"data"]) for _, f in client.xrange(stream)]
    finally:
        client.close()
    assert [(b["symbol"], b["ts"], b["close"]) for b in sent] == [
        ("AAA", 1700000060000, 1.0), ("AAA", 1700000180000, 2.0), ("0700", 1700000240000, 4.0),
    ]
