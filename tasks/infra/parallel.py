"""Process-parallel map for the CPU-bound image stages (decode, down-sample, encode)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int) -> int:
    """0 means every core this process may use."""
    return requested if requested > 0 else max(1, len(os.sched_getaffinity(0)))


def map_chunks(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], workers: int,
               chunk_size: int = 64, meanwhile: Callable[[], None] | None = None) -> list[R]:
    """Apply `fn` to consecutive chunks of `items` in `workers` processes; results keep input order.

    `meanwhile` runs in this process once every chunk is submitted, so serial work overlaps the pool.
    """
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    if workers <= 1 or len(chunks) <= 1:
        out = [r for chunk in chunks for r in fn(chunk)]
        if meanwhile is not None:
            meanwhile()
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results: Iterable[list[R]] = pool.map(fn, chunks)  # submits every chunk now
        if meanwhile is not None:
            meanwhile()
        return [r for part in results for r in part]
