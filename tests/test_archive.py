"""tasks/datasets/archive.py: unsafe or oversized archives are refused before anything is written."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import listing

from tasks.datasets.archive import ArchiveError, ArchiveLimits, extract

GOOD = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 10, "top/empty/": b""}


def write_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]],
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def unix_zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(archives folder, root watched for changes, destination = root/parent/dest)."""
    archives = tmp_path / "archives"
    archives.mkdir()
    root = tmp_path / "root"
    (root / "parent").mkdir(parents=True)
    (root / "parent" / "existing.txt").write_text("keep me")
    return archives, root, root / "parent" / "dest"


def test_zip_extracts_into_new_folder(layout: tuple[Path, Path, Path]) -> None:
    archives, _root, dest = layout
    archive = write_zip(archives / "good.zip", [(name, data) for name, data in GOOD.items()])
    assert extract(archive, dest) == dest
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.bin").read_bytes() == GOOD["top/sub/b.bin"]
    assert (dest / "top/empty").is_dir()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest", "existing.txt"]  # no temp folder left


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_extracts_into_new_folder(layout: tuple[Path, Path, Path], mode: str) -> None:
    archives, _root, dest = layout
    members = [(tar_info("top/empty", tarfile.DIRTYPE), b""), (tar_info("top/a.txt"), b"alpha"),
               (tar_info("top/sub/b.bin"), GOOD["top/sub/b.bin"])]
    archive = write_tar(archives / "good.tar", members, mode)
    extract(archive, dest)
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.bin").read_bytes() == GOOD["top/sub/b.bin"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest", "existing.txt"]


def _zip_traversal(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), ("../x", b"evil")])


def _zip_deep_traversal(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), ("a/../../../x", b"evil")])


def _zip_absolute(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), (zipfile.ZipInfo("/abs/x"), b"evil")])


def _zip_backslash(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), ("..\\x", b"evil")])


def _zip_drive(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), ("C:/x", b"evil")])


def _zip_symlink(p: Path) -> Path:
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), (unix_zip_info("link", stat.S_IFLNK | 0o777), b"/etc")])


def _zip_device(p: Path) -> Path:
    return write_zip(p / "a.zip", [(unix_zip_info("dev", stat.S_IFCHR | 0o600), b"")])


def _zip_duplicate(p: Path) -> Path:
    with pytest.warns(UserWarning, match="Duplicate name"):
        return write_zip(p / "a.zip", [("x.txt", b"one"), ("x.txt", b"two")])


def _zip_bomb(p: Path) -> Path:  # 8 MiB of zeros deflate to ~8 kB: ratio ~1000:1
    return write_zip(p / "a.zip", [("ok.txt", b"ok"), ("zeros.bin", bytes(8 << 20))])


def _tar_traversal(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (tar_info("../x"), b"evil")])


def _tar_absolute(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (tar_info("/abs/x"), b"evil")])


def _tar_symlink(p: Path) -> Path:
    link = tar_info("link", tarfile.SYMTYPE, "ok.txt")
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (link, b"")])


def _tar_symlink_out(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("link", tarfile.SYMTYPE, "/etc/passwd"), b"")])


def _tar_hardlink(p: Path) -> Path:
    hard = tar_info("hard", tarfile.LNKTYPE, "ok.txt")
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (hard, b"")])


def _tar_chardev(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (tar_info("null", tarfile.CHRTYPE), b"")])


def _tar_fifo(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("ok.txt"), b"ok"), (tar_info("pipe", tarfile.FIFOTYPE), b"")])


def _tar_file_and_folder(p: Path) -> Path:
    return write_tar(p / "a.tgz", [(tar_info("a"), b"file"), (tar_info("a/b"), b"under a file")])


