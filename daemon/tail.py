"""`livepred tail`: a running daemon's newest predictions (or dead letters), decoded, as JSON
lines; with `follow`, the new ones as they come. Reads only: no group, nothing acknowledged."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

import msgpack
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from daemon.client import read_in_slices, stream_keys, stream_rows
from daemon.entries import as_str, id_key
from daemon.redis_faults import refuses_the_config
from daemon.wire_events import decode_prediction

if TYPE_CHECKING:
    from daemon.settings import Settings

FOLLOW_BLOCK_MS = 1000
FOLLOW_COUNT = 100  # entries per stream and read while following
OUTAGE_RETRY_S = 1.0

Row = tuple[tuple[int, int], str, str, Any]  # (id order, stream, entry id, fields)

# Redis away for now (a restart, a dropped connection, a cluster without a node answering):
# following waits. A refusal of the configuration itself (a wrong password) does not pass.
_OUTAGE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)


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
    `follow`, every new one in entry order until `stop()` says so. With `follow` a Redis
    outage, at the start too, is waited out, said in one line on `notes`; without, its
    error is raised. An entry that is not what the stream should hold prints as a line
    with `error` (and its fields as they are), never stops it. Returns the lines printed."""
    s = settings.streams
    keys = stream_keys(s.dead_letter if dead else s.output, s.partitions, settings.redis.cluster)
    show = _dead_letter if dead else _prediction
    outage = _Outage(notes)
    while True:
        try:
            newest = await _newest(redis, keys, count)
            break
        except _OUTAGE as exc:
            if not follow or refuses_the_config(exc):
                raise
            await outage.wait(exc)
            if stop():
                return 0
    after = dict.fromkeys(keys, "0-0")  # an empty stream: everything in it later is new
    for _, key, entry_id, _fields in newest:
        after[key] = entry_id  # sorted: the last one of each stream wins
    printed = 0
    for _, key, entry_id, fields in newest[-count:] if count else []:
        _print(out, key, entry_id, show, fields)
        printed += 1
    while follow and not stop():
        try:
            rows = await _read_after(redis, keys, after, settings.redis.cluster)
        except _OUTAGE as exc:
            if refuses_the_config(exc):
                raise
            await outage.wait(exc)
            continue
        outage.over()
        for _, key, entry_id, fields in rows:
            _print(out, key, entry_id, show, fields)
            after[key] = entry_id
            printed += 1
    return printed


class _Outage:
    """Says a Redis outage once (not once per retry), and waits before the next try."""

    def __init__(self, notes: TextIO) -> None:
        self.notes = notes
        self.said = False

    async def wait(self, exc: BaseException) -> None:
        if not self.said:
            print(f"livepred tail: Redis: {exc}; retrying", file=self.notes, flush=True)
            self.said = True
        await asyncio.sleep(OUTAGE_RETRY_S)

    def over(self) -> None:
        self.said = False


async def _newest(redis: Any, keys: list[str], count: int) -> list[Row]:
    """The newest `count` (at least one) entries of each stream, all in entry order."""
    newest: list[Row] = []
    for key in keys:
        for entry_id, fields in await redis.xrevrange(key, count=max(count, 1)):
            newest.append((id_key(as_str(entry_id)), key, as_str(entry_id), fields))
    newest.sort(key=lambda row: (row[0], row[1]))
    return newest


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


def _print(
    out: TextIO, key: str, entry_id: str, show: Callable[[Any], dict[str, Any]], fields: Any
) -> None:
    """One JSON line for an entry, whatever it holds: one that `show` cannot make a line of
    (nesting too deep for JSON, say) prints as a line saying so."""
    try:
        text = json.dumps({"stream": key, "id": entry_id, **_plain(show(fields))},
                          allow_nan=False)
    except Exception as exc:  # any entry: tail goes on
        text = json.dumps({"stream": key, "id": entry_id,
                           "error": f"cannot be shown: {type(exc).__name__}: {exc}"})
    out.write(text + "\n")
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
    """The wire map of a valid prediction, as written; any other entry: `error` and its
    fields as they are (a msgpack `data` decoded), never a value rewritten to look valid."""
    try:
        return decode_prediction(fields).to_dict()
    except ValueError as exc:
        return {"error": f"not a prediction: {exc}", "fields": _dead_letter(fields)}


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
