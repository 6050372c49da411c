"""Feature names and their definitions: the pandas reference, an exact window variant, FeatureBuilder.

CONTRACT section 3 is the definition; `handlers.features.FeatureState` computes the same values
incrementally and is tested against the functions here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from handlers.sequences import to_float32

log = logging.getLogger("livepred.features")

DEFAULT_FEATURES: tuple[str, ...] = (
    "ret_1d",
    "ret_5d",
    "ret_10d",
    "ret_20d",
    "vol_10d",
    "vol_20d",
    "rsi_14",
    "ma_ratio_20",
    "bb_position",
)
BB_DEFAULT_WINDOW = 20
# A window longer than this is refused (unknown name): its state would cost ~16 bytes per bar
# of window per symbol, and no model trains on such windows.
MAX_WINDOW = 10_000
# Rows of the (rows, N) window matrix handled at once by the exact reference (memory bound).
_EXACT_CHUNK_ROWS = 65_536


class FeatureKind(StrEnum):
    RET = "ret"
    VOL = "vol"
    RSI = "rsi"
    MA_RATIO = "ma_ratio"
    BB_POSITION = "bb_position"


# The smallest window each kind accepts: a std over one value is always NaN (ddof 1).
_MIN_WINDOW = {
    FeatureKind.RET: 1,
    FeatureKind.VOL: 2,
    FeatureKind.RSI: 1,
    FeatureKind.MA_RATIO: 1,
    FeatureKind.BB_POSITION: 2,
}
_INT = r"([1-9][0-9]*)"
_PATTERNS: tuple[tuple[re.Pattern[str], FeatureKind], ...] = (
    (re.compile(rf"ret_{_INT}d"), FeatureKind.RET),
    (re.compile(rf"vol_{_INT}d"), FeatureKind.VOL),
    (re.compile(rf"rsi_{_INT}"), FeatureKind.RSI),
    (re.compile(rf"ma_ratio_{_INT}"), FeatureKind.MA_RATIO),
    (re.compile(rf"bb_position(?:_{_INT})?"), FeatureKind.BB_POSITION),
)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One parsed feature name: its kind and window length in bars."""

    name: str
    kind: FeatureKind
    window: int

    @property
    def warmup_bars(self) -> int:
        """Bars of a fresh history after which the value can first be non-NaN."""
        if self.kind in (FeatureKind.RET, FeatureKind.VOL):
            return self.window + 1  # the first return of a history is NaN
        if self.kind is FeatureKind.RSI:
            # pandas counts the first diff as 0, so N bars fill the window; but a window
            # holding only that diff is 0/0 (rsi_1 at bar 0).
            return max(self.window, 2)
        return self.window


def parse_feature(name: str) -> FeatureSpec | None:
    """The spec of a feature name, or None when the name is not one livepred computes."""
    if not isinstance(name, str):
        return None
    for pattern, kind in _PATTERNS:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        window = int(match.group(1)) if match.group(1) else BB_DEFAULT_WINDOW
        if window < _MIN_WINDOW[kind] or window > MAX_WINDOW:
            return None
        return FeatureSpec(name=name, kind=kind, window=window)
    return None


def warmup_bars(name: str) -> int:
    """Bars of a fresh history after which `name` can first be non-NaN; ValueError if unknown."""
    spec = parse_feature(name)
    if spec is None:
        raise ValueError(f"unknown feature {name!r}")
    return spec.warmup_bars


_logged_unknown: set[str] = set()


def log_unknown(names: Iterable[str]) -> None:
    """Log each unknown feature name once per process (its values are NaN)."""
    for name in names:
        if name not in _logged_unknown and parse_feature(name) is None:
            _logged_unknown.add(name)
            log.warning("unknown feature %r: its value is NaN", name)


# ---- the pandas reference (the definition) ------------------------------------------------


