"""Silence what C++ libraries print straight to file descriptor 2 (TensorFlow's start-up
banner, written before its logging is set up and so deaf to TF_CPP_MIN_LOG_LEVEL), so a
daemon's stderr stays one JSON event per line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Point fd 2 at /dev/null for the block; Python's own sys.stderr writes go there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
