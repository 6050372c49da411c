"""Artifact checksums (`handlers.artifact_hash`): a file's sha256 as hashlib computes it,
cached while the file is unchanged and recomputed when it changes; a directory's tree hash,
stable and sensitive to names as well as bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from handlers.artifact_hash import artifact_sha256, file_sha256, tree_sha256


def test_file_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    data = os.urandom(3 << 20)  # more than one read chunk
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert artifact_sha256(path) == file_sha256(path)


def test_hashes_are_cached_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.txt"
    path.write_bytes(b"first")
    first = file_sha256(path)
    with monkeypatch.context() as m:
        m.setattr(Path, "open", lambda *a, **k: pytest.fail("re-read a hashed file"))
        assert file_sha256(path) == first
    path.write_bytes(b"second, longer")  # another size (and mtime): hashed again
    assert file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


def test_tree_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    (tmp_path / "y").write_bytes(b"2")
    first = tree_sha256(tmp_path)
    assert tree_sha256(tmp_path) == first
    assert artifact_sha256(tmp_path) == first
    expected = hashlib.sha256(
        f"a/x\0{hashlib.sha256(b'1').hexdigest()}\ny\0{hashlib.sha256(b'2').hexdigest()}\n".encode()
    ).hexdigest()
    assert first == expected  # the documented definition, computed independently
    (tmp_path / "y").rename(tmp_path / "z")  # same bytes, another name
    assert tree_sha256(tmp_path) != first