def reference_series(close: pd.Series, name: str) -> pd.Series:
    """Feature `name` after every bar of `close`, exactly as CONTRACT section 3 writes it."""
    c = pd.Series(np.asarray(close, dtype=np.float64), index=close.index)
    spec = parse_feature(name)
    if spec is None:
        log_unknown([name])
        return pd.Series(np.nan, index=c.index, name=name, dtype=np.float64)
    n = spec.window
    if spec.kind is FeatureKind.RET:
        out = c.pct_change(n)
    elif spec.kind is FeatureKind.VOL:
        out = c.pct_change().rolling(n).std()
    elif spec.kind is FeatureKind.RSI:
        d = c.diff()
        gain = d.where(d > 0, 0).rolling(n).mean()
        loss = (-d.where(d < 0, 0)).rolling(n).mean()
        out = 100 - 100 / (1 + gain / loss)
    elif spec.kind is FeatureKind.MA_RATIO:
        out = c / c.rolling(n).mean() - 1
    else:
        m = c.rolling(n).mean()
        s = c.rolling(n).std()
        out = (c - (m - 2 * s)) / ((m + 2 * s) - (m - 2 * s))
    return out.astype(np.float64).rename(name)


def reference_frame(close: pd.Series, names: Sequence[str]) -> pd.DataFrame:
    """`reference_series` for each name, one column per name (in order, duplicates kept)."""
    cols = [reference_series(close, n).to_numpy() for n in names]
    data = np.column_stack(cols) if cols else np.empty((len(close), 0))
    return pd.DataFrame(data, index=close.index, columns=list(names))


# ---- the exact window variant ---------------------------------------------------------------


