"""`livepred replay` and `livepred inspect`: offline, same state and engine, no Redis."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from daemon.cli import main
from handlers.features import FeatureBuilder
from tests import model_factory as mf

FEATS = ["ret_1d", "ret_5d", "ret_10d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
MIN = 60_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replay-run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(FEATS)))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, X[:, 1] - X[:, 0], FEATS)
    mf.write_routing(root, "fwd", "LightGBM")
    mf.write_manifest(root, run_id="replay-test")
    return root


def make_bars(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(11)
    rows = []
    closes = {"AAA": 10.0, "BBB": 2500.0, "CCC": 0.01}
    for t in range(1, n + 1):
        for s in closes:
            closes[s] *= float(np.exp(rng.normal(0, 0.02)))
            rows.append((s, t * MIN, closes[s], closes[s], closes[s], closes[s], 100.0))
    frame = pd.DataFrame(rows, columns=["symbol", "ts", "open", "high", "low", "close", "volume"])
    # A duplicate, an out-of-order bar and an invalid one, which produce no line.
    bad = pd.DataFrame(
        [("AAA", n * MIN, 1.0, 1.0, 1.0, 1.0, 1.0), ("BBB", MIN, 1.0, 1.0, 1.0, 1.0, 1.0),
         ("CCC", (n + 1) * MIN, 1.0, 1.0, 1.0, -5.0, 1.0)],
        columns=frame.columns,
    )
    return pd.concat([frame, bad], ignore_index=True)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_replay_writes_one_line_per_accepted_bar_equal_to_the_reference(
    run_dir: Path, tmp_path: Path, suffix: str
) -> None:
    bars = make_bars()
    path = tmp_path / f"bars{suffix}"
    if suffix == ".csv":
        bars.to_csv(path, index=False)
    else:
        bars.to_parquet(path)
    out = tmp_path / "out.jsonl"
    code = main(["replay", "--run", str(run_dir), "--bars", str(path), "--out", str(out),
                 "--with-features"])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    good = bars.iloc[:-3]
    assert len(lines) == len(good)
    assert [x["src"] for x in lines] == [f"{path.name}/{i}" for i in range(len(good))]
    booster = lgb.Booster(model_file=str(mf.family_dir(run_dir, "fwd", "LightGBM") / "model.txt"))
    for symbol, g in good.groupby("symbol"):
        ref = FeatureBuilder(FEATS).build_frame(g.reset_index(drop=True))
        got = [x for x in lines if x["symbol"] == symbol]
        assert [x["ts"] for x in got] == g["ts"].tolist()
        for k, x in enumerate(got):
            assert x["run"] == "replay-test"
            for name in FEATS:
                want = ref[name].iloc[k]
                if np.isnan(want):
                    assert x["features"][name] is None
                else:
                    assert x["features"][name] == pytest.approx(want, rel=1e-6, abs=1e-9)
            row = ref.iloc[k : k + 1].to_numpy(np.float32)
            want_pred = float(booster.predict(row)[0])
            assert x["targets"]["fwd"]["preds"]["LightGBM"] == pytest.approx(want_pred, rel=1e-6)
            assert x["targets"]["fwd"]["pred"] == x["targets"]["fwd"]["preds"]["LightGBM"]


def test_a_parquet_with_datetime_bar_times_replays_like_epoch_milliseconds(
    run_dir: Path, tmp_path: Path
) -> None:
    # A training set's bar time is often a datetime column (naive = UTC, or with a zone).
    bars = make_bars(30)
    as_ms, as_time = tmp_path / "ms.parquet", tmp_path / "time.parquet"
    bars.to_parquet(as_ms)
    timed = bars.assign(ts=pd.to_datetime(bars["ts"], unit="ms"))
    timed.loc[5, "ts"] = pd.NaT  # a missing time: that row is rejected, the rest replayed
    timed.to_parquet(as_time)
    outs = []
    for path in (as_ms, as_time):
        out = tmp_path / f"{path.stem}.jsonl"
        assert main(["replay", "--run", str(run_dir), "--bars", str(path), "--out", str(out)]) == 0
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    by_ms = {x["src"].split("/")[1]: x for x in outs[0]}
    by_time = {x["src"].split("/")[1]: x for x in outs[1]}
    assert "5" not in by_time and set(by_time) < set(by_ms)
    for row, x in by_time.items():
        if x["symbol"] != bars.loc[5, "symbol"]:  # the missing bar changes its symbol's windows
            assert (x["ts"], x["targets"]) == (by_ms[row]["ts"], by_ms[row]["targets"])


def test_replay_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bars.csv"
    bad.write_text("symbol,ts,close\nA,1,1\n")
    code = main(["replay", "--run", str(run_dir), "--bars", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "missing column" in err[0] and "open" in err[0]
    code = main(["replay", "--run", str(tmp_path / "nope"), "--bars", str(bad),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1


def test_a_bad_cell_rejects_its_row_alone_and_the_reasons_are_reported(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    # A CSV's cells are checked one by one, like the flat fields of a stream entry: text in a
    # price column rejects that row (not the whole column), and the summary names each
    # reason with its count and its first row (as in `src`).
    bars = make_bars(30)
    text = bars.astype(object)
    text.loc[7, "close"] = "abc"
    text.loc[9, "volume"] = ""
    text.loc[11, "ts"] = "1.5"
    path = tmp_path / "bars.csv"
    text.to_csv(path, index=False)
    out = tmp_path / "out.jsonl"
    assert main(["replay", "--run", str(run_dir), "--bars", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    srcs = {json.loads(x)["src"] for x in out.read_text().splitlines()}
    for row in (7, 9, 11):
        assert f"bars.csv/{row}" not in srcs
    # Rows after them still predict; make_bars' three bad rows produce nothing either.
    assert {f"bars.csv/{row}" for row in (6, 8, 10, 12, 60)} <= srcs
    assert len(srcs) == len(bars) - 3 - 3
    assert "rejected bad_value:close: 2 row(s), the first bars.csv/7" in err  # + row 92
    assert "rejected missing_field:volume: 1 row(s), the first bars.csv/9" in err
    assert "rejected bad_value:ts: 1 row(s), the first bars.csv/11" in err
    assert "rejected out_of_order: 1 row(s)" in err


def test_replay_refuses_an_unwritable_output_and_a_run_without_models(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "bars.csv"
    make_bars(5).to_csv(path, index=False)
    code = main(["replay", "--run", str(run_dir), "--bars", str(path),
                 "--out", str(tmp_path / "no-such-dir" / "out.jsonl")])
    # (log lines of other tests' logging set-up aside: the error is one line)
    err = [line for line in capsys.readouterr().err.splitlines() if "livepred: error" in line]
    assert code != 0 and len(err) == 1 and "--out" in err[0] and "no-such-dir" in err[0]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    code = main(["replay", "--run", str(empty), "--bars", str(path),
                 "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "no model could be loaded" in err[-1]


def test_replay_refuses_a_model_of_another_bar_interval_as_the_daemon_does(
    tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, len(FEATS)))
    mf.write_lightgbm(tmp_path / "run", "fwd", "OneMin", X, X[:, 0], FEATS, interval_minutes=1)
    mf.write_lightgbm(tmp_path / "run", "fwd", "FiveMin", X, X[:, 0], FEATS, interval_minutes=5)
    path = tmp_path / "bars.csv"
    make_bars(5).to_csv(path, index=False)
    out = tmp_path / "out.jsonl"
    args = ["replay", "--run", str(tmp_path / "run"), "--bars", str(path), "--out", str(out)]
    assert main([*args, "--interval-minutes", "1"]) == 0
    assert "refused fwd/FiveMin" in capsys.readouterr().err
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first["targets"]["fwd"]["preds"]) == {"OneMin"}
    assert main(args) == 0  # no interval given: both served
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first["targets"]["fwd"]["preds"]) == {"OneMin", "FiveMin"}


def test_inspect_lists_families_and_refusals(
    run_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    # A fresh cache: the trees are compiled during this inspect, and nothing the compiler
    # prints may reach stdout, which holds the JSON.
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    broken = mf.family_dir(run, "fwd", "Pickled")
    mf.write_meta(broken, FEATS)
    (broken / "model.pkl").write_bytes(b"not a pickle")
    assert main(["inspect", str(run), "--json", "--no-pickle"]) == 0
    report = json.loads(capsys.readouterr().out)
    fams = report["targets"]["fwd"]["families"]
    assert fams["LightGBM"]["status"] == "loaded" and fams["LightGBM"]["handler"] == "lightgbm"
    assert fams["Pickled"]["status"] == "refused" and "allow_pickle" in fams["Pickled"]["reason"]
    assert report["targets"]["fwd"]["selected"] == "LightGBM"
    assert main(["inspect", str(run)]) == 0  # the rich table renders


def test_inspect_says_what_is_wrong_with_the_path_and_when_a_family_is_never_ready(
    run_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setenv("COLUMNS", "300")  # the table's cells on one line each

    assert main(["inspect", str(tmp_path / "nope")]) != 0
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) != 0
    assert "no targets/ directory" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 2)).astype(np.float32)
    mf.write_keras(run, "fwd", "MLP", X, X[:, 0], ["ret_1d", "momentum_7"], epochs=1)
    assert main(["inspect", str(run), "--json"]) == 0
    mlp = json.loads(capsys.readouterr().out)["targets"]["fwd"]["families"]["MLP"]
    assert mlp["unknown_features"] == ["momentum_7"] and mlp["bars_to_ready"] is None
    assert main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    assert "never (unknown feature)" in text and "always NaN: momentum_7" in text


def _copy_with_families(run_dir: Path, tmp_path: Path, **families: dict) -> Path:
    """A copy of the test run with more LightGBM families (name=meta extras)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, len(FEATS)))
    for family, extra in families.items():
        mf.write_lightgbm(run, "fwd", family, X, X[:, 0], FEATS, **extra)
    return run


