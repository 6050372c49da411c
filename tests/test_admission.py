"""The checks before a model loads: interval, a pickle's leave to run, sha256 records."""

from __future__ import annotations

import hashlib
from pathlib import Path

from handlers.admission import checksum_refusal, interval_refusal, pickle_refusal


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_interval_is_checked_only_when_both_sides_say_one() -> None:
    assert interval_refusal(5.0, 0) is None  # models.interval_minutes = 0: not checked
    assert interval_refusal(None, 5.0) is None  # the meta does not say
    assert interval_refusal(5.0, 5.0) is None
    reason = interval_refusal(1.0, 5.0)
    assert reason is not None
    assert "trained on 1-minute bars" in reason and "models.interval_minutes = 5" in reason


def test_pickles_need_leave_and_a_file_only_the_owner_can_write(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(b"not read by the check")
    path.chmod(0o644)
    assert pickle_refusal(path, "t/model.pkl", allow_pickle=True) is None
    refused = pickle_refusal(path, "t/model.pkl", allow_pickle=False)
    assert refused is not None and "t/model.pkl" in refused and "models.allow_pickle" in refused
    for mode in (0o664, 0o646):
        path.chmod(mode)
        writable = pickle_refusal(path, "t/model.pkl", allow_pickle=True)
        assert writable is not None
        assert f"mode {mode:o}" in writable and f"chmod go-w {path}" in writable


def test_checksums_of_the_family_artifacts_and_the_model_file(tmp_path: Path) -> None:
    family = tmp_path / "targets" / "t" / "models" / "view=V" / "family=A"
    family.mkdir(parents=True)
    model = family / "model.txt"
    model.write_bytes(b"trees")
    (family / "model_meta.json").write_bytes(b"{}")
    rel = "targets/t/models/view=V/family=A"
    good = {f"{rel}/model.txt": sha(b"trees"), f"{rel}/model_meta.json": sha(b"{}")}
    # another family's record is not this family's business, even when wrong
    other = {"targets/t/models/view=V/family=AB/model.txt": "0" * 64}

    def refusal(artifacts: dict[str, str], checksum: str | None = None) -> str | None:
        return checksum_refusal(tmp_path, rel, artifacts, model, f"{rel}/model.txt", checksum)

    assert refusal({**good, **other}) is None
    assert refusal(good, sha(b"trees")) is None
    wrong = refusal({**good, f"{rel}/model.txt": sha(b"other trees")})
    assert wrong is not None
    assert wrong.startswith(f"sha256 mismatch for {rel}/model.txt: manifest.json artifacts says")
    assert sha(b"other trees")[:12] in wrong and sha(b"trees")[:12] in wrong
    missing = refusal({**good, f"{rel}/scaler.json": sha(b"")})
    assert missing == f"manifest.json lists {rel}/scaler.json, which is missing"
    meta_wrong = refusal({}, sha(b"tree"))
    assert meta_wrong is not None and "model_meta.json model_checksum" in meta_wrong
