"""Which download failures the flow retries: only those whose own transient retries ran out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.pipeline import StageFailed, _transient
from tasks import download
from tasks.datasets.acquire import ChecksumError, RetriesExhausted
from tests.micro_project import REPO


class FailedState:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def result(self) -> None:
        raise self.exc


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage_output(exc: Exception, project: Path, monkeypatch: pytest.MonkeyPatch,
                 caplog: pytest.LogCaptureFixture) -> str:
    """What the download stage prints when `run` fails with `exc` (and that it exits non-zero)."""
    def failing(*args: object) -> None:
        raise exc

    monkeypatch.setattr(download, "run", failing)
    with caplog.at_level(logging.ERROR), pytest.raises((SystemExit, type(exc))):
        download.main()
    return caplog.text


def test_exhausted_transient_retries_are_marked_and_retried(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    out = stage_output(RetriesExhausted("http://x/a.zip: giving up after 5 attempts: HTTP 503"), project,
                       monkeypatch, caplog)
    assert download.TRANSIENT_MARKER in out
    assert _transient(None, None, FailedState(StageFailed("download", 255, out))) is True


def test_permanent_failures_are_not_retried(project: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    out = stage_output(ChecksumError("a.zip: md5 mismatch: expected 1, got 2 (HTTP 503 earlier)"), project,
                       monkeypatch, caplog)
    assert download.TRANSIENT_MARKER not in out
    assert _transient(None, None, FailedState(StageFailed("download", 255, out))) is False
    assert _transient(None, None, FailedState(ValueError("not a stage failure"))) is False
