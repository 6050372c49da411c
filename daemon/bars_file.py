"""Bars files for `livepred replay`: CSV (plain or compressed) or parquet, read a chunk of rows
at a time (memory does not grow with the file), each row validated by the stream's rules
(CONTRACT §4) as it is handed out."""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pandas as pd

from daemon.wire import DECODE_ERROR, Bar, Rejection, decode_bar
from handlers.errors import short_error

BAR_COLUMNS = ("symbol", "ts", "open", "high", "low", "close", "volume")
NUMBER_COLUMNS = frozenset(BAR_COLUMNS[1:])
READ_ROWS = 65_536
SPARE_CELLS = 4  # cells past a CSV header read to say which row has them (empty: a trailing ,)
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zip")
PARQUET_SUFFIXES = (".parquet", ".pq")
# pandas' error for a line with more cells than the header and the spare ones together
_LONGER_LINE = re.compile(r"Expected \d+ fields in line (\d+), saw \d+")
# a datetime column's unit (pandas: s, ms, us or ns) against milliseconds
_MS_PER_TICK = {"s": 1000, "ms": 1}
_TICKS_PER_MS = {"us": 1000, "ns": 1_000_000}


class BarsFileError(ValueError):
    """The bars file is missing, unreadable or malformed (the message names the file and what)."""


@dataclass(slots=True)
class BarsChunk:
    frame: pd.DataFrame  # the bar columns, lower-case
    first_row: int  # 0-based row index in the file of the frame's first row
    text: bool  # every cell is the file's own text (CSV)


class BarsFile:
    """An opened bars file: its columns checked, its rows handed out chunk by chunk."""

    def __init__(self, path: Path, header: pd.DataFrame, chunks: Iterator[pd.DataFrame], *,
                 text: bool, total_rows: int | None, spare: Sequence[str] = ()) -> None:
        self.path = path
        self.total_rows = total_rows  # known up front for parquet
        self._text = text
        self._chunks = chunks
        self._spare = list(spare)  # a CSV's columns past its header: empty or an error
        self._width = len(header.columns)
        self._normalise(header)  # a missing column is said before any output is written

    def chunks(self) -> Iterator[BarsChunk]:
        first_row = 0
        while (frame := self._next()) is not None:
            if self._spare:
                self._check_spare(frame, first_row)
                frame = frame.drop(columns=self._spare)
            frame = self._normalise(frame)
            yield BarsChunk(frame, first_row, self._text)
            first_row += len(frame)

    def _next(self) -> pd.DataFrame | None:
        try:
            return next(self._chunks, None)
        except BarsFileError:
            raise
        except Exception as exc:  # a malformed line further down the file
            if (longer := _LONGER_LINE.search(str(exc))) and self._spare:
                raise BarsFileError(
                    f"{self.path}: line {longer[1]} has more cells than the header's"
                    f" {self._width}"
                ) from None
            raise BarsFileError(f"{self.path}: cannot read: {short_error(exc)}") from None

    def _check_spare(self, frame: pd.DataFrame, first_row: int) -> None:
        filled = (frame[self._spare] != "").to_numpy().any(axis=1)
        if filled.any():
            row = first_row + int(np.argmax(filled))
            raise BarsFileError(
                f"{self.path}: row {row} (line {row + 2}) has more cells than the header's"
                f" {len(frame.columns) - len(self._spare)}"
            )

    def _normalise(self, frame: pd.DataFrame) -> pd.DataFrame:
        if any(name in BAR_COLUMNS for name in frame.index.names):
            frame = frame.reset_index()  # a parquet saved with symbol/ts as its index
        named = [str(c).strip().lower() for c in frame.columns]
        seen: dict[str, str] = {}
        for original, name in zip(frame.columns, named, strict=True):
            if name in BAR_COLUMNS and name in seen:
                raise BarsFileError(
                    f"{self.path}: columns {seen[name]!r} and {original!r} are both {name}"
                )
            seen[name] = str(original)
        frame.columns = named
        missing = [c for c in BAR_COLUMNS if c not in frame.columns]
        if missing:
            raise BarsFileError(f"{self.path}: missing column(s) {', '.join(missing)}")
        frame = frame.loc[:, list(BAR_COLUMNS)]
        if pd.api.types.is_datetime64_any_dtype(frame["ts"]):
            frame = frame.assign(ts=epoch_ms(frame["ts"]))
        return frame


def open_bars(path: Path) -> BarsFile:
    if not path.exists():
        raise BarsFileError(f"{path}: no such file")
    if path.is_dir():
        raise BarsFileError(f"{path}: is a directory, not a bars file")
    name = path.name.lower()
    try:
        if name.endswith(CSV_SUFFIXES):
            return _open_csv(path)
        if name.endswith(PARQUET_SUFFIXES):
            return _open_parquet(path)
    except BarsFileError:
        raise
    except Exception as exc:
        raise BarsFileError(f"{path}: cannot read: {short_error(exc)}") from None
    raise BarsFileError(f"{path}: expected a .csv (or .csv.gz) or .parquet file")


