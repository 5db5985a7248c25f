"""Download one dataset archive: verified, atomic, retried only when retrying can help.

Rules (each one is tested in tests/test_acquire.py):

- The body goes to a temporary file in the destination folder, is checked against its md5, then
  renamed over the final path with ``os.replace``; an interrupted or refused download never leaves a
  file (partial or whole) at the final path, nor a temporary file behind.
- Transient failures (connection errors, timeouts, a body cut short, HTTP 5xx, 408, 429) are retried
  with exponential backoff; permanent ones (other 4xx such as 404/403, a checksum mismatch, a missing
  local file) are raised at once.
- A checksum mismatch raises :class:`ChecksumError` naming the file and both hashes.
- A file already at the final path with the right md5 is used as is (no request is made).
- An empty md5 means "cannot be verified": such a source is never downloaded, but a file the user put
  at the final path is accepted (its md5 is logged so it can be pinned in params.yaml).
- An empty url means the dataset needs a sign-up: the error says exactly where to put the file.

``file://`` and ``http(s)://`` URLs are supported (stdlib urllib).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tasks.config import Params, SourceConfig
from tasks.datasets.archive import ArchiveLimits, extract
from tasks.datasets.base import DatasetError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "rain-reid-downloader/1"


class DownloadError(DatasetError):
    """The archive could not be obtained; retrying will not help (or retries are exhausted)."""


class RetriesExhausted(DownloadError):
    """Transient errors (connection, timeout, 5xx) outlasted every retry: trying later may succeed."""


class ChecksumError(DownloadError):
    """The bytes do not have the expected md5."""


class _Transient(Exception):
    """A failure worth retrying (wrapped so the retry loop has one thing to catch)."""


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_source(source: SourceConfig, name: str, dest_dir: Path, *, homepage: str = "",
                 retries: int = 4, backoff: float = 1.0, timeout: float = 60.0) -> Path:
    """Make the archive of params ``sources.<name>`` available in `dest_dir`; return its path."""
    filename = archive_name(source)
    if not filename:
        raise DownloadError(f"params.yaml sources.{name}: set `filename` (it cannot be taken from the url "
                            f"{source.url!r})")
    return fetch(source.url, dest_dir / filename, source.md5, name=name, homepage=homepage,
                 retries=retries, backoff=backoff, timeout=timeout)


def archive_name(source: SourceConfig) -> str:
    """The archive's file name in paths.downloads: `filename`, else the url's last part ("" if neither says)."""
    return source.filename or Path(urllib.parse.urlparse(source.url).path).name


def fetch(url: str, dest: Path, md5: str, *, name: str = "", homepage: str = "", retries: int = 4,
          backoff: float = 1.0, timeout: float = 60.0,
          sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download `url` to `dest`, verified against `md5` (hex, case-insensitive). Returns `dest`.

    `retries` extra attempts after the first, waiting ``backoff * 2**attempt`` seconds between them.
    """
    md5 = md5.strip().lower()
    key = f"sources.{name}" if name else "the source"
    if dest.is_file():
        actual = md5_of(dest)
        if not md5:
            log.warning("%s: no md5 in params.yaml %s; using the file as is (its md5 is %s: put it in "
                        "%s.md5 to pin it)", dest, key, actual, key)
            return dest
        if actual == md5:
            log.info("%s: already present, md5 verified", dest)
            return dest
        if not url:
            raise ChecksumError(f"{dest}: md5 mismatch: expected {md5}, got {actual}. The file is not the "
                                f"expected archive; replace it with the right one")
        log.warning("%s: present but md5 is %s, expected %s; downloading again", dest, actual, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)  # so the folder a message points at exists
    if not url:
        where = f" from {homepage}" if homepage else ""
        raise DownloadError(f"{dest.name} cannot be downloaded automatically (params.yaml {key}.url is "
                            f"empty: the dataset needs a sign-up). Obtain it{where} and put it at "
                            f"{dest.resolve()}; its md5 must be {md5 or '(unset)'}")
    if not md5:
        raise DownloadError(f"refusing to download {url}: params.yaml {key}.md5 is empty, so the file "
                            f"could not be verified. Set {key}.md5, or download {dest.name} yourself and "
                            f"put it at {dest.resolve()}")
    for attempt in range(retries + 1):
        try:
            _download_once(url, dest, md5, timeout)
            log.info("%s: downloaded from %s, md5 verified", dest, url)
            return dest
        except _Transient as exc:
            if attempt == retries:
                raise RetriesExhausted(f"{url}: giving up after {retries + 1} attempts: {exc}") from exc
            delay = backoff * 2 ** attempt
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", url, exc, delay, attempt + 2,
                        retries + 1)
            sleep(delay)
    raise AssertionError("unreachable")


def _download_once(url: str, dest: Path, md5: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy_url(url, out, timeout)
            out.flush()
            os.fsync(out.fileno())
        if digest != md5:
            raise ChecksumError(f"{dest.name}: md5 mismatch: expected {md5}, got {digest} (downloaded "
                                f"from {url}); the download was discarded")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _copy_url(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream `url` into `out`; return the md5 of what was written. Raises _Transient or DownloadError."""
    digest = hashlib.md5(usedforsecurity=False)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        try:
            with path.open("rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
        except FileNotFoundError as exc:
            raise DownloadError(f"{url}: no such file") from exc
        except IsADirectoryError as exc:
            raise DownloadError(f"{url}: is a folder, not a file") from exc
        return digest.hexdigest()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (use http, https or file)")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            received = 0
            while block := resp.read(CHUNK):
                digest.update(block)
                out.write(block)
                received += len(block)
            if expected is not None and expected.isdigit() and received != int(expected):
                raise _Transient(f"body cut short: {received} of {expected} bytes")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} (not retried)") from exc
    except urllib.error.URLError as exc:  # DNS, refused connection, TLS, timeout while connecting
        raise _Transient(f"connection failed: {exc.reason}") from exc
    except (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError) as exc:
        raise _Transient(f"connection lost: {exc!r}") from exc
    except TimeoutError as exc:
        raise _Transient(f"timed out after {timeout} s") from exc
    except http.client.HTTPException as exc:
        raise _Transient(f"bad HTTP response: {exc!r}") from exc
    return digest.hexdigest()


def source_for(params: Params, name: str) -> SourceConfig:
    """params.yaml ``sources.<name>``: the one place a dataset's url, md5 and archive name are written
    (adapters keep no copies, so a corrected md5 or moved url is changed there alone)."""
    source = params.sources.get(name)
    if source is None:
        raise DownloadError(f"params.yaml has no sources.{name}: add its url, md5 and filename "
                            f"(an empty url if the archive must be put in {params.downloads_dir()} by hand)")
    return source


def acquire_archive(params: Params, name: str, raw_dir: Path, folder: str, *,
                    homepage: str = "", limits: ArchiveLimits | None = None) -> Path:
    """Fetch the archive of dataset `name` and extract it into ``raw_dir/folder`` (replaced if present)."""
    archive = fetch_source(source_for(params, name), name, params.downloads_dir(), homepage=homepage)
    raw_dir.mkdir(parents=True, exist_ok=True)
    target = raw_dir / folder
    if target.exists():
        shutil.rmtree(target)
    return extract(archive, target, limits)
