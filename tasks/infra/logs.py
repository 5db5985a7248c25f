"""Logging set-up for stage command lines (library code only uses `logging.getLogger`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

# The last line a failing stage prints: what went wrong in one line. The Prefect flow finds it in the
# stage's output and ends with it (the traceback above it stays in the stage's log file).
ERROR_MARKER = "rain-stage-error:"


def setup_logging(level: int = logging.INFO, replace: bool = False) -> None:
    """Log lines as `time LEVEL logger: message` (the flow's log keeps a Ray worker's lines by the `tasks.`
    logger name). `replace`: drop the root handlers already set up (a Ray worker's prints the message only)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=replace)
    sys.excepthook = _print_with_summary


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, and how many lines were cut."""
    lines = str(exc).strip().splitlines() or [""]
    more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0]}{more}"


@contextlib.contextmanager
def quieted(*loggers: str, level: int = logging.WARNING) -> Iterator[None]:
    """These loggers at `level` or above only for the block (a library's INFO chatter about its own internals, which
    would reach the flow log and the one-line errors), then at their own levels again."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
    try:
        yield
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def root_cause(exc: BaseException) -> BaseException:
    """The error that started it, not a wrapper's summary of it: a Ray Train worker's own exception behind
    `WorkerGroupError` (its `worker_failures`, lowest rank first) and behind a `RayTaskError` (its `cause`).
    Read by attribute, so this module imports no Ray."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        cause = getattr(exc, "cause", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
        elif isinstance(cause, BaseException):
            exc = cause
    return exc


def _print_with_summary(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    traceback.print_exception(kind, exc, tb)
    print(f"{ERROR_MARKER} {one_line(root_cause(exc))}", file=sys.stderr, flush=True)


def new_run_folder(logs: Path, stamp: str | None = None) -> Path:
    """A flow run's own folder for its stages' logs, `<logs>/<start>/` (start: local time to the second), made
    here: a second run started in the same second gets `<start>-2`, and so on. mkdir either makes a folder or
    fails, so two processes never get the same one."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = logs / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")
