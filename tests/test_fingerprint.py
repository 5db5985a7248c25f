"""Stage `fingerprint`: its output changes exactly when a file download reads from outside DVC's view changes
(the DVC-level behaviour for a custom table is in tests/test_custom_data_in_dvc.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from dataset_fixtures import build_custom_folder, make_params

from tasks import fingerprint
from tasks.config import Params, SourceConfig
from tests.micro_project import micro_params


def fingerprint_of(tmp_path: Path, params: Params) -> str:
    out = tmp_path / "fp.json"
    fingerprint.run(params, out, tmp_path / "cache.sqlite")
    return out.read_text()


def test_synthetic_has_no_source_files_and_a_stable_fingerprint(tmp_path: Path) -> None:
    params = make_params(tmp_path, "synthetic")
    first = fingerprint_of(tmp_path, params)
    assert json.loads(first)["files"] == 0
    assert fingerprint_of(tmp_path, params) == first


def test_a_hand_placed_archive_without_md5_is_hashed(tmp_path: Path) -> None:
    source = SourceConfig(url="", md5="", filename="CAVIAR4REID.zip")
    params = make_params(tmp_path, "caviar", {"caviar": source})
    empty = fingerprint_of(tmp_path, params)
    params.downloads_dir().mkdir(parents=True)
    archive = params.downloads_dir() / "CAVIAR4REID.zip"
    archive.write_bytes(b"first archive")
    placed = fingerprint_of(tmp_path, params)
    archive.write_bytes(b"other archive")
    assert len({empty, placed, fingerprint_of(tmp_path, params)}) == 3
    assert json.loads(placed)["files"] == 1


def test_an_archive_pinned_by_md5_is_left_to_download(tmp_path: Path) -> None:
    source = SourceConfig(url="", md5="0" * 32, filename="CAVIAR4REID.zip")
    params = make_params(tmp_path, "caviar", {"caviar": source})
    params.downloads_dir().mkdir(parents=True)
    (params.downloads_dir() / "CAVIAR4REID.zip").write_bytes(b"archive")
    assert json.loads(fingerprint_of(tmp_path, params))["files"] == 0  # params.sources pins it (download checks)


def test_custom_covers_the_table_and_each_listed_image(tmp_path: Path) -> None:
    table, _ = build_custom_folder(tmp_path / "mine", images=6, corrupt=0, fmt="PNG")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    first = fingerprint_of(tmp_path, params)
    assert json.loads(first)["files"] == 7
    (tmp_path / "mine/imgs/0005.jpg").write_bytes((tmp_path / "mine/imgs/0004.jpg").read_bytes())
    second = fingerprint_of(tmp_path, params)
    table.write_text("\n".join(table.read_text().splitlines()[:4]) + "\n")
    third = fingerprint_of(tmp_path, params)
    assert len({first, second, third}) == 3 and json.loads(third)["files"] == 4


@pytest.mark.parametrize(("url", "files"), [("https://example.org/t.csv", 0), ("{tmp}/absent.csv", 0),
                                            ("{tmp}/broken.csv", 1)])
def test_a_table_download_will_refuse_does_not_fail_the_fingerprint(tmp_path: Path, url: str, files: int) -> None:
    (tmp_path / "broken.csv").write_text("not,a\n\"table")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=url.format(tmp=tmp_path))})
    assert json.loads(fingerprint_of(tmp_path, params))["files"] == files


def test_the_pretrained_record_follows_the_files_content_not_its_name(tmp_path: Path) -> None:
    weights = tmp_path / "resnet.pth"
    weights.write_bytes(b"first weights")
    params = micro_params({"model": {"pretrained_path": str(weights)}})
    out = tmp_path / "pretrained.json"
    first = fingerprint.pretrained(params, out, tmp_path / "cache.sqlite")
    assert first["sha256"] == hashlib.sha256(b"first weights").hexdigest()
    assert json.loads(out.read_text()) == first
    weights.write_bytes(b"other weights")  # same path, new content: the train stage's dep must change
    assert fingerprint.pretrained(params, out, tmp_path / "cache.sqlite")["sha256"] != first["sha256"]
    weights.unlink()
    assert fingerprint.pretrained(params, out, tmp_path / "cache.sqlite")["sha256"].startswith("unreadable")
    assert fingerprint.pretrained(micro_params(), out, tmp_path / "cache.sqlite") == {"pretrained_path": None,
                                                                                     "sha256": None}
