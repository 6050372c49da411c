"""Per-row predict cost of every family of a run, one row at a time vs batched, and one row
right after a short pause (what a call costs when the caches and branch predictors have gone
cold meanwhile, as between a daemon's batches at light load).

`python -m handlers.microbench RUN_ROOT [--view V] [--batch N]`; `bench_run` returns the rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handlers.errors import ModelLoadError
from handlers.registry import expected_input_shape
from handlers.run import DEFAULT_VIEW, ModelLoader

PAUSE_S = 0.003  # about the gap between two batches of a daemon at light load


@dataclass(frozen=True, slots=True)
class BenchRow:
    target: str
    family: str
    format_name: str
    batch_size: int
    single_us_per_row: float  # predict on (1, ...): the cost of one row alone
    batched_us_per_row: float  # predict on (batch_size, ...) divided by batch_size
    refusal: str | None = None
    single_after_pause_us: float = 0.0  # predict on (1, ...) right after PAUSE_S of sleep

    @property
    def speedup(self) -> float:
        return self.single_us_per_row / self.batched_us_per_row if self.batched_us_per_row else 0.0


def bench_run(
    run_root: str | Path,
    *,
    view: str = DEFAULT_VIEW,
    batch_size: int = 1000,
    min_time_s: float = 0.2,
    device: str = "cpu",
    allow_pickle: bool = True,
    seed: int = 0,
) -> list[BenchRow]:
    """Time every loadable family of the run; refused families come back with `refusal` set."""
    rng = np.random.default_rng(seed)
    rows: list[BenchRow] = []
    with ModelLoader(run_root, allow_pickle=allow_pickle, device=device) as loader:
        for target in loader.list_available_targets():
            for family in loader.list_available_families(target, view):
                try:
                    handler, meta = loader.load_model(target, family, view)
                except ModelLoadError as exc:
                    rows.append(BenchRow(target, family, "-", batch_size, 0.0, 0.0, exc.reason))
                    continue
                shape = expected_input_shape(meta)
                batch = rng.standard_normal((batch_size, *shape)).astype(np.float32)
                single = batch[:1].copy()
                rows.append(
                    BenchRow(
                        target,
                        family,
                        handler.format_name,
                        batch_size,
                        single_us_per_row=_us_per_call(handler.predict, single, min_time_s),
                        batched_us_per_row=_us_per_call(handler.predict, batch, min_time_s)
                        / batch_size,
                        single_after_pause_us=_us_after_pause(handler.predict, single, min_time_s),
                    )
                )
    return rows


def _us_per_call(
    predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, min_time_s: float
) -> float:
    """Median over repeated timing rounds (after a warm-up call), in microseconds per call."""
    predict(batch)
    calls = 1
    while True:  # grow the round until it takes ~1/5 of the budget
        start = time.perf_counter()
        for _ in range(calls):
            predict(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s / 5 or calls >= 1 << 16:
            break
        calls *= 2
    rounds = [elapsed / calls]
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(calls):
            predict(batch)
        rounds.append((time.perf_counter() - start) / calls)
    return float(np.median(rounds)) * 1e6


def _us_after_pause(
    predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, min_time_s: float
) -> float:
    """Median microseconds of single calls, each made after sleeping PAUSE_S: the call as it
    costs when it does not follow another at once (at least 9 calls)."""
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < 9 or time.perf_counter() < deadline:
        time.sleep(PAUSE_S)
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def format_rows(rows: Sequence[BenchRow]) -> str:
    header = (
        f"{'target':<16} {'family':<20} {'format':<14} {'B=1 us/row':>11} {'B=N us/row':>11}"
        f" {'speedup':>8} {'B=1 after pause':>16}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.refusal is not None:
            lines.append(f"{row.target:<16} {row.family:<20} refused: {row.refusal}")
            continue
        lines.append(
            f"{row.target:<16} {row.family:<20} {row.format_name:<14}"
            f" {row.single_us_per_row:>11.1f} {row.batched_us_per_row:>11.2f} {row.speedup:>7.0f}x"
            f" {row.single_after_pause_us:>16.1f}"
        )
    if rows:
        lines.append(
            f"(B=N: batches of {rows[0].batch_size} rows; after pause: one row, right after"
            f" {PAUSE_S * 1e3:g} ms of sleep, us)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.microbench", description=__doc__)
    parser.add_argument("run_root", type=Path)
    parser.add_argument("--view", default=DEFAULT_VIEW)
    parser.add_argument("--batch", type=int, default=1000, help="rows per batched call")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        rows = bench_run(
            args.run_root,
            view=args.view,
            batch_size=args.batch,
            min_time_s=args.min_time,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
