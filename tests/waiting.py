"""Waiting on a subprocess without betting on an idle machine: a test fails when what it waits on has died or has
stopped making progress, not when it is slow. Every wait is still bounded (`cap_s`), so nothing hangs the suite."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

STALL_S = 300.0  # no sign of progress for this long: stuck (a Ray start-up on a loaded 2-core machine takes ~60 s)
CAP_S = 1800.0  # whatever happens, give up after this long


class NoProgress(AssertionError):
    """What a test waited on stopped making progress, or ran past the cap."""


def wait_until(done: Callable[[], bool], progress: Callable[[], Hashable], what: str,
               failed: Callable[[], str | None] = lambda: None, stall_s: float = STALL_S, cap_s: float = CAP_S,
               poll_s: float = 0.2) -> None:
    """Return once `done()` is true. Raise when `failed()` returns a reason (the process died: its log's tail), or
    when `progress()` (a log's size, the files written so far) has not changed for `stall_s`, or after `cap_s`."""
    started = last_change = time.monotonic()
    seen = progress()
    while not done():
        reason = failed()
        if reason is not None:
            raise NoProgress(f"{what}: {reason}")
        now = time.monotonic()
        current = progress()
        if current != seen:
            seen, last_change = current, now
        if now - last_change > stall_s:
            raise NoProgress(f"{what}: no progress in {stall_s:.0f} s (last sign: {seen!r})")
        if now - started > cap_s:
            raise NoProgress(f"{what}: not done after {cap_s:.0f} s")
        time.sleep(poll_s)
