"""The Redis keys of each partition (`bars` -> `bars:{3}`) and a symbol's partition
(CONTRACT section 9)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.settings import Settings


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The Redis keys of one partition; `partition` is None for unsuffixed keys."""

    partition: int | None
    inputs: tuple[str, ...]
    output: str
    dead_letter: str
    lease_key: str
    preferred: bool = True  # False: stand by, take it only when free, hand it back on request
    # Where a preferred instance asks the holder to hand it back (derived from lease_key).
    handback_key: str = field(default="", compare=False)


def partition_key(name: str, partition: int | None) -> str:
    """`bars` -> `bars:{3}` for partition 3; unchanged for None (unpartitioned)."""
    return name if partition is None else f"{name}:{{{partition}}}"


def partition_for_symbol(symbol: str, partitions: int) -> int:
    """The partition a feeder sends `symbol` to: crc32 of its UTF-8 bytes mod `partitions`."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1 (got {partitions})")
    return zlib.crc32(symbol.encode()) % partitions


def partition_keys(settings: Settings) -> list[PartitionKeys]:
    """The keys of every partition this instance owns (all of them for `partitions_owned = []`)."""
    streams = settings.streams
    owned: tuple[int | None, ...] = settings.owned_partitions if settings.partitioned else (None,)
    preferred = set(streams.partitions_preferred)
    return [
        PartitionKeys(
            partition=p,
            inputs=tuple(partition_key(name, p) for name in streams.input),
            output=partition_key(streams.output, p),
            dead_letter=partition_key(streams.dead_letter, p),
            lease_key=partition_key(f"{streams.group}:lease", p),
            preferred=not preferred or p in preferred,
            handback_key=partition_key(f"{streams.group}:handback", p),
        )
        for p in owned
    ]
