#!/usr/bin/env python3
"""Soak test: `livepred run` against a local Redis for N minutes at a steady bar rate.

A separate feeder process publishes bars (each carrying its send time, `sent_us`, an unknown
key the daemon ignores). Every `--interval-s` the script samples the daemon's RSS, the
group's pending count and lag, and the p50/p99 latency of the outputs of that window: the
daemon's own `lat_us` (read -> publish) and end to end (feeder send -> output read here). It
prints one table row per sample and a JSON summary at the end, then deletes its keys.

    python scripts/soak.py                      # 3 minutes, 1000 bars/s, 100 symbols
    python scripts/soak.py --minutes 10 --rate 2000 --json soak.json

Without `--run`, a small training run (LightGBM, Keras MLP, TorchScript LSTM) is built in a
temporary directory first (needs the keras and torch extras).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
LIVEPRED = Path(sys.executable).parent / "livepred"
MIN_MS = 60_000
T0_MS = 1_700_000_000_000


# ---- feeder (a separate process: `soak.py --feeder ...`) ------------------------------------


def run_feeder(args: argparse.Namespace) -> int:
    """Publish `rate` bars/s for `seconds`, in ticks of 10 ms, symbols round-robin; each bar
    is one minute after the symbol's previous one (event time), prices a random walk."""
    client = redis.Redis.from_url(args.redis_url)
    rng = np.random.default_rng(0)
    names = [f"SOAK{i:04d}" for i in range(args.symbols)]
    closes = 10.0 ** rng.uniform(0, 3, size=len(names))
    tick_s = 0.01
    published = 0
    started = time.monotonic()
    deadline = started + args.seconds
    packer = msgpack.Packer(use_bin_type=True)
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = int((now - started) * args.rate) - published
        if due > 0:
            pipe = client.pipeline(transaction=False)
            sent_us = time.time_ns() // 1000
            for k in range(published, published + due):
                j = k % len(names)
                closes[j] *= float(np.exp(rng.normal(0, 0.002)))
                c = float(closes[j])
                bar = {"symbol": names[j], "ts": T0_MS + (k // len(names) + 1) * MIN_MS,
                       "open": c, "high": c, "low": c, "close": c, "volume": 100.0,
                       "sent_us": sent_us}
                pipe.xadd(args.stream, {"data": packer.pack(bar)})
            pipe.execute()
            published += due
        time.sleep(max(0.0, started + (published / args.rate) + tick_s - time.monotonic()))
    print(json.dumps({"published": published, "seconds": round(time.monotonic() - started, 3)}))
    client.close()
    return 0


# ---- the run to serve -----------------------------------------------------------------------


def build_run(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from handlers.features import FeatureBuilder
    from tests import model_factory as mf

    features = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 3000)))
    import pandas as pd

    X = FeatureBuilder(features).build_frame(pd.DataFrame({"close": close})).to_numpy()
    y = np.nan_to_num(X[:, 0]) * 50 + rng.normal(0, 0.1, len(X))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, y, features)
    finite = np.isfinite(X).all(axis=1)
    mf.write_keras(root, "fwd", "MLP", X[finite], y[finite], features, epochs=1)
    rows = X[finite]
    windows = np.stack([rows[i : i + 10] for i in range(len(rows) - 10)])
    mf.write_torchscript(root, "fwd", "LSTM", windows, y[: len(windows)], features, epochs=5)
    mf.write_routing(root, "fwd", "LightGBM")
    mf.write_manifest(root, run_id="soak")
    return root


