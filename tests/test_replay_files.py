"""`livepred replay` and the files people actually have: ragged and compressed CSVs, typed
parquet columns, files sorted the wrong way or stamped in seconds, an output that must never
replace the input or look finished when it is not, and the daemon's own config."""

from __future__ import annotations

import decimal
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daemon import bars_file
from daemon.cli import main
from tests import model_factory as mf

FEATS = ["ret_1d", "ret_5d", "vol_10d", "rsi_14"]
MIN = 60_000
T0 = 1_700_000_000_000
COLUMNS = ["symbol", "ts", "open", "high", "low", "close", "volume"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replay-files-run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(FEATS)))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, X[:, 1] - X[:, 0], FEATS)
    mf.write_manifest(root, run_id="files")
    return root


def bars(n: int = 30, symbols: tuple[str, ...] = ("AAA", "BBB", "CCC"), seed: int = 3,
         t0: int = T0, step: int = MIN) -> pd.DataFrame:
    """Interleaved by time: minute t of every symbol, then minute t + 1."""
    rng = np.random.default_rng(seed)
    closes = dict.fromkeys(symbols, 50.0)
    rows = []
    for t in range(1, n + 1):
        for s in symbols:
            closes[s] *= float(np.exp(rng.normal(0, 0.02)))
            c = closes[s]
            rows.append((s, t0 + t * step, c, c * 1.01, c * 0.99, c, 100.0 + t))
    return pd.DataFrame(rows, columns=COLUMNS)


def said(err: str) -> list[str]:
    """The command's own lines on stderr: not the JSON log lines of a logging set up by an
    earlier test in the same process."""
    return [line for line in err.strip().splitlines() if not line.startswith("{")]


