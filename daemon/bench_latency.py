"""The benchmark's latencies from its feeder's and reader's records: per bar, XADD sent to output
seen, and the same split by Redis's own clock (pure: no Redis, no processes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latencies_ms(
    sent_ids: Sequence[str],
    sent_us: Sequence[int],
    seen_ids: Sequence[str],
    seen_us: Sequence[int],
) -> tuple[np.ndarray, int]:
    """Per fed bar: output visible - XADD sent, in ms (feed order); and how many had no output."""
    seen = dict(zip(seen_ids, seen_us, strict=True))
    out = np.full(len(sent_ids), np.nan)
    for k, (entry_id, sent) in enumerate(zip(sent_ids, sent_us, strict=True)):
        got = seen.get(entry_id)
        if got is not None:
            out[k] = (got - sent) / 1000.0
    missing = int(np.isnan(out).sum())
    return out, missing


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def server_split_ms(
    sent_ids: Sequence[str],
    seen_ids: Sequence[str],
    out_ids: Sequence[str],
    seen_us: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Per fed bar (feed order), the latency split by Redis's own clock, read off the entry
    ids Redis assigned (milliseconds): input XADD -> output XADD (waiting in the stream plus
    the daemon), and output XADD -> seen by the reader (the reader's wake-up and read). NaN
    where a bar has no output. Whole milliseconds: a coarse split, not a timing."""
    seen = {i: (o, t) for i, o, t in zip(seen_ids, out_ids, seen_us, strict=True)}
    daemon = np.full(len(sent_ids), np.nan)
    reader = np.full(len(sent_ids), np.nan)
    for k, entry_id in enumerate(sent_ids):
        got = seen.get(entry_id)
        if got is not None:
            out_ms = _entry_ms(got[0])
            daemon[k] = out_ms - _entry_ms(entry_id)
            reader[k] = got[1] / 1000.0 - out_ms
    return daemon, reader
