"""Logging set-up for stage command lines (library code only uses `logging.getLogger`)."""

from __future__ import annotations

import logging
import sys
import traceback
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


def _print_with_summary(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    traceback.print_exception(kind, exc, tb)
    print(f"{ERROR_MARKER} {one_line(exc)}", file=sys.stderr, flush=True)
