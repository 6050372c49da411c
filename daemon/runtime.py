"""The process's garbage collector, set for a long-running daemon with large frameworks.

TensorFlow, torch and the models leave ~500,000 objects that live as long as the process.
CPython's cyclic collector would walk them again in every full collection, and its young
generation is collected every 700 container allocations, while one batch of 512 bars
allocates tens of thousands (reply lists, decoded maps). Measured on the benchmark's drain
at 10,000 symbols: the state rebuild went from ~85,000 to ~215,000 bars/s and the drain from
~39,000 to ~55,000-62,000 bars/s with both changes below. Memory stays flat: the garbage of
a batch has no cycles and is freed by reference counting at once.
"""

from __future__ import annotations

import gc

# Young generation every 50,000 net container allocations (CPython's default: 700); a full
# collection every 100 young ones (only what is not frozen is walked, so it stays cheap),
# which bounds how long cyclic garbage can wait.
GC_THRESHOLD = (50_000, 10, 10)


def settle_heap(*, thaw: bool = False) -> None:
    """Once the models are loaded: collect, then move every object alive now out of the
    collector's view (`gc.freeze`), and raise the young threshold. `thaw` (after a reload):
    first make the frozen objects collectable again, so the old models' cycles are freed;
    that collection walks the whole heap (~0.1-0.3 s with TensorFlow and torch loaded)."""
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
