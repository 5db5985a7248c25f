"""sha256 of files a dataset reads from outside the project (a custom table's images, a hand-placed archive),
remembered between runs so that an unchanged file is not read again (stages `fingerprint` and `download`).

An entry is keyed by the file's absolute path and trusted only while the file's device, inode, size, mtime and
ctime (nanoseconds) are all unchanged. ctime is in the key because no tool can set it: `cp -p`, `rsync -t` or
`tar -x` can give new content an old mtime, never an old ctime, and a file replaced by a rename gets a new inode.

What the key cannot see is a file rewritten, at the same size, within one tick of the filesystem's clock of when
it was hashed. As git does with "racily clean" index entries, a hash is remembered only when the file's mtime and
ctime are older than a stamp the cache writes, on its own filesystem, before it hashes anything; a file touched
after that (or in the same tick) is hashed again next time. The stamp and the files must share a clock: images on
a network filesystem whose server clock runs behind this machine's could have a racy entry remembered.

The cache is an SQLite file (concurrent stages wait on its lock). It only saves time: an unreadable or corrupt
cache is rebuilt, and with none at all every file is hashed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

CHUNK = 1 << 20
COMMIT_EVERY = 500  # remembered hashes per transaction: an interrupted run keeps most of its work
# In the project folder, where every stage runs (as .cache/embeddings of `rain search`); git ignores .cache/.
DEFAULT_CACHE = Path(".cache") / "file-hashes.sqlite"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class FileHashes:
    """``with FileHashes(db) as hashes: hashes.sha256(path)``; ``hashed`` and ``reused`` count the calls that
    read the file and those answered from the cache. ``db=None``: no cache, every file is read."""

    def __init__(self, db: Path | None) -> None:
        self.db = db
        self.hashed = 0
        self.reused = 0
        self._conn: sqlite3.Connection | None = None
        self._stamp_ns = 0
        self._pending = 0

    def __enter__(self) -> FileHashes:
        if self.db is not None:
            try:
                self._open(self.db)
            except (OSError, sqlite3.Error) as exc:
                log.warning("file-hash cache %s unusable (%s): rebuilding it", self.db, exc)
                try:
                    self.db.unlink(missing_ok=True)
                    self._open(self.db)
                except (OSError, sqlite3.Error) as again:
                    log.warning("file-hash cache %s unusable (%s): hashing every file", self.db, again)
                    self._conn = None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._conn is not None:
            try:
                self._conn.commit()
            except sqlite3.Error as error:
                log.warning("file-hash cache %s: %s (hashes of this run not kept)", self.db, error)
            self._conn.close()
            self._conn = None

    def _open(self, db: Path) -> None:
        db.parent.mkdir(parents=True, exist_ok=True)
        stamp = db.with_name(db.name + ".stamp")
        stamp.write_bytes(b"")  # its mtime: "now" on the cache filesystem's clock, before any file is hashed
        self._stamp_ns = stamp.stat().st_mtime_ns
        conn = sqlite3.connect(db, timeout=60)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
                         "sha256 TEXT NOT NULL)")
            conn.execute("SELECT count(*) FROM files").fetchone()  # a corrupt file fails here, not mid-run
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    def sha256(self, path: str | Path) -> str:
        """sha256 of the file's bytes. Raises OSError if it cannot be read."""
        key = os.path.abspath(path)
        before = os.stat(key)
        stat = _signature(before)
        cached = self._lookup(key)
        if cached is not None and cached[0] == stat:
            self.reused += 1
            return cached[1]
        digest = sha256_file(key)
        self.hashed += 1
        after = os.stat(key)
        settled = max(after.st_mtime_ns, after.st_ctime_ns) < self._stamp_ns
        if _signature(after) == stat and settled:  # not written while (or since just before) it was read
            self._store(key, stat, digest)
        return digest

    def _lookup(self, key: str) -> tuple[str, str] | None:
        if self._conn is None:
            return None
        try:
            row = self._conn.execute("SELECT stat, sha256 FROM files WHERE path = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._give_up(exc)
            return None
        return None if row is None else (str(row[0]), str(row[1]))

    def _store(self, key: str, stat: str, digest: str) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute("INSERT OR REPLACE INTO files (path, stat, sha256) VALUES (?, ?, ?)",
                               (key, stat, digest))
            self._pending += 1
            if self._pending >= COMMIT_EVERY:
                self._conn.commit()
                self._pending = 0
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _give_up(self, exc: sqlite3.Error) -> None:
        log.warning("file-hash cache %s: %s; hashing every file from here on", self.db, exc)
        assert self._conn is not None
        self._conn.close()
        self._conn = None


def _signature(st: os.stat_result) -> str:
    # Text, not SQLite integers: an inode or device number may not fit a signed 64-bit integer.
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