def _window_mean_std(values: np.ndarray, n: int, need_std: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof 1) of every full window of `values`, exact to a few ulps.

    Each window is shifted by its first element (exact for nearby values), then a corrected
    two-pass sum; a constant window has its value as mean and std 0, as pandas gives.
    Windows that hold a NaN are NaN. Both outputs have len(values) rows, NaN until full.
    """
    size = len(values)
    mean = np.full(size, np.nan)
    std = np.full(size, np.nan)
    if size < n:
        return mean, std
    windows = sliding_window_view(values, n)
    with np.errstate(invalid="ignore"):
        for start in range(0, len(windows), _EXACT_CHUNK_ROWS):
            w = windows[start : start + _EXACT_CHUNK_ROWS]
            first = w[:, :1]
            z = w - first
            zm = z.sum(axis=1) / n
            rows = slice(start + n - 1, start + n - 1 + len(w))
            constant = (w == first).all(axis=1)
            mean[rows] = np.where(constant, first[:, 0], first[:, 0] + zm)
            if need_std and n > 1:
                dev = z - zm[:, None]
                ss = (dev * dev).sum(axis=1) - dev.sum(axis=1) ** 2 / n
                var = np.maximum(ss, 0.0) / (n - 1)
                std[rows] = np.where(constant, 0.0, np.sqrt(var))
            elif need_std:
                std[rows] = np.nan
    return mean, std


def _exact_values(c: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    n = spec.window
    size = len(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        if spec.kind is FeatureKind.RET:
            out = np.full(size, np.nan)
            out[n:] = c[n:] / c[:-n] - 1
            return out
        if spec.kind is FeatureKind.VOL:
            ret = np.full(size, np.nan)
            ret[1:] = c[1:] / c[:-1] - 1
            return _window_mean_std(ret, n, need_std=True)[1]
        if spec.kind is FeatureKind.RSI:
            d = np.zeros(size)
            d[1:] = c[1:] - c[:-1]
            gain = _window_mean_std(np.where(d > 0, d, 0.0), n, need_std=False)[0]
            loss = _window_mean_std(np.where(d < 0, -d, 0.0), n, need_std=False)[0]
            return 100 - 100 / (1 + gain / loss)
        if spec.kind is FeatureKind.MA_RATIO:
            return c / _window_mean_std(c, n, need_std=False)[0] - 1
        m, s = _window_mean_std(c, n, need_std=True)
        # (c - (m - 2s)) / ((m + 2s) - (m - 2s)) with c - m taken from the window's shifted
        # values (exact for nearby prices), not as the difference of two rounded prices.
        offset = np.full(size, np.nan)
        if size >= n:
            windows = sliding_window_view(c, n)
            for start in range(0, len(windows), _EXACT_CHUNK_ROWS):
                w = windows[start : start + _EXACT_CHUNK_ROWS]
                z = w - w[:, :1]
                offset[start + n - 1 : start + n - 1 + len(w)] = z[:, -1] - z.sum(axis=1) / n
        return (offset + 2 * s) / (4 * s)


def exact_reference_frame(close: pd.Series | np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """The definition with every rolling mean/std computed exactly over its window.

    Differs from `reference_frame` only where pandas' online rolling sums lose precision
    (large prices with tiny moves). Unknown names are NaN columns.
    """
    c = np.asarray(close, dtype=np.float64)
    index = close.index if isinstance(close, pd.Series) else pd.RangeIndex(len(c))
    cols = []
    for name in names:
        spec = parse_feature(name)
        if spec is None:
            log_unknown([name])
            cols.append(np.full(len(c), np.nan))
        else:
            cols.append(_exact_values(c, spec))
    data = np.column_stack(cols) if cols else np.empty((len(c), 0))
    return pd.DataFrame(data, index=index, columns=list(names))


# ---- the seed API -----------------------------------------------------------------------------


def close_column(prices_df: pd.DataFrame | pd.Series) -> pd.Series:
    """The close prices of an OHLCV frame whose column names may be in any case."""
    if isinstance(prices_df, pd.Series):
        return prices_df
    for col in prices_df.columns:
        if str(col).lower() == "close":
            return prices_df[col]
    raise KeyError(f"no close column among {list(prices_df.columns)!r}")


class FeatureBuilder:
    """Features after the last bar of a price history (seed API).

    `build_features` gives what the daemon publishes: the definition with each window's mean
    and std computed exactly over the window. `build_frame` is the pandas reference itself;
    the two differ where pandas' running sums leave rounding noise, e.g. a window of equal
    closes after a move: pandas' std is ~1e-8 there, so its bb_position is 0.5, not NaN (0/0).
    """

    def __init__(self, feature_list: Sequence[str]) -> None:
        self.feature_list: list[str] = list(feature_list)
        log_unknown(self.feature_list)

    def build_frame(self, prices_df: pd.DataFrame | pd.Series) -> pd.DataFrame:
        """Every feature after every bar (float64), one column per name."""
        return reference_frame(close_column(prices_df), self.feature_list)

    def build_features(self, prices_df: pd.DataFrame | pd.Series) -> np.ndarray:
        """Float32 (F,): each feature after the frame's last bar; NaN when not defined yet."""
        close = close_column(prices_df)
        if len(close) == 0:
            return np.full(len(self.feature_list), np.nan, dtype=np.float32)
        # The last row depends on the last `warmup_bars` closes only; one more keeps the RSI's
        # first difference a real one (a history's first difference counts as 0).
        specs = [parse_feature(name) for name in self.feature_list]
        tail = max((spec.warmup_bars for spec in specs if spec is not None), default=1) + 1
        values = np.asarray(close, dtype=np.float64)[-tail:] if len(close) > tail else close
        frame = exact_reference_frame(values, self.feature_list)
        return to_float32(frame.iloc[-1].to_numpy(dtype=np.float64))

    def build_features_pandas(self, prices_df: pd.DataFrame | pd.Series) -> np.ndarray:
        """`build_features` from the pandas reference frame (the seed's per-event recompute)."""
        close = close_column(prices_df)
        if len(close) == 0:
            return np.full(len(self.feature_list), np.nan, dtype=np.float32)
        frame = reference_frame(close, self.feature_list)
        return to_float32(frame.iloc[-1].to_numpy(dtype=np.float64))


def build_features_from_prices(
    prices_df: pd.DataFrame | pd.Series, feature_list: Sequence[str]
) -> np.ndarray:
    """`FeatureBuilder(feature_list).build_features(prices_df)`."""
    return FeatureBuilder(feature_list).build_features(prices_df)
