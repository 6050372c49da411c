"""sha256 of model artifacts as the run's manifest records them (CONTRACT section 2): a file's,
or a directory's tree hash (a SavedModel); cached while a file's size, mtime and inode hold."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_HASH_CHUNK_BYTES = 1 << 20
_hash_cache: dict[tuple[str, int, int, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in chunks; cached while its size, mtime and inode hold."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


def tree_sha256(directory: Path) -> str:
    """sha256 of a directory (a SavedModel `model/`): over its regular files sorted by relative
    POSIX path, the lines `<relative path>\\0<file sha256 hex>\\n`, UTF-8 encoded."""
    files = sorted(
        (path.relative_to(directory).as_posix(), path)
        for path in directory.rglob("*")
        if path.is_file()
    )
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(f"{rel}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def artifact_sha256(path: Path) -> str:
    """The checksum the manifest and `model_checksum` use: a file's sha256, a directory's tree hash."""
    return tree_sha256(path) if path.is_dir() else file_sha256(path)
