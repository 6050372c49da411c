"""Waiting without hanging: capped, jittered backoff, and sleeps a stop event cuts short."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Capped, jittered exponential backoff."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0) -> None:
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0

    def next_s(self) -> float:
        self.attempt += 1
        return random.uniform(0.5, 1.0) * min(self.cap_s, self.base_s * 2**self.attempt)

    def reset(self) -> None:
        self.attempt = 0


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