REFUSED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zip ../x": (_zip_traversal, r"'\.\.'"),
    "zip a/../../../x": (_zip_deep_traversal, r"'\.\.'"),
    "zip /abs": (_zip_absolute, "absolute"),
    "zip ..\\x": (_zip_backslash, r"'\.\.'"),
    "zip C:/x": (_zip_drive, "absolute"),
    "zip symlink": (_zip_symlink, "symlink"),
    "zip device": (_zip_device, "device"),
    "zip duplicate": (_zip_duplicate, "more than once"),
    "zip bomb": (_zip_bomb, "compression ratio"),
    "tar ../x": (_tar_traversal, r"'\.\.'"),
    "tar /abs": (_tar_absolute, "absolute"),
    "tar symlink": (_tar_symlink, "symlink"),
    "tar symlink out": (_tar_symlink_out, "symlink"),
    "tar hard link": (_tar_hardlink, "hard link"),
    "tar char device": (_tar_chardev, "device"),
    "tar fifo": (_tar_fifo, "device file or FIFO"),
    "tar file and folder": (_tar_file_and_folder, "both a file and a folder"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsafe_archive_is_refused_and_nothing_changes(layout: tuple[Path, Path, Path], case: str) -> None:
    archives, root, dest = layout
    build, reason = REFUSED[case]
    archive = build(archives)
    before = listing(root.parent)
    with pytest.raises(ArchiveError, match=reason) as info:
        extract(archive, dest)
    assert archive.name in str(info.value)
    assert listing(root.parent) == before  # the destination's parent (and above) unchanged


@pytest.fixture(scope="module")
def many_members_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("many") / "many.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(200_000):
            zf.writestr(zipfile.ZipInfo(f"m/{i}"), b"")
    return path


def test_200000_members_are_refused_by_default(layout: tuple[Path, Path, Path],
                                               many_members_zip: Path) -> None:
    _archives, root, dest = layout
    before = listing(root.parent)
    with pytest.raises(ArchiveError, match="200000 members, over the limit of 100000"):
        extract(many_members_zip, dest)
    assert listing(root.parent) == before


def test_tar_member_count_is_capped_without_reading_everything(layout: tuple[Path, Path, Path]) -> None:
    archives, root, dest = layout
    archive = write_tar(archives / "a.tar", [(tar_info(f"f{i}"), b"x") for i in range(50)], "w")
    before = listing(root.parent)
    with pytest.raises(ArchiveError, match="more than 10 members"):
        extract(archive, dest, ArchiveLimits(max_members=10))
    assert listing(root.parent) == before


def test_total_size_is_capped(layout: tuple[Path, Path, Path]) -> None:
    archives, _root, dest = layout
    archive = write_zip(archives / "a.zip", [("a", bytes(600)), ("b", bytes(600))])
    with pytest.raises(ArchiveError, match="1200 bytes uncompressed, over the limit of 1000"):
        extract(archive, dest, ArchiveLimits(max_total_bytes=1000))
    assert not dest.exists()


def test_ratio_limit_lets_ordinary_archives_through(layout: tuple[Path, Path, Path]) -> None:
    archives, _root, dest = layout
    noisy = np.random.default_rng(0).integers(0, 4, 3 << 20, dtype=np.uint8).tobytes()  # ~4:1, not 100:1
    archive = write_zip(archives / "a.zip", [("noise.bin", noisy), ("zeros.bin", bytes(1000))])
    extract(archive, dest)
    assert (dest / "noise.bin").read_bytes() == noisy


def test_corrupt_member_fails_midway_and_leaves_parent_unchanged(layout: tuple[Path, Path, Path]) -> None:
    archives, root, dest = layout
    data = bytes(range(256)) * 64
    archive = write_zip(archives / "a.zip", [("first.bin", data), ("second.bin", data)], zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    at = raw.rfind(data[:64])  # inside the second member's stored bytes
    raw[at + 10] ^= 0xFF
    archive.write_bytes(bytes(raw))
    before = listing(root.parent)
    with pytest.raises(ArchiveError, match="cannot extract"):
        extract(archive, dest)
    assert listing(root.parent) == before


def test_existing_destination_is_refused(layout: tuple[Path, Path, Path]) -> None:
    archives, _root, dest = layout
    dest.mkdir()
    archive = write_zip(archives / "a.zip", [("a.txt", b"a")])
    with pytest.raises(ArchiveError, match="already exists"):
        extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_not_an_archive(layout: tuple[Path, Path, Path]) -> None:
    archives, _root, dest = layout
    junk = archives / "junk.zip"
    junk.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(ArchiveError, match="neither a zip nor a tar"):
        extract(junk, dest)
