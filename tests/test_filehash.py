"""The file-hash cache (tasks/datasets/filehash.py) never answers with the hash of content a file no longer has."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from tasks.datasets.filehash import FileHashes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_tick(after: list[Path], probe: Path) -> None:
    """Wait until the filesystem's clock has moved past the files' times (a tick is a few ms): files written in
    the tick the cache opens in are, rightly, not remembered (test_a_file_written_after_the_run_began...)."""
    newest = max(max(f.stat().st_mtime_ns, f.stat().st_ctime_ns) for f in after)
    for _ in range(400):
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns > newest:
            return
        time.sleep(0.005)
    raise AssertionError("the filesystem clock did not move in 2 s")


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        out.append(tmp_path / f"f{i}.bin")
        out[-1].write_bytes(bytes([i]) * 1000)
    next_tick(out, tmp_path / "probe")
    return out


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, files: list[Path]) -> None:
    db = tmp_path / "cache" / "h.sqlite"
    with FileHashes(db) as first:
        assert [first.sha256(f) for f in files] == [sha(f.read_bytes()) for f in files]
    assert (first.hashed, first.reused) == (3, 0)
    with FileHashes(db) as again:
        assert [again.sha256(f) for f in files] == [sha(f.read_bytes()) for f in files]
    assert (again.hashed, again.reused) == (0, 3)


def test_new_content_with_the_old_size_and_mtime_is_read_again(tmp_path: Path, files: list[Path]) -> None:
    db = tmp_path / "h.sqlite"
    with FileHashes(db) as hashes:
        hashes.sha256(files[0])
    old = files[0].stat()
    shutil.copyfile(files[1], files[0])  # same inode, same size
    os.utime(files[0], ns=(old.st_atime_ns, old.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it
    next_tick(files, tmp_path / "probe")
    with FileHashes(db) as hashes:
        assert hashes.sha256(files[0]) == sha(files[1].read_bytes())
    assert hashes.hashed == 1
    with FileHashes(db) as hashes:  # and the new hash is what is remembered
        assert hashes.sha256(files[0]) == sha(files[1].read_bytes())
    assert hashes.reused == 1


def test_a_file_written_after_the_run_began_is_not_remembered(tmp_path: Path, files: list[Path]) -> None:
    # It may change again within the same clock tick without its times changing: hash it again next time.
    with FileHashes(tmp_path / "h.sqlite") as hashes:
        files[0].write_bytes(b"written while the cache was open")
        assert hashes.sha256(files[0]) == sha(b"written while the cache was open")
        assert hashes.sha256(files[0]) == sha(b"written while the cache was open")
    assert (hashes.hashed, hashes.reused) == (2, 0)


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path, files: list[Path]) -> None:
    db = tmp_path / "h.sqlite"
    db.write_bytes(b"this is not an SQLite database" * 100)
    with FileHashes(db) as hashes:
        assert hashes.sha256(files[0]) == sha(files[0].read_bytes())
    with FileHashes(db) as hashes:
        assert hashes.sha256(files[0]) == sha(files[0].read_bytes())
    assert hashes.reused == 1


def test_without_a_usable_cache_every_file_is_read(tmp_path: Path, files: list[Path]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with FileHashes(blocker / "h.sqlite") as hashes:  # its folder cannot be made
        assert [hashes.sha256(f) for f in files * 2] == [sha(f.read_bytes()) for f in files * 2]
    assert hashes.hashed == 6


def test_a_missing_file_raises_oserror(tmp_path: Path) -> None:
    with FileHashes(tmp_path / "h.sqlite") as hashes, pytest.raises(OSError):
        hashes.sha256(tmp_path / "absent")
