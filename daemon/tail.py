"""`livepred tail`: a running daemon's newest predictions (or dead letters), decoded, as JSON
lines; with `follow`, the new ones as they come. Reads only: no group, nothing acknowledged."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import msgpack
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from daemon.client import read_in_slices, stream_keys, stream_rows
from daemon.entries import as_str, id_key
from daemon.settings import Settings
from daemon.wire_events import decode_prediction

FOLLOW_BLOCK_MS = 1000
FOLLOW_COUNT = 100  # entries per stream and read while following
OUTAGE_RETRY_S = 1.0

Row = tuple[tuple[int, int], str, str, Any]  # (id order, stream, entry id, fields)


async def tail(
    redis: Any,
    settings: Settings,
    out: TextIO,
    *,
    count: int = 10,
    follow: bool = False,
    dead: bool = False,
    stop: Callable[[], bool] = lambda: False,
    notes: TextIO = sys.stderr,
) -> int:
    """Print the newest `count` entries of every partition merged, oldest first; then, with
    `follow`, every new one in entry order until `stop()` says so (a Redis outage is waited
    out). Returns the entries printed."""
    s = settings.streams
    keys = stream_keys(s.dead_letter if dead else s.output, s.partitions, settings.redis.cluster)
    show = _dead_letter if dead else _prediction
    newest: list[Row] = []
    after = dict.fromkeys(keys, "0-0")  # an empty stream: everything in it later is new
    for key in keys:
        for entry_id, fields in await redis.xrevrange(key, count=max(count, 1)):
            newest.append((id_key(as_str(entry_id)), key, as_str(entry_id), fields))
    newest.sort()
    for _, key, entry_id, _fields in newest:
        after[key] = entry_id  # sorted: the last one of each stream wins
    printed = 0
    for _, key, entry_id, fields in newest[-count:] if count else []:
        _print(out, key, entry_id, show(fields))
        printed += 1
    while follow and not stop():
        try:
            rows = await _read_after(redis, keys, after, settings.redis.cluster)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            print(f"livepred tail: Redis: {exc}; retrying", file=notes, flush=True)
            await asyncio.sleep(OUTAGE_RETRY_S)
            continue
        for _, key, entry_id, fields in rows:
            _print(out, key, entry_id, show(fields))
            after[key] = entry_id
            printed += 1
    return printed


async def _read_after(
    redis: Any, keys: list[str], after: dict[str, str], cluster: bool
) -> list[Row]:
    """The entries after `after` in every stream, in entry order: when a stream returned a
    full read (more may wait there), none past its last one, which come with the next."""

    async def read(block_ms: int | None) -> list[tuple[str, str, Any]]:
        if cluster:  # one key per call: partitions live in different slots
            replies = await asyncio.gather(*(
                redis.xread({key: after[key]}, count=FOLLOW_COUNT, block=block_ms)
                for key in keys
            ))
        else:
            replies = [await redis.xread(dict(after), count=FOLLOW_COUNT, block=block_ms)]
        return [row for reply in replies for row in stream_rows(reply)]

    got = await (read_in_slices(read, FOLLOW_BLOCK_MS) if cluster else read(FOLLOW_BLOCK_MS))
    per_stream: dict[str, list[str]] = {}
    for key, entry_id, _ in got:
        per_stream.setdefault(key, []).append(entry_id)
    full = [max(ids, key=id_key) for ids in per_stream.values() if len(ids) >= FOLLOW_COUNT]
    limit = min((id_key(i) for i in full), default=None)
    rows = sorted((id_key(entry_id), key, entry_id, fields) for key, entry_id, fields in got)
    return [row for row in rows if limit is None or row[0] <= limit]


def _print(out: TextIO, key: str, entry_id: str, body: Mapping[str, Any]) -> None:
    line = {"stream": key, "id": entry_id, **_plain(body)}
    out.write(json.dumps(line, allow_nan=False) + "\n")
    out.flush()


def _plain(value: Any) -> Any:
    """JSON that any reader takes: text keys, bytes as text, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _prediction(fields: Mapping[Any, Any]) -> dict[str, Any]:
    try:
        return decode_prediction(fields).to_dict()
    except ValueError as exc:
        return {"error": f"not a prediction: {exc}"}


def _dead_letter(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """The original fields plus error, src_stream, src_id; a msgpack `data` shown decoded."""
    shown: dict[str, Any] = {}
    for name, value in fields.items():
        key = _text(name)
        if key == "data" and isinstance(value, bytes):
            try:
                shown[key] = msgpack.unpackb(value, raw=False, strict_map_key=False)
                continue
            except Exception:  # not msgpack: shown as text (the reason is in `error`)
                pass
        shown[key] = _text(value)
    return shown


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
