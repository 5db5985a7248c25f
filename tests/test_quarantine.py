"""Ingest quarantines exactly the broken images of a real-sized folder and keeps every other one."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dataset_fixtures import build_custom_folder, make_params

from tasks import download, manifest
from tasks.config import SourceConfig


def test_one_percent_corrupt_images_are_quarantined_with_reasons(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # as a stage runs in its project: the file-hash cache (.cache/) is the test's own
    folder = tmp_path / "photos"
    table, bad = build_custom_folder(folder, images=1000, corrupt=10, fmt="JPEG")
    assert len(bad) == 10
    kinds = {(folder / b).read_bytes()[:2] for b in bad}
    assert b"" in kinds and b"\xff\xd8" in kinds and b"no" in kinds  # zero bytes, truncated JPEG, text
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))}, workers=2)

    download.run(params, params.raw_dir())
    counts = manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())

    assert counts["images"] == 990 and counts["quarantined"] == 10
    quarantined = pq.read_table(params.quarantine_path()).to_pylist()
    expected = {(folder / b).resolve().as_posix() for b in bad}
    assert {Path(r["path"]).as_posix() for r in quarantined} == expected
    assert all(r["reason"] for r in quarantined)
    reasons = " | ".join(r["reason"] for r in quarantined)
    assert "empty file" in reasons and "truncated" in reasons and "not an image" in reasons
    kept = pq.read_table(params.manifest_path()).to_pylist()
    assert len(kept) == 990 and not {r["path"] for r in kept} & expected
    assert all(r["width"] == 16 and r["height"] == 32 for r in kept)
