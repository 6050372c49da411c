"""`livepred tail`: a running daemon's newest predictions (or dead letters), decoded, as JSON
lines; with `follow`, the new ones as they come. Reads only: no group, nothing acknowledged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import msgpack

from daemon.client import stream_keys
from daemon.entries import as_str, id_key
from daemon.settings import Settings
from daemon.wire_events import decode_prediction

FOLLOW_BLOCK_MS = 1000


async def tail(
    redis: Any,
    settings: Settings,
    out: TextIO,
    *,
    count: int = 10,
    follow: bool = False,
    dead: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Print the newest `count` entries of every partition merged, oldest first; then, with
    `follow`, every new one until `stop()` says so. Returns the entries printed."""
    s = settings.streams
    keys = stream_keys(s.dead_letter if dead else s.output, s.partitions, settings.redis.cluster)
    show = _dead_letter if dead else _prediction
    newest: list[tuple[tuple[int, int], str, str, Any]] = []
    after = {key: "0-0" for key in keys}
    for key in keys:
        entries = await redis.xrevrange(key, count=count) if count else []
        for entry_id, fields in entries:
            newest.append((id_key(as_str(entry_id)), key, as_str(entry_id), fields))
        if not entries and follow:
            # Nothing there yet: follow from the end as it is now (not from the start of a
            # stream another process fills meanwhile).
            last = await redis.xrevrange(key, count=1)
            after[key] = as_str(last[0][0]) if last else "0-0"
    newest.sort()
    printed = 0
    for _, key, entry_id, fields in newest[-count:] if count else []:
        _print(out, key, entry_id, show(fields))
        printed += 1
    for _, key, entry_id, _fields in newest:
        if id_key(entry_id) > id_key(after[key]):
            after[key] = entry_id
    while follow and not stop():
        replies = await asyncio.gather(*(
            redis.xread({key: after[key]}, count=100, block=FOLLOW_BLOCK_MS) for key in keys
        )) if settings.redis.cluster else [
            await redis.xread(dict(after), count=100, block=FOLLOW_BLOCK_MS)
        ]
        rows = sorted(
            (id_key(as_str(entry_id)), as_str(stream), as_str(entry_id), fields)
            for reply in replies
            for stream, entries in _streams(reply)
            for entry_id, fields in entries
        )
        for _, key, entry_id, fields in rows:
            _print(out, key, entry_id, show(fields))
            after[key] = entry_id
            printed += 1
    return printed


def _streams(reply: Any) -> list[tuple[Any, Any]]:
    if not reply:
        return []
    return list(reply.items()) if isinstance(reply, dict) else list(reply)


def _print(out: TextIO, key: str, entry_id: str, body: Mapping[str, Any]) -> None:
    out.write(json.dumps({"stream": key, "id": entry_id, **body}, default=str) + "\n")
    out.flush()


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
                shown[key] = msgpack.unpackb(value, raw=False)
                continue
            except Exception:  # not msgpack: shown as text (the reason is in `error`)
                pass
        shown[key] = _text(value)
    return shown


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