# ---- sampling -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class OutputWatcher:
    """Reads the output stream as a strategy would and pairs each output with its input's
    `sent_us`, giving end-to-end latency; also collects the daemon's own `lat_us`."""

    def __init__(self, client: redis.Redis, output: str, input_stream: str) -> None:
        self.client, self.output, self.input = client, output, input_stream
        self.last_id = "0-0"
        self.lat_us: list[int] = []
        self.e2e_us: list[int] = []
        self.outputs = 0
        self.srcs: set[str] = set()
        self.repeated = 0

    def poll(self, block_ms: int) -> None:
        reply = self.client.xread({self.output: self.last_id}, count=5000, block=block_ms)
        if not reply:
            return
        received_us = time.time_ns() // 1000
        rows = reply[0][1]
        self.last_id = rows[-1][0].decode()
        ids = []
        for _, fields in rows:
            data = msgpack.unpackb(fields[b"data"], raw=False)
            self.lat_us.append(int(data["lat_us"]))
            src = data["src"]
            if src in self.srcs:
                self.repeated += 1
            self.srcs.add(src)
            ids.append(src.rsplit("/", 1)[1])
        self.outputs += len(rows)
        sent = {}
        low, high = min(ids, key=_id_key), max(ids, key=_id_key)
        for entry_id, fields in self.client.xrange(self.input, min=low, max=high):
            try:
                sent[entry_id.decode()] = msgpack.unpackb(fields[b"data"])["sent_us"]
            except (KeyError, ValueError, TypeError, msgpack.UnpackException):
                continue
        self.e2e_us.extend(received_us - sent[i] for i in ids if i in sent)

    def take(self) -> tuple[list[int], list[int]]:
        lat, e2e = self.lat_us, self.e2e_us
        self.lat_us, self.e2e_us = [], []
        return lat, e2e


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def pct(values: list[int], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def fmt_ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


# ---- main -----------------------------------------------------------------------------------


def write_config(path: Path, prefix: str, redis_url: str, run_root: Path) -> dict[str, str]:
    keys = {"input": f"{prefix}bars", "output": f"{prefix}predictions",
            "dead": f"{prefix}bars:dead", "group": f"{prefix}livepred"}
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\n'
        f'[streams]\ninput = ["{keys["input"]}"]\noutput = "{keys["output"]}"\n'
        f'dead_letter = "{keys["dead"]}"\ngroup = "{keys["group"]}"\n'
        f'[models]\nrun_root = "{run_root}"\n'
        '[metrics]\nport = 0\n[log]\nformat = "json"\n'
    )
    return keys


