"""tasks/datasets/acquire.py: verified, atomic downloads, retried only on transient failures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from dataset_fixtures import LocalServer, http_server, md5

from tasks.datasets.acquire import ChecksumError, DownloadError, RetriesExhausted, fetch

__all__ = ["http_server"]

PAYLOAD = bytes(range(256)) * 2000  # 512 kB: several read chunks


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetch_fast(url: str, dest: Path, digest: str, sleeps: Sleeps | None = None, retries: int = 4) -> Path:
    return fetch(url, dest, digest, backoff=0.01, timeout=5.0, retries=retries,
                 sleep=sleeps if sleeps is not None else Sleeps())


def test_download_verifies_and_leaves_only_the_file(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD)
    dest = tmp_path / "dl" / "a.zip"
    assert fetch_fast(url, dest, md5(PAYLOAD).upper()) == dest  # md5 is case-insensitive
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.zip"]  # no temporary file left


def test_present_file_with_right_md5_is_not_downloaded_again(http_server: LocalServer,
                                                              tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD)
    dest = tmp_path / "a.zip"
    dest.write_bytes(PAYLOAD)
    fetch_fast(url, dest, md5(PAYLOAD))
    assert http_server.hits["/a.zip"] == 0


def test_present_file_with_wrong_md5_is_replaced(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD)
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"stale")
    fetch_fast(url, dest, md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD and http_server.hits["/a.zip"] == 1


def test_wrong_checksum_names_file_and_both_hashes_and_leaves_nothing(http_server: LocalServer,
                                                                       tmp_path: Path) -> None:
    url = http_server.serve("/VIPeR.v1.0.zip", PAYLOAD)
    dest = tmp_path / "VIPeR.v1.0.zip"
    expected = "0" * 32
    sleeps = Sleeps()
    with pytest.raises(ChecksumError) as info:
        fetch_fast(url, dest, expected, sleeps)
    message = str(info.value)
    assert "VIPeR.v1.0.zip" in message and expected in message and md5(PAYLOAD) in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    assert http_server.hits["/VIPeR.v1.0.zip"] == 1 and sleeps == []  # a checksum mismatch is not retried


def test_interrupted_download_leaves_no_partial_file(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, truncate=100)  # the server always closes mid-body
    dest = tmp_path / "a.zip"
    with pytest.raises(RetriesExhausted, match="giving up after 3 attempts"):
        fetch_fast(url, dest, md5(PAYLOAD), retries=2)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    assert http_server.hits["/a.zip"] == 3


def test_interrupted_download_is_retried_then_succeeds(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, truncate=1)
    dest = tmp_path / "a.zip"
    fetch_fast(url, dest, md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD and http_server.hits["/a.zip"] == 2


@pytest.mark.parametrize("code", [404, 403, 410])
def test_client_errors_are_not_retried(http_server: LocalServer, tmp_path: Path, code: int) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, fail=[code] * 5)
    sleeps = Sleeps()
    with pytest.raises(DownloadError, match=f"HTTP {code}"):
        fetch_fast(url, tmp_path / "a.zip", md5(PAYLOAD), sleeps)
    assert http_server.hits["/a.zip"] == 1 and sleeps == []


def test_missing_route_404_is_not_retried(http_server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_fast(http_server.url("/nothing.zip"), tmp_path / "a.zip", md5(PAYLOAD))
    assert http_server.hits["/nothing.zip"] == 1


def test_503_is_retried_with_exponential_backoff_then_succeeds(http_server: LocalServer,
                                                               tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, fail=[503, 503])
    sleeps = Sleeps()
    dest = fetch_fast(url, tmp_path / "a.zip", md5(PAYLOAD), sleeps)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.hits["/a.zip"] == 3
    assert sleeps == pytest.approx([0.01, 0.02])


def test_5xx_gives_up_after_the_retries(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, fail=[500] * 10)
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch_fast(url, tmp_path / "a.zip", md5(PAYLOAD), retries=3)
    assert http_server.hits["/a.zip"] == 4 and not (tmp_path / "a.zip").exists()


def test_timeout_is_retried(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/a.zip", PAYLOAD, delay=1.0)
    sleeps = Sleeps()
    fetch(url, tmp_path / "a.zip", md5(PAYLOAD), backoff=0.01, timeout=0.3, sleep=sleeps)
    assert http_server.hits["/a.zip"] == 2 and len(sleeps) == 1


def test_connection_refused_is_retried(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(RetriesExhausted, match="giving up after 3 attempts"):
        fetch_fast(f"http://127.0.0.1:{port}/a.zip", tmp_path / "a.zip", md5(PAYLOAD), sleeps, retries=2)
    assert len(sleeps) == 2 and list(tmp_path.iterdir()) == []


def test_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a b.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = fetch_fast(src.as_uri(), tmp_path / "dl" / "a.zip", md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_missing_file_url_is_permanent(tmp_path: Path) -> None:
    sleeps = Sleeps()
    with pytest.raises(DownloadError, match="no such file"):
        fetch_fast((tmp_path / "absent.zip").as_uri(), tmp_path / "a.zip", md5(PAYLOAD), sleeps)
    assert sleeps == []


def test_empty_url_says_where_to_put_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "downloads" / "cuhk03_release.zip"
    with pytest.raises(DownloadError) as info:
        fetch("", dest, md5(PAYLOAD), name="cuhk03", homepage="http://example.org/cuhk03")
    message = str(info.value)
    assert str(dest.resolve()) in message and "sign-up" in message and "http://example.org/cuhk03" in message


def test_empty_url_with_a_wrong_file_is_a_checksum_error(tmp_path: Path) -> None:
    dest = tmp_path / "cuhk03_release.zip"
    dest.write_bytes(b"something else")
    with pytest.raises(ChecksumError, match=md5(b"something else")):
        fetch("", dest, md5(PAYLOAD))


def test_empty_md5_is_never_downloaded(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/CAVIAR4REID.zip", PAYLOAD)
    dest = tmp_path / "CAVIAR4REID.zip"
    with pytest.raises(DownloadError, match=r"md5 is empty") as info:
        fetch(url, dest, "", name="caviar")
    assert str(dest.resolve()) in str(info.value)
    assert http_server.hits["/CAVIAR4REID.zip"] == 0 and not dest.exists()


def test_empty_md5_accepts_a_file_the_user_put_there(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/CAVIAR4REID.zip", PAYLOAD)
    dest = tmp_path / "CAVIAR4REID.zip"
    dest.write_bytes(PAYLOAD)
    assert fetch(url, dest, "", name="caviar") == dest
    assert http_server.hits["/CAVIAR4REID.zip"] == 0


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        fetch("ftp://example.org/a.zip", tmp_path / "a.zip", md5(PAYLOAD))
