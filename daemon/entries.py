"""What a read hands over and what a batch writes: stream entries as plain data.

Pure: no Redis, no asyncio. `daemon.streams` fills these from Redis's replies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.wire_columns import field_map

Fields = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    entry_id: str
    fields: Fields
    deliveries: int = 1


@dataclass(slots=True)
class EntryBatch:
    """The entries of one read as parallel lists (no object per entry on the hot path).
    `fields[i]` is Redis's flat [field, value, ...] list, or a mapping."""

    streams: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    fields: list[Any] = field(default_factory=list)
    deliveries: list[int] | None = None  # None: each delivered once
    epoch: int = 0  # StreamIO.group_epoch when read (see there); set by every reader

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Entry]:
        counts = self.deliveries or [1] * len(self.ids)
        for stream, entry_id, fields, n in zip(
            self.streams, self.ids, self.fields, counts, strict=True
        ):
            yield Entry(stream, entry_id, field_map(fields), n)

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> EntryBatch:
        return cls(
            [e.stream for e in entries],
            [e.entry_id for e in entries],
            [e.fields for e in entries],
            [e.deliveries for e in entries],
        )

    @classmethod
    def join(cls, batches: Sequence[EntryBatch]) -> EntryBatch:
        """Several reads as one batch, in read order."""
        if len(batches) == 1:
            return batches[0]
        deliveries = None
        if any(b.deliveries is not None for b in batches):
            deliveries = [n for b in batches for n in (b.deliveries or [1] * len(b))]
        return cls(
            [s for b in batches for s in b.streams],
            [i for b in batches for i in b.ids],
            [f for b in batches for f in b.fields],
            deliveries,
            min(b.epoch for b in batches),
        )

    def acks(self) -> dict[str, list[str]]:
        """Entry ids by input stream, in order."""
        if not self.ids:
            return {}
        first = self.streams[0]
        if self.streams.count(first) == len(self.streams):
            return {first: list(self.ids)}
        out: dict[str, list[str]] = {}
        for stream, entry_id in zip(self.streams, self.ids, strict=True):
            out.setdefault(stream, []).append(entry_id)
        return out


@dataclass(slots=True)
class Commit:
    """What one batch writes: outputs, dead letters, and the entries to ack."""

    outputs: list[tuple[bytes, bytes]]  # (symbol, msgpack data)
    dead: list[dict[bytes, bytes]]
    acks: dict[str, list[str]]  # input stream -> entry ids
    epoch: int = 0  # the group epoch its entries were read in


def as_str(value: bytes | str) -> str:
    """A name or id as str, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else value


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("ms-seq", or "ms") as a key that sorts like Redis orders ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def row_ids(rows: Sequence[Any]) -> list[str]:
    """The entry ids of [[id, fields], ...] rows."""
    try:
        return [i.decode() for i, _ in rows]
    except AttributeError:  # a client that decodes responses
        return [as_str(i) for i, _ in rows]


def read_batch(reply: Any) -> EntryBatch:
    """Entries from an XREADGROUP reply as Redis sent it, directly or through a script:
    [[stream, [[id, [f, v, ...]], ...]], ...] (some emulations flatten it to [stream, rows,
    stream, rows, ...]; RESP3 sends a map)."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    elif reply and isinstance(reply[0], bytes | str):
        pairs = list(zip(reply[0::2], reply[1::2], strict=True))
    else:
        pairs = [(item[0], item[1]) for item in reply or ()]
    out = EntryBatch()
    for stream, rows in pairs:
        if not rows:
            continue
        out.streams += [as_str(stream)] * len(rows)
        out.ids += row_ids(rows)
        out.fields += [f or [] for _, f in rows]
    return out


def entries_of(reply: Any) -> list[Entry]:
    """Entries from an XREADGROUP reply parsed by redis-py (pending ones may have no fields)."""
    out: list[Entry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, rows in items:
        name = as_str(stream)
        for entry_id, fields in rows:
            # A pending entry deleted from the stream (XDEL/trim) comes back with no fields.
            out.append(Entry(name, as_str(entry_id), fields if fields is not None else {}))
    return out