def replay(run: Path, path: Path, out: Path, *extra: str) -> int:
    return main(["replay", "--run", str(run), "--bars", str(path), "--out", str(out), *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def by_src_row(docs: list[dict]) -> dict[int, tuple]:
    return {int(d["src"].rsplit("/", 1)[1]): (d["symbol"], d["ts"], d["targets"]) for d in docs}


# ---- CSV --------------------------------------------------------------------------------


def test_a_row_with_more_cells_than_the_header_is_an_error_naming_it(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pandas took the extra cells for an index and shifted every column: the row was
    # replayed as symbol "1", ts 1. Now the file is refused, naming the row.
    path = tmp_path / "ragged.csv"
    frame = bars(5)
    text = frame.to_csv(index=False).splitlines()
    text[3] += ",9,9"
    path.write_text("\n".join(text) + "\n")
    out = tmp_path / "out.jsonl"
    assert replay(run_dir, path, out) == 1
    err = said(capsys.readouterr().err)
    assert err[-1].startswith("livepred: error: ") and "row 2 (line 4)" in err[-1], err
    assert "not written" in err[-1] and not out.exists()


@pytest.mark.parametrize("edit", ["trailing delimiter", "blank lines before the header"])
def test_a_csv_written_otherwise_reads_like_the_plain_one(
    run_dir: Path, tmp_path: Path, edit: str
) -> None:
    # A delimiter ending every line, or blank lines before the header (they shifted every
    # row's `src` by one: the header became row 0, rejected): the same rows, numbered alike.
    frame = bars(25)
    plain, edited = tmp_path / "plain.csv", tmp_path / "edited.csv"
    frame.to_csv(plain, index=False)
    text = frame.to_csv(index=False)
    edited.write_text("".join(line + ",\n" for line in text.splitlines())
                      if edit == "trailing delimiter" else "\n\n" + text)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert replay(run_dir, plain, outs[0]) == 0 and replay(run_dir, edited, outs[1]) == 0
    assert by_src_row(lines(outs[1])) == by_src_row(lines(outs[0]))
    assert sorted(by_src_row(lines(outs[1]))) == list(range(len(frame)))


def test_a_compressed_csv_and_rows_across_read_chunks(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read a chunk at a time: row numbers (`src`) and state carry across chunk boundaries.
    frame = bars(40)
    plain, packed = tmp_path / "bars.csv", tmp_path / "bars.csv.gz"
    frame.to_csv(plain, index=False)
    frame.to_csv(packed, index=False, compression="gzip")
    whole = tmp_path / "whole.jsonl"
    assert replay(run_dir, plain, whole) == 0
    monkeypatch.setattr(bars_file, "READ_ROWS", 7)
    chunked = tmp_path / "chunked.jsonl"
    assert replay(run_dir, packed, chunked) == 0
    assert by_src_row(lines(whole)) == by_src_row(lines(chunked))
    assert sorted(by_src_row(lines(chunked))) == list(range(len(frame)))


# ---- parquet ----------------------------------------------------------------------------


def test_typed_parquet_columns_are_read_as_their_values(run_dir: Path, tmp_path: Path) -> None:
    # Decimal prices, a nullable integer ts with a gap, ts as text and symbol/ts saved as the
    # index: each either replays as the plain file does or rejects its own row, never a
    # traceback.
    frame = bars(25)
    plain = tmp_path / "plain.parquet"
    frame.to_parquet(plain)
    want = tmp_path / "plain.jsonl"
    assert replay(run_dir, plain, want) == 0
    expected = by_src_row(lines(want))

    table = pa.Table.from_pandas(frame, preserve_index=False)
    decimals = table.set_column(
        table.schema.get_field_index("close"), "close",
        pa.array([decimal.Decimal(repr(v)) for v in frame["close"]], pa.decimal128(38, 18)),
    )
    cases = {"decimal.parquet": decimals}
    nullable = frame.astype({"ts": "Int64"})
    nullable.loc[4, "ts"] = pd.NA
    cases["nullable.parquet"] = pa.Table.from_pandas(nullable, preserve_index=False)
    cases["text_ts.parquet"] = pa.Table.from_pandas(frame.astype({"ts": str}),
                                                    preserve_index=False)
    cases["indexed.parquet"] = pa.Table.from_pandas(frame.set_index(["symbol", "ts"]))
    for name, tab in cases.items():
        path, out = tmp_path / name, tmp_path / f"{name}.jsonl"
        pq.write_table(tab, path)
        assert replay(run_dir, path, out) == 0, name
        got = by_src_row(lines(out))
        if name == "nullable.parquet":  # row 4 rejected, its symbol's windows change
            assert 4 not in got
            other = {r: v for r, v in got.items() if v[0] != frame.loc[4, "symbol"]}
            assert other and all(expected[r] == v for r, v in other.items())
        elif name == "decimal.parquet":  # Decimal(repr(x)) is x again as a float
            assert got == expected
        else:
            assert got == expected, name


def test_a_date_column_and_duplicate_columns_are_said_in_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = bars(5)
    dated = frame.assign(ts=pd.to_datetime(frame["ts"], unit="ms").dt.date)
    path = tmp_path / "dated.parquet"
    pq.write_table(pa.Table.from_pandas(dated, preserve_index=False), path)
    assert replay(run_dir, path, tmp_path / "o.jsonl") == 1
    err = capsys.readouterr().err
    assert "rejected bad_value:ts: 15 row(s)" in err and "no row of" in err
    assert "Traceback" not in err

    both = frame.assign(Close=frame["close"])
    path = tmp_path / "both.parquet"
    both.to_parquet(path)
    assert replay(run_dir, path, tmp_path / "o2.jsonl") == 1
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and "columns 'close' and 'Close' are both close" in err[0]


# ---- what replay saw --------------------------------------------------------------------


def test_a_file_sorted_by_symbol_is_warned_about_with_its_resets(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon takes bars in arrival order and evicts symbols older than the newest bar
    # minus the TTL: a training frame sorted by (symbol, ts) replays with its state dropped.
    frame = bars(40).sort_values(["symbol", "ts"], kind="stable")
    path = tmp_path / "sorted.csv"
    frame.to_csv(path, index=False)
    assert replay(run_dir, path, tmp_path / "o.jsonl") == 0
    err = capsys.readouterr().err
    assert "symbol(s) evicted as stale" in err
    assert "row(s) came more than the TTL (900 s) behind the newest bar before them" in err
    assert "the first sorted.csv/40" in err  # BBB's first bar, 39 minutes behind AAA's last

    interleaved = tmp_path / "interleaved.csv"
    bars(40).to_csv(interleaved, index=False)
    assert replay(run_dir, interleaved, tmp_path / "o2.jsonl") == 0
    err = capsys.readouterr().err
    assert "behind" not in err and "evicted" not in err and "warning" not in err


@pytest.mark.parametrize(("scale", "unit"), [(1e-3, "seconds"), (1e6, "microseconds")])
def test_bar_times_in_another_unit_are_warned_about(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], scale: float, unit: str
) -> None:
    frame = bars(5)
    frame["ts"] = (frame["ts"].astype("float64") * scale).astype("int64")
    path = tmp_path / "scaled.parquet"
    frame.to_parquet(path)
    assert replay(run_dir, path, tmp_path / "o.jsonl") == 0
    assert f"epoch {unit}" in capsys.readouterr().err


# ---- the output file --------------------------------------------------------------------


def test_the_output_never_replaces_the_bars_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bars.csv"
    bars(5).to_csv(path, index=False)
    before = path.read_bytes()
    (tmp_path / "link.csv").symlink_to(path)
    for out in (path, tmp_path / "link.csv"):
        assert replay(run_dir, path, out) == 2
        assert "is the bars file itself" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_failed_replay_leaves_the_previous_output_as_it_was(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    # Written beside and renamed when complete: an interruption (Ctrl-C) or a bad line far
    # down the file leaves no half file that looks finished, and the old one untouched.
    path = tmp_path / "bars.csv"
    text = bars(30).to_csv(index=False).splitlines()
    text[80] += ",x,y"
    path.write_text("\n".join(text) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    monkeypatch.setattr(bars_file, "READ_ROWS", 16)  # the bad line is in a later chunk
    assert replay(run_dir, path, out) == 1
    assert "row 79 (line 81)" in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    good = tmp_path / "good.csv"
    bars(30).to_csv(good, index=False)
    calls = 0

    def interrupted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    from daemon import pipeline

    real = pipeline.Pipeline.process
    monkeypatch.setattr(pipeline.Pipeline, "process", interrupted)
    monkeypatch.setattr("daemon.replay.CHUNK_ROWS", 10)
    assert replay(run_dir, good, out) == 130
    assert "interrupted: --out" in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_out_dash_writes_to_stdout(run_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bars.csv"
    bars(5).to_csv(path, index=False)
    assert main(["replay", "--run", str(run_dir), "--bars", str(path), "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 15 and not (tmp_path / "-").exists()
    assert "-> -" in captured.err


def test_every_row_rejected_is_a_failure(run_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    frame = bars(5).astype({"ts": str})
    frame["ts"] = pd.to_datetime(bars(5)["ts"], unit="ms").astype(str)  # ISO text
    path = tmp_path / "iso.csv"
    frame.to_csv(path, index=False)
    assert replay(run_dir, path, tmp_path / "o.jsonl") == 1
    err = capsys.readouterr().err
    assert "rejected bad_value:ts: 15 row(s), the first iso.csv/0" in err
    assert "no row of" in err


# ---- options and the daemon's config ----------------------------------------------------


@pytest.mark.parametrize("ttl", ["0", "-5", "nan", "inf"])
def test_a_bad_ttl_is_one_line(run_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    path = tmp_path / "bars.csv"
    bars(3).to_csv(path, index=False)
    assert replay(run_dir, path, tmp_path / "o.jsonl", "--ttl-s", ttl) == 2
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and "--ttl-s must be a number of seconds >= 1" in err[0]


def test_the_daemons_config_gives_the_run_the_ttl_and_the_families(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bars 10 minutes apart: a daemon configured with a 5-minute TTL resets every symbol
    # on every bar (features never fill); replay with its config must do the same.
    frame = bars(30, step=10 * MIN)
    path = tmp_path / "bars.csv"
    frame.to_csv(path, index=False)
    config = tmp_path / "livepred.toml"
    config.write_text(f'[models]\nrun_root = "{run_dir}"\nfamilies = ["LightGBM"]\n'
                      "[state]\nsymbol_ttl_s = 300\n")
    short, default = tmp_path / "short.jsonl", tmp_path / "default.jsonl"
    assert main(["replay", "-c", str(config), "--bars", str(path), "--out", str(short),
                 "--with-features"]) == 0
    assert "reset(s) of a symbol after a gap over the TTL (300 s)" in capsys.readouterr().err
    assert all(d["features"]["ret_1d"] is None for d in lines(short))
    assert main(["replay", "-c", str(config), "--bars", str(path), "--out", str(default),
                 "--with-features", "--ttl-s", "900"]) == 0  # an option wins over the config
    assert sum(d["features"]["ret_1d"] is not None for d in lines(default)) == 3 * 29

    config.write_text(f'[models]\nrun_root = "{run_dir}"\nfamilies = ["NoSuchFamily"]\n')
    # as `inspect` and `run` say it: a configuration error (exit 2)
    assert main(["replay", "-c", str(config), "--bars", str(path), "--out", str(short)]) == 2
    assert "no model could be loaded" in capsys.readouterr().err


def test_inspect_of_a_view_with_nothing_says_so_and_fails(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(run_dir), "--view", "NOPE"]) == 2
    err = capsys.readouterr().err
    assert "no model could be loaded" in err and "CROSS_SECTIONAL" in err


def test_an_output_link_is_written_whole_beside_its_file(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--out latest.jsonl` a link to the real file: replaced whole through the link (which
    # stays a link), and left as it was when the replay fails.
    good = tmp_path / "good.csv"
    bars(20).to_csv(good, index=False)
    real = tmp_path / "real.jsonl"
    real.write_text("previous\n")
    real.chmod(0o640)
    link = tmp_path / "latest.jsonl"
    link.symlink_to(real)
    assert replay(run_dir, good, link) == 0
    assert link.is_symlink() and len(lines(real)) == 60 and real.stat().st_mode & 0o777 == 0o640
    ragged = tmp_path / "ragged.csv"
    text = bars(30).to_csv(index=False).splitlines()
    text[70] += ",x"
    ragged.write_text("\n".join(text) + "\n")
    monkeypatch.setattr(bars_file, "READ_ROWS", 16)
    before = real.read_text()
    assert replay(run_dir, ragged, link) == 1
    assert "(--out" in capsys.readouterr().err and real.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_odd_output_paths(run_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    # A loop of links: one line, nothing replaced. A name near the 255-byte limit: its
    # partial file's name must still fit. A dangling link: its file made.
    path = tmp_path / "bars.csv"
    bars(5).to_csv(path, index=False)
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    assert replay(run_dir, path, tmp_path / "loop1") == 1
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and "symbolic links" in err[0], err
    assert (tmp_path / "loop1").is_symlink()
    long = tmp_path / ("x" * 245 + ".jsonl")
    assert replay(run_dir, path, long) == 0 and len(lines(long)) == 15
    (tmp_path / "dangling").symlink_to("made.jsonl")
    assert replay(run_dir, path, tmp_path / "dangling") == 0
    assert (tmp_path / "dangling").is_symlink() and len(lines(tmp_path / "made.jsonl")) == 15


# ---- review fixes: planted partial names, stdout, far datetimes, signals, headers --------


def test_a_link_planted_at_the_partial_files_name_is_never_written_through(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a folder others can write, someone could put a link where replay makes its partial
    # file: replay must make a file of its own (O_EXCL), never write the link's file nor
    # rename the link onto --out. The names are planted both as they once were (predictable)
    # and as the first random one.
    import hashlib
    import os
    import secrets

    path = tmp_path / "bars.csv"
    bars(5).to_csv(path, index=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = shared / "out.jsonl"
    tag = hashlib.sha256(out.name.encode()).hexdigest()[:12]
    tokens, real_token_hex = iter(["planted0"]), secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex",
                        lambda nbytes=None: next(tokens, None) or real_token_hex(nbytes))
    for name in (f".livepred-{tag}-{os.getpid()}.partial",
                 f".livepred-{tag}-{os.getpid()}-planted0.partial"):
        (shared / name).symlink_to(victim)
    umask = os.umask(0o027)
    try:
        assert replay(run_dir, path, out) == 0
    finally:
        os.umask(umask)
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and len(lines(out)) == 15
    assert out.stat().st_mode & 0o777 == 0o640  # a new file: 0o666 less the umask
    assert sorted(p.name for p in shared.iterdir() if "partial" in p.name and
                  not p.is_symlink()) == []


@pytest.mark.skipif(not Path("/dev/stdout").exists(), reason="no /dev/stdout")
def test_out_dev_stdout_writes_into_a_pipe_and_appends_to_an_appended_log(
    run_dir: Path, tmp_path: Path
) -> None:
    # /dev/stdout is a link into /proc: followed, a pipe's name does not exist (the write
    # failed) and a regular file's was replaced whole (`>> app.log` lost the log).
    import subprocess
    import sys

    path = tmp_path / "bars.csv"
    bars(5).to_csv(path, index=False)
    command = [sys.executable, "-m", "daemon.cli", "replay", "--run", str(run_dir),
               "--bars", str(path), "--out", "/dev/stdout"]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == 15 and "Traceback" not in piped.stderr
    log = tmp_path / "app.log"
    log.write_text("previous\n")
    with log.open("a") as appended:
        done = subprocess.run(command, stdout=appended, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    text = log.read_text().splitlines()
    assert text[0] == "previous" and len(text) == 16
    assert [json.loads(x)["src"] for x in text[1:]] == [f"bars.csv/{i}" for i in range(15)]


def test_datetimes_past_2262_and_undecodable_binary_symbols_are_values_not_tracebacks(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pandas' nanoseconds end in 2262: a timestamp[s] column in 2500 raised OutOfBoundsDatetime.
    # A binary symbol that is not UTF-8 raised in msgpack: now its row is rejected, as the
    # daemon rejects a flat-field symbol that is not UTF-8.
    frame = bars(5)
    seconds = frame["ts"].to_numpy() // 1000 + 16_000_000_000  # some 500 years on
    table = pa.Table.from_pandas(frame, preserve_index=False)
    far = table.set_column(table.schema.get_field_index("ts"), "ts",
                           pa.array(seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC")))
    path = tmp_path / "far.parquet"
    pq.write_table(far, path)
    out = tmp_path / "far.jsonl"
    assert replay(run_dir, path, out) == 0
    assert [d["ts"] for d in lines(out)] == (seconds * 1000).tolist()

    symbols = [s.encode() for s in frame["symbol"]]
    symbols[4] = b"\xff\xfe"
    odd = far.set_column(far.schema.get_field_index("symbol"), "symbol",
                         pa.array(symbols, pa.binary())).replace_schema_metadata()
    path = tmp_path / "odd.parquet"  # a binary column, not pandas' str
    pq.write_table(odd, path)
    capsys.readouterr()
    assert replay(run_dir, path, out) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "rejected bad_value:symbol: 1 row(s), the first odd.parquet/4" in err
    assert sorted(by_src_row(lines(out))) == [r for r in range(15) if r != 4]


def test_sigterm_during_replay_leaves_no_partial_file_and_exits_143(
    run_dir: Path, tmp_path: Path
) -> None:
    # systemd and `timeout` stop with SIGTERM: the partial file must go as it does on Ctrl-C.
    import subprocess
    import sys

    path = tmp_path / "bars.csv"
    bars(30).to_csv(path, index=False)
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    script = (
        "import os, signal, sys\n"
        "from daemon import pipeline\n"
        "from daemon.cli import main\n"
        "import daemon.replay\n"
        "daemon.replay.CHUNK_ROWS = 10\n"
        "real, calls = pipeline.Pipeline.process, []\n"
        "def process(self, items):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, items)\n"
        "pipeline.Pipeline.process = process\n"
        f"sys.exit(main(['replay', '--run', {str(run_dir)!r}, '--bars', {str(path)!r},"
        f" '--out', {str(out)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr)
    err = said(done.stderr)
    assert err == [f"livepred: error: terminated: --out {out} not written"], err
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize(("header", "name"), [
    ("symbol,ts,open,high,low,close,volume,close", "close"),
    ("\ufeffsymbol,ts,open,high,low,close,volume,symbol", "symbol"),
])
def test_a_column_named_twice_in_a_csv_header_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], header: str, name: str
) -> None:
    # pandas renames the second `close` to `close.1`: it was read silently, while `Close`
    # beside `close` was refused.
    path = tmp_path / "dup.csv"
    path.write_text(header + "\nAAA,1700000060000,50,51,49,50,100,60\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert replay(run_dir, path, out) == 1
    err = said(capsys.readouterr().err)
    assert err == [f"livepred: error: {path}: columns {name!r} and {name!r} are both {name}"]
    assert not out.exists()
