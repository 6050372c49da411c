"""Prediction events packed straight from the engine's columns to msgpack (CONTRACT section 4).

A target's map has a fixed shape for every row where each family produced a finite value
(nothing warming, nothing failed): the same keys, the same lengths, only the float64s differ.
Those rows are written for the whole batch at once into one byte matrix (numpy), the floats
dropped in as big-endian doubles. Any other row (warming, failed, non-finite) is packed from
`TargetBatch.rows()`, the engine's one definition of a row's map. Pure: no Redis, no asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np

from daemon.wire import WIRE_VERSION
from handlers.batch_io import BatchResult, TargetBatch


def _pk(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _map_header(n: int) -> bytes:
    return msgpack.Packer().pack_map_header(n)


_FLOAT = b"\xcb"  # msgpack float64, followed by 8 bytes big-endian
_HEAD = b"".join((_map_header(7), _pk("v"), _pk(WIRE_VERSION), _pk("symbol")))
_K_TS, _K_SRC = _pk("ts"), _pk("src")


def pack_predictions(
    symbols: Sequence[str],
    ts: Sequence[int],
    srcs: Sequence[str],
    run: str,
    lat_us: int,
    result: BatchResult | None,
) -> list[bytes]:
    """The `data` field of each row's output: {"v", "symbol", "ts", "src", "run", "lat_us",
    "targets"}, rows aligned with `result`'s (None or no targets: an empty targets map)."""
    n = len(symbols)
    targets = result.targets if result is not None else {}
    tail = b"".join((_pk("run"), _pk(run), _pk("lat_us"), _pk(int(lat_us)), _pk("targets"),
                     _map_header(len(targets))))
    blocks = [target_blocks(batch, n) for batch in targets.values()]
    names = [_pk(name) for name in targets]
    pack = msgpack.Packer(use_bin_type=True).pack
    # A batch holds each symbol many times: its leading bytes are packed once.
    heads = {s: _HEAD + pack(s) + _K_TS for s in set(symbols)}
    if len(blocks) == 1:
        tail += names[0]
        only = blocks[0]
        return [
            b"".join((heads[s], pack(t), _K_SRC, pack(src), tail, only[i]))
            for i, (s, t, src) in enumerate(zip(symbols, ts, srcs, strict=True))
        ]
    out: list[bytes] = []
    for i, (s, t, src) in enumerate(zip(symbols, ts, srcs, strict=True)):
        parts = [heads[s], pack(t), _K_SRC, pack(src), tail]
        for name, block in zip(names, blocks, strict=True):
            parts.append(name)
            parts.append(block[i])
        out.append(b"".join(parts))
    return out


def target_blocks(batch: TargetBatch, n: int) -> list[bytes]:
    """One target's map for each of the `n` rows, packed."""
    families = list(batch.preds)
    if n == 0:
        return []
    if not families:  # every family of the target was refused at load
        return [_pk(_empty(batch))] * n
    values = np.column_stack([np.asarray(batch.preds[f], dtype=np.float64) for f in families])
    simple = np.isfinite(values).all(axis=1)
    for f in families:
        simple &= np.asarray(batch.warming[f]) <= 0
        failed = batch.failed[f]
        if failed.count(None) != n:
            simple &= np.fromiter((r is None for r in failed), dtype=bool, count=n)
    selected = batch.selected
    # The fixed shape: pieces of constant bytes, and float columns (index into `values`).
    pieces: list[bytes | int] = [_map_header(5) + _pk("preds") + _map_header(len(families))]
    for j, family in enumerate(families):
        pieces += [_pk(family) + _FLOAT, j]
    pieces.append(_pk("selected") + _pk(selected) + _pk("pred"))
    if selected in batch.preds:
        pieces += [_FLOAT, families.index(selected)]
    else:
        pieces.append(_pk(None))
    pieces.append(_pk("warming") + _map_header(0) + _pk("failed") + _map_header(0))
    width = sum(8 if isinstance(p, int) else len(p) for p in pieces)
    matrix = np.empty((n, width), dtype=np.uint8)
    at = 0
    for p in pieces:
        if isinstance(p, int):
            matrix[:, at : at + 8] = values[:, p].astype(">f8").view(np.uint8).reshape(n, 8)
            at += 8
        else:
            matrix[:, at : at + len(p)] = np.frombuffer(p, dtype=np.uint8)
            at += len(p)
    blob = matrix.tobytes()
    out = [blob[i * width : (i + 1) * width] for i in range(n)]
    if not simple.all():
        docs = batch.rows()
        for i in np.flatnonzero(~simple).tolist():
            out[i] = _pk(docs[i])
    return out


def _empty(batch: TargetBatch) -> dict[str, object]:
    return {"preds": {}, "selected": batch.selected, "pred": None, "warming": {}, "failed": {}}