def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="livepred-soak-"))
    prefix = f"soak:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    daemon: subprocess.Popen[bytes] | None = None
    feeder: subprocess.Popen[bytes] | None = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPRED_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    samples: list[dict[str, Any]] = []
    try:
        run_root = Path(args.run) if args.run else build_run(workdir / "run")
        keys = write_config(workdir / "livepred.toml", prefix, args.redis_url, run_root)
        client.xgroup_create(keys["input"], keys["group"], id="$", mkstream=True)
        log_path = workdir / "daemon.log"
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [str(LIVEPRED), "run", "--config", str(workdir / "livepred.toml")],
                stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL,
            )
        started = time.monotonic()
        while '"role": "active"' not in log_path.read_text(errors="replace"):
            if daemon.poll() is not None or time.monotonic() - started > 180:
                raise SystemExit(f"daemon did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        startup_s = time.monotonic() - started
        seconds = args.minutes * 60
        feeder = subprocess.Popen(
            [sys.executable, __file__, "--feeder", "--redis-url", args.redis_url,
             "--stream", keys["input"], "--rate", str(args.rate), "--symbols",
             str(args.symbols), "--seconds", str(seconds)],
            stdout=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL,
        )
        watcher = OutputWatcher(client, keys["output"], keys["input"])
        header = (f"{'t_s':>6} {'rss_mb':>8} {'pending':>8} {'lag':>7} {'out/s':>8} "
                  f"{'lat_p50':>8} {'lat_p99':>8} {'e2e_p50':>8} {'e2e_p99':>8} {'e2e_max':>8}")
        print(f"daemon pid {daemon.pid}, started in {startup_s:.1f}s; feeding {args.rate} bars/s "
              f"over {args.symbols} symbols for {seconds:.0f}s (latencies in ms)")
        print(header)
        t0 = time.monotonic()
        next_sample = t0 + args.interval_s
        last_outputs = 0
        while True:
            watcher.poll(block_ms=100)
            now = time.monotonic()
            if now < next_sample:
                continue
            lat, e2e = watcher.take()
            group = next(
                (g for g in client.xinfo_groups(keys["input"])
                 if g["name"].decode() == keys["group"]), {},
            )
            sample = {
                "t_s": round(now - t0, 1),
                "rss_mb": round(rss_mb(daemon.pid), 1),
                "pending": int(client.xpending(keys["input"], keys["group"])["pending"]),
                "lag": int(group.get("lag") or 0),
                "outputs_per_s": round((watcher.outputs - last_outputs) / (now - next_sample
                                                                            + args.interval_s)),
                "lat_us_p50": pct(lat, 50), "lat_us_p99": pct(lat, 99),
                "e2e_us_p50": pct(e2e, 50), "e2e_us_p99": pct(e2e, 99),
                "e2e_us_max": float(max(e2e)) if e2e else None,
            }
            last_outputs = watcher.outputs
            samples.append(sample)
            print(f"{sample['t_s']:>6.0f} {sample['rss_mb']:>8.1f} {sample['pending']:>8} "
                  f"{sample['lag']:>7} {sample['outputs_per_s']:>8} "
                  f"{fmt_ms(sample['lat_us_p50']):>8} {fmt_ms(sample['lat_us_p99']):>8} "
                  f"{fmt_ms(sample['e2e_us_p50']):>8} {fmt_ms(sample['e2e_us_p99']):>8} "
                  f"{fmt_ms(sample['e2e_us_max']):>8}", flush=True)
            next_sample += args.interval_s
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited with {daemon.returncode}")
            if feeder.poll() is not None:
                break
        feeder_report = json.loads((feeder.communicate(timeout=30)[0] or b"{}").decode() or "{}")
        published = int(feeder_report.get("published", 0))
        deadline = time.monotonic() + 60
        while watcher.outputs < published and time.monotonic() < deadline:
            watcher.poll(block_ms=200)
        daemon.send_signal(signal.SIGTERM)
        exit_code = daemon.wait(60)
        rss = [s["rss_mb"] for s in samples]
        steady = samples[len(samples) // 3 :] or samples
        summary = {
            "minutes": args.minutes, "rate_bars_per_s": args.rate, "symbols": args.symbols,
            "run": str(args.run or "built: LightGBM + Keras MLP + TorchScript LSTM(T=10)"),
            "startup_s": round(startup_s, 1),
            "published": published, "outputs": watcher.outputs,
            "outputs_repeated": watcher.repeated,
            "dead_letters": int(client.xlen(keys["dead"])),
            "pending_at_end": int(client.xpending(keys["input"], keys["group"])["pending"]),
            "pending_max": max((s["pending"] for s in samples), default=0),
            "rss_mb_first": rss[0] if rss else None, "rss_mb_last": rss[-1] if rss else None,
            "rss_mb_max": max(rss) if rss else None,
            "rss_mb_growth_after_first_third": round(steady[-1]["rss_mb"] - steady[0]["rss_mb"], 1)
            if steady else None,
            "lat_us_p99_max_window": max((s["lat_us_p99"] or 0 for s in samples), default=None),
            "e2e_us_p99_max_window": max((s["e2e_us_p99"] or 0 for s in samples), default=None),
            "lat_us_p99_median_window": float(np.median([s["lat_us_p99"] for s in samples
                                                         if s["lat_us_p99"] is not None] or [0])),
            "e2e_us_p99_median_window": float(np.median([s["e2e_us_p99"] for s in samples
                                                         if s["e2e_us_p99"] is not None] or [0])),
            "daemon_exit_code": exit_code,
        }
        print(json.dumps({"summary": summary, "samples": samples} if args.samples_in_json
                         else summary, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples},
                                                  indent=2))
        ok = (exit_code == 0 and summary["outputs"] == published and not watcher.repeated
              and summary["pending_at_end"] == 0)
        return 0 if ok else 1
    finally:
        for proc in (feeder, daemon):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        keys_left = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys_left:
            client.delete(*keys_left)
        client.close()
        if args.keep_dir:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="bars per second")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds per sample")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--run", help="training run to serve (default: build a small one)")
    parser.add_argument("--json", help="also write summary and samples to this file")
    parser.add_argument("--samples-in-json", action="store_true",
                        help="print the samples in the final JSON too")
    parser.add_argument("--keep-dir", action="store_true", help="keep the work directory")
    parser.add_argument("--feeder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_feeder(args) if args.feeder else soak(args)


if __name__ == "__main__":
    sys.exit(main())
