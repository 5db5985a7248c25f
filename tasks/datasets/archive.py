"""Safe extraction of zip and tar archives downloaded from the internet.

Every member is checked before anything is written (refused: absolute paths, drive letters, ``..``
components, symlinks, hard links, device files and FIFOs, encrypted zip members, duplicate paths), and
the archive as a whole is checked against :class:`ArchiveLimits` (member count, total uncompressed
size, compression ratio: zip has no bomb protection of its own). Extraction then goes to a temporary
folder next to the destination, which is renamed into place only once every byte is written, so a
refused or failing archive leaves the destination's parent exactly as it was, and nothing is ever
written outside the destination. Tar members are additionally extracted with ``filter="data"``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tasks.datasets.base import DatasetError

CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(DatasetError):
    """The archive is refused (unsafe or over a limit) or could not be extracted."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_total_bytes: int = 32 * 2**30  # uncompressed
    max_ratio: float = 100.0  # uncompressed / compressed, per zip member and for the whole archive
    ratio_floor: int = 1 << 20  # ratios are only checked once this many uncompressed bytes are involved


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]  # safe relative path components
    is_dir: bool
    size: int


def extract(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract `archive` (zip or tar, optionally compressed) into the new folder `dest`; return `dest`.

    `dest` must not exist yet; its parent must. Raises :class:`ArchiveError` naming the archive and,
    where there is one, the offending member.
    """
    limits = limits or ArchiveLimits()
    if dest.exists() or dest.is_symlink():
        raise ArchiveError(f"{dest}: already exists; refusing to extract {archive.name} over it")
    if not dest.parent.is_dir():
        raise ArchiveError(f"{dest.parent}: no such folder to extract {archive.name} into")
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest, limits)
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError as exc:
        raise ArchiveError(f"{archive}: unreadable: {exc}") from exc
    if is_tar:
        return _extract_tar(archive, dest, limits)
    raise ArchiveError(f"{archive}: neither a zip nor a tar archive")


# --- checks shared by both formats ------------------------------------------------------------------

def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    if "\x00" in name:
        raise ArchiveError(f"{archive.name}: member {name!r} has a NUL byte in its name")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member {name!r} has a '..' component (path traversal)")
    return parts


def _check_totals(archive: Path, members: list[_Member], limits: ArchiveLimits) -> None:
    seen: dict[tuple[str, ...], bool] = {}
    for m in members:
        if m.parts in seen and not (m.is_dir and seen[m.parts]):
            raise ArchiveError(f"{archive.name}: member {'/'.join(m.parts)!r} appears more than once")
        seen[m.parts] = m.is_dir
    for m in members:  # a file may not also be a parent folder of another member
        for i in range(1, len(m.parts)):
            if seen.get(m.parts[:i]) is False:
                raise ArchiveError(f"{archive.name}: {'/'.join(m.parts[:i])!r} is both a file and a folder")
    total = sum(m.size for m in members)
    if total > limits.max_total_bytes:
        raise ArchiveError(f"{archive.name}: {total} bytes uncompressed, over the limit of "
                           f"{limits.max_total_bytes}")
    packed = max(archive.stat().st_size, 1)
    if total > limits.ratio_floor and total / packed > limits.max_ratio:
        raise ArchiveError(f"{archive.name}: compression ratio {total / packed:.0f}:1 is over the limit of "
                           f"{limits.max_ratio:.0f}:1 (zip bomb?)")


def _into_place(dest: Path, fill: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        fill(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --- zip ------------------------------------------------------------------------------------------

def _zip_members(archive: Path, zf: zipfile.ZipFile,
                 limits: ArchiveLimits) -> list[tuple[_Member, zipfile.ZipInfo]]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(f"{archive.name}: {len(infos)} members, over the limit of {limits.max_members}")
    out = []
    for info in infos:
        name = info.filename
        parts = _safe_parts(archive, name)
        kind = stat.S_IFMT(info.external_attr >> 16)  # unix file type, 0 when not recorded
        if stat.S_ISLNK(kind):
            raise ArchiveError(f"{archive.name}: member {name!r} is a symlink")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"{archive.name}: member {name!r} is a device file, FIFO or socket")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{archive.name}: member {name!r} is encrypted")
        if not parts:
            continue
        is_dir = info.is_dir()
        if (not is_dir and info.file_size > limits.ratio_floor
                and info.file_size / max(info.compress_size, 1) > limits.max_ratio):
            raise ArchiveError(f"{archive.name}: member {name!r} has compression ratio "
                               f"{info.file_size / max(info.compress_size, 1):.0f}:1, over the limit of "
                               f"{limits.max_ratio:.0f}:1 (zip bomb?)")
        out.append((_Member(parts, is_dir, 0 if is_dir else info.file_size), info))
    return out


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            planned = _zip_members(archive, zf, limits)
            _check_totals(archive, [m for m, _ in planned], limits)

            def fill(root: Path) -> None:
                written = 0
                for member, info in planned:
                    target = root.joinpath(*member.parts)
                    if member.is_dir:
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("xb") as out:
                        for block in _blocks(src):
                            written += len(block)
                            if written > limits.max_total_bytes:
                                raise ArchiveError(f"{archive.name}: more than {limits.max_total_bytes} "
                                                   f"bytes uncompressed")
                            out.write(block)
                        if out.tell() != info.file_size:
                            raise ArchiveError(f"{archive.name}: member {info.filename!r} is "
                                               f"{out.tell()} bytes, its header says {info.file_size}")

            return _into_place(dest, fill)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: cannot extract: {exc}") from exc


def _blocks(src: IO[bytes]) -> Iterator[bytes]:
    while block := src.read(CHUNK):
        yield block


# --- tar ------------------------------------------------------------------------------------------

def _tar_members(archive: Path, tf: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    keep: list[tarfile.TarInfo] = []
    members: list[_Member] = []
    count = 0
    for info in tf:  # streams header by header: stops early on an over-long archive
        count += 1
        if count > limits.max_members:
            raise ArchiveError(f"{archive.name}: more than {limits.max_members} members, over the limit")
        name = info.name
        parts = _safe_parts(archive, name)
        if info.issym():
            raise ArchiveError(f"{archive.name}: member {name!r} is a symlink")
        if info.islnk():
            raise ArchiveError(f"{archive.name}: member {name!r} is a hard link")
        if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
            raise ArchiveError(f"{archive.name}: member {name!r} is a device file or FIFO")
        if not (info.isfile() or info.isdir()):
            raise ArchiveError(f"{archive.name}: member {name!r} has unsupported type {info.type!r}")
        if not parts:
            continue
        members.append(_Member(parts, info.isdir(), info.size if info.isfile() else 0))
        keep.append(info)
    _check_totals(archive, members, limits)
    return keep


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> Path:
    try:
        with tarfile.open(archive, "r:*") as tf:
            keep = _tar_members(archive, tf, limits)

            def fill(root: Path) -> None:
                tf.extractall(root, members=keep, filter="data")

            return _into_place(dest, fill)
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: cannot extract: {exc}") from exc