def _open_csv(path: Path) -> BarsFile:
    # Every cell as text, checked one by one like the flat fields of a stream entry
    # (`XADD bars * symbol AAPL ts ... close 101.5`): one bad cell rejects its row, not its
    # column. A line with more cells than the header is an error (pandas would otherwise
    # shift the columns under an index), a trailing delimiter on every line is not.
    # The header is the first row pandas reads (blank lines before it skipped), its cells as
    # written: not renamed, so a column named twice is said, not read as `close.1`.
    options: dict[str, Any] = {"dtype": str, "keep_default_na": False, "index_col": False,
                               "header": None}
    try:
        first = pd.read_csv(path, nrows=1, **options)
    except pd.errors.EmptyDataError:
        raise BarsFileError(f"{path}: empty file, not even a header") from None
    names = [str(cell) for cell in first.iloc[0].tolist()] if len(first) else []
    if not names:
        raise BarsFileError(f"{path}: empty file, not even a header")
    spare = [f"livepred:spare:{i}" for i in range(SPARE_CELLS)]
    reader = pd.read_csv(path, names=[f"livepred:cell:{i}" for i in range(len(names))] + spare,
                         chunksize=READ_ROWS, **options)
    header = pd.DataFrame(columns=names)
    return BarsFile(path, header, _after_header(reader, [*names, *spare]), text=True,
                    total_rows=None, spare=spare)


def _after_header(reader: Iterator[pd.DataFrame], names: list[str]) -> Iterator[pd.DataFrame]:
    """The rows under the header (the first row read, the same lines skipped as the header
    read skipped), under the header's names."""
    for number, frame in enumerate(reader):
        if number == 0:
            frame = frame.iloc[1:].reset_index(drop=True)
        frame.columns = names
        yield frame


def _open_parquet(path: Path) -> BarsFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    chunks = (pa.Table.from_batches([batch]).to_pandas()
              for batch in parquet.iter_batches(batch_size=READ_ROWS))
    header = parquet.schema_arrow.empty_table().to_pandas()
    return BarsFile(path, header, chunks, text=False, total_rows=parquet.metadata.num_rows)


def epoch_ms(stamps: pd.Series) -> pd.Series:
    """A datetime column (a training set's usual bar time; naive = UTC) as epoch
    milliseconds: int64, or float with NaN where a time is missing or beyond int64
    milliseconds (that row is rejected). Counted in the column's own unit, never through
    nanoseconds, whose range ends in 2262."""
    if stamps.dt.tz is not None:
        stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
    values = stamps.to_numpy()
    unit, _ = np.datetime_data(values.dtype)  # pandas' units: s, ms, us, ns
    ticks = values.view("int64")
    missing = np.isnat(values)
    if (ms_per_tick := _MS_PER_TICK.get(unit)) is not None:
        missing |= np.abs(ticks) > np.iinfo(np.int64).max // ms_per_tick
        ms = np.where(missing, 0, ticks) * ms_per_tick
    else:
        ms = np.floor_divide(ticks, _TICKS_PER_MS[unit])
    if missing.any():
        return pd.Series(np.where(missing, np.nan, ms.astype("float64")), index=stamps.index)
    return pd.Series(ms, index=stamps.index, dtype="int64")


def iter_items(chunk: BarsChunk, source: str) -> Iterator[Bar | Rejection]:
    """Each row validated by the same rules as a stream entry (CONTRACT §4): a text file's
    cells as flat fields (decimal strings), a typed file's values as a msgpack map (or as
    flat fields where a number column holds text, as a CSV's would)."""
    columns = [chunk.frame[c].tolist() for c in BAR_COLUMNS]
    keys = [c.encode() for c in BAR_COLUMNS]
    for offset, row in enumerate(zip(*columns, strict=True)):
        entry_id = str(chunk.first_row + offset)
        if chunk.text:
            flat = {
                key: value.encode("utf-8", "surrogateescape")
                for key, value in zip(keys, row, strict=True)
                if value != "" or key == b"symbol"
            }
            yield decode_bar(flat, source, entry_id)
            continue
        values = {name: v for name, value in zip(BAR_COLUMNS, row, strict=True)
                  if (v := _plain(value, name)) is not None}
        yield _typed_bar(values, source, entry_id)


def _typed_bar(values: dict[str, Any], source: str, entry_id: str) -> Bar | Rejection:
    try:
        if isinstance(values.get("symbol"), str) and any(
            isinstance(values.get(name), str) for name in NUMBER_COLUMNS
        ):
            texts = {name.encode(): v if isinstance(v, bytes) else _text(v).encode()
                     for name, v in values.items()}
            return decode_bar(texts, source, entry_id)
        return decode_bar({b"data": msgpack.packb(values, use_bin_type=True)}, source, entry_id)
    except (ValueError, TypeError, OverflowError):  # a value no stream entry could carry
        return Rejection(DECODE_ERROR, values, source, entry_id)


def _plain(value: Any, name: str) -> Any:
    """A typed cell as msgpack can carry it; None where the cell is empty (a missing field).
    A value of any other type is passed as its text, which the field's check then rejects."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value) and name == "symbol":
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):  # binary: its text if UTF-8, else as it is (`bad_value:<column>`)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return str(value)  # a date, a list, ...: `bad_value:<column>`


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
