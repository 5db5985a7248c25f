"""A user's own data (dataset.name custom) is in DVC's view: the user's table and every image it lists are inputs
of the download stage, through the `fingerprint` stage, so that editing either re-runs what depends on it.

A real DVC project (tests/micro_project.py) with a custom table of 12 BMP images outside it, reproduced up to the
manifest stage. Reproduced before: removing rows from the table, or overwriting an image, left `dvc status` up to
date and `dvc repro` skipping every stage."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dataset_fixtures import build_custom_folder

from tests.micro_project import dvc, make_project

IMAGES = 12  # 3 people x 2 cameras x 2 images (build_custom_folder: person i // 4, camera i % 2)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(project, the user's table): the table and images live outside the project, as a user's do."""
    root = tmp_path_factory.mktemp("custom")
    # BMP: every image of one size has the same byte length, so an overwrite can keep the size
    table, _ = build_custom_folder(root / "photos", images=IMAGES, corrupt=0, fmt="BMP")
    project = make_project(root, {"dataset": {"name": "custom"}, "sources": {"custom": {"url": str(table)}}})
    out = dvc(project, "repro", "manifest")
    assert ran(out) == {"fingerprint", "download", "manifest"}, out
    return project, table


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


def manifest_rows(project: Path) -> list[dict]:
    return pq.read_table(project / "data/manifests/custom.parquet").to_pylist()


def stale(project: Path) -> set[str]:
    """Stages `dvc status` reports, after `dvc repro fingerprint` brought the fingerprint up to date: DVC can
    only compare the user's files once that stage has read them (it reports itself as always changed)."""
    dvc(project, "repro", "fingerprint")
    out = dvc(project, "status", "manifest", "--with-deps")  # the stages these tests run
    assert re.search(r"^fingerprint:\n\s+always changed", out, flags=re.M), out
    return set(re.findall(r"^(\w+):", out, flags=re.M)) - {"fingerprint"}


def test_an_unchanged_repro_skips_download_and_reads_no_image_again(project: tuple[Path, Path]) -> None:
    root, _ = project
    out = dvc(root, "repro", "manifest")
    assert ran(out) == {"fingerprint"}, out
    assert "Stage 'download' didn't change, skipping" in out and "Stage 'manifest' didn't change, skipping" in out
    # The table and every image come from the file-hash cache: none is read (the stage's cost is a stat each).
    assert re.search(rf"fingerprint: custom, {IMAGES + 1} source files \(0 read, {IMAGES + 1} unchanged", out), out
    assert stale(root) == set()


def test_removing_rows_from_the_table_reruns_download_and_manifest(project: tuple[Path, Path]) -> None:
    root, table = project
    lines = table.read_text().splitlines()
    before = len(manifest_rows(root))
    table.write_text("\n".join(lines[: 1 + 8]) + "\n")  # header + the first 8 rows: 2 people, both views
    assert before > 8
    assert stale(root) == {"download"}  # manifest follows once download has written the new table
    status = dvc(root, "status", "manifest", "--with-deps")
    assert re.search(r"^download:\n\s+changed deps:\n\s+modified:\s+data/manifests/custom-fingerprint\.json",
                     status, flags=re.M), status
    out = dvc(root, "repro", "manifest")
    assert {"download", "manifest"} <= ran(out), out
    assert len(manifest_rows(root)) == 8
    assert stale(root) == set()


def test_overwriting_one_image_reruns_download_and_manifest(project: tuple[Path, Path]) -> None:
    root, table = project
    photos = table.parent
    target, other = photos / "imgs/0000.jpg", photos / "imgs/0003.jpg"
    old = target.stat()
    assert other.stat().st_size == old.st_size and other.read_bytes() != target.read_bytes()
    # Same size, and the old mtime put back (as `cp -p` or `rsync -t` do): only the content and ctime differ.
    shutil.copyfile(other, target)
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert target.stat().st_mtime_ns == old.st_mtime_ns and target.stat().st_size == old.st_size
    assert stale(root) == {"download"}  # manifest follows once download has written the new table
    out = dvc(root, "repro", "manifest")
    assert {"download", "manifest"} <= ran(out), out
    hashes = {Path(r["path"]).name: r["content_hash"] for r in manifest_rows(root)}
    assert hashes["0000.jpg"] == hashlib.sha256(target.read_bytes()).hexdigest() == hashes["0003.jpg"]
    assert stale(root) == set()