def test_check_warns_when_the_selected_family_cannot_load(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_with_families(run_dir, tmp_path, Other={})
    selected = mf.family_dir(run, "fwd", "LightGBM") / "model.txt"
    selected.write_text(selected.read_text()[:2000])  # the routed family: cut short
    config = tmp_path / "livepred.toml"
    config.write_text(f'[models]\nrun_root = "{run}"\n[metrics]\nport = 0\n')
    assert main(["run", "--config", str(config), "--check", "--offline"]) == 0  # Other serves
    err = capsys.readouterr().err
    assert "refused fwd/LightGBM" in err
    assert "warning: fwd: its selected family LightGBM" in err and "`pred` will be null" in err
    # inspect and replay say it too.
    assert main(["inspect", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == [
        "fwd: its selected family LightGBM (routing_decision.json) is not loaded: every"
        " output's `pred` will be null"
    ]
    assert main(["inspect", str(run)]) == 0
    assert "its selected family LightGBM" in capsys.readouterr().out
    bars = tmp_path / "bars.csv"
    make_bars(5).to_csv(bars, index=False)
    assert main(["replay", "--run", str(run), "--bars", str(bars),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "refused fwd/LightGBM" in err and "its selected family LightGBM" in err


def test_inspect_with_the_daemons_config_shows_what_the_daemon_would_load(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_with_families(run_dir, tmp_path, Hourly={"interval_minutes": 60}, Other={})
    config = tmp_path / "livepred.toml"
    config.write_text(
        f'[models]\nrun_root = "{run}"\ninterval_minutes = 5\n'
        'families = ["LightGBM", "Hourly"]\ncompile_trees = false\n'
    )
    assert main(["inspect", "--config", str(config), "--json"]) == 0
    fams = json.loads(capsys.readouterr().out)["targets"]["fwd"]["families"]
    assert set(fams) == {"LightGBM", "Hourly"}  # Other: not in models.families
    assert fams["Hourly"]["status"] == "refused" and "interval" in fams["Hourly"]["reason"]
    assert fams["LightGBM"]["status"] == "loaded" and fams["LightGBM"]["compiled"] is False
    # A run given as well replaces run_root; the rest of the config still applies.
    assert main(["inspect", str(run_dir), "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_root"] == str(run_dir)
    assert set(report["targets"]["fwd"]["families"]) == {"LightGBM"}
    assert main(["inspect"]) == 2
    assert "--config" in capsys.readouterr().err
    # Nothing the daemon would load: it would not start, and inspect says so.
    config.write_text(f'[models]\nrun_root = "{run}"\nview = "INDIVIDUAL"\n')
    assert main(["inspect", "--config", str(config)]) == 2
    assert "no view=INDIVIDUAL directory" in capsys.readouterr().err


def test_no_model_found_says_what_the_run_has(run_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "livepred.toml"
    config.write_text(f'[models]\nrun_root = "{run_dir}"\nview = "SYMBOL"\n')
    assert main(["run", "--config", str(config), "--check", "--offline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no view=SYMBOL directory (models.view); views present: CROSS_SECTIONAL" in err[0]
    config.write_text(f'[models]\nrun_root = "{run_dir}"\nfamilies = ["lightgbm"]\n')
    assert main(["run", "--config", str(config), "--check", "--offline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "the run has targets fwd and families LightGBM in view CROSS_SECTIONAL" in err[-1]
    path = tmp_path / "bars.csv"
    make_bars(5).to_csv(path, index=False)
    assert main(["replay", "--run", str(run_dir), "--bars", str(path), "--view", "SYMBOL",
                 "--out", str(tmp_path / "out.jsonl")]) != 0
    assert "views present: CROSS_SECTIONAL" in capsys.readouterr().err


def test_offline_without_check_is_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "livepred.toml"
    config.write_text(f'[models]\nrun_root = "{run_dir}"\n')
    assert main(["run", "--config", str(config), "--offline"]) == 2
    assert "--offline only goes with --check" in capsys.readouterr().err


def test_inspect_into_a_pipe_closed_early_ends_without_a_traceback(run_dir: Path) -> None:
    import subprocess
    import sys

    # `true` leaves at once, long before inspect writes: every write finds the pipe closed.
    done = subprocess.run(
        f"'{sys.executable}' -m daemon.cli inspect '{run_dir}' --json | true",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
