"""Re-ID evaluation: CMC and mAP (market-style), distances, single-shot gallery sampling.

Plain numpy/torch: no file I/O, no printing, no work at import time.

Ranking rule (ties)
-------------------
For every query the gallery is ranked by ascending distance; entries with *equal* distance are
ordered by ascending gallery index. This is exactly the order of
``np.argsort(distmat[q], kind="stable")``, and the loop references in ``tests/test_metrics.py`` and
``bench/evaluate.py`` rank that way. (``-0.0`` and ``0.0`` are equal distances.)

Market-style protocol
---------------------
* Gallery entries with the query's person id *and* camera id are ignored ("junk"): they are removed
  from the ranking, so they neither count as matches nor push correct matches down.
* A correct match is a gallery entry with the query's person id and another camera id.
* Queries without any correct match are skipped (they count neither in CMC nor in mAP); if no query
  has a match a ``ValueError`` is raised.
* ``cmc[k]`` is the fraction of (non-skipped) queries whose first correct match is at rank ``<= k + 1``
  among the kept gallery entries. The curve always has ``max_rank`` entries: when ``max_rank`` exceeds
  the number of kept gallery entries, each query's curve has already reached 1.0 (its correct matches
  lie inside the kept list), so the curve is padded with that last value, 1.0 per query.
* AP of a query is the mean, over its correct matches, of the precision at the rank of that match;
  mAP is the mean AP over non-skipped queries.

Implementation
--------------
Queries are processed in chunks of ``chunk_size`` rows, so the peak extra memory is
O(chunk_size x gallery) no matter how many queries there are. Inside a chunk there is no per-query
Python loop and no argsort of whole rows: the gallery entries of each query's person are found from the
gallery sorted once by person id, each row's distances are sorted by value (``np.sort``), and the number
of entries closer than each correct match comes from a row-wise bisection of the (few) match distances
into the sorted rows (all rows at once, about log2(gallery) numpy steps per chunk). The ranking is numpy
only: ``torch.searchsorted`` would do the same, but its thread pool made it 15x slower on a busy
2-core machine. Where a non-matching or junk entry has exactly the same distance as a
correct match, the entries tied with it at a smaller gallery index are counted directly on the row, so
the result is the same as ranking with the stable argsort.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

__all__ = [
    "METRIC_KEYS",
    "evaluate_rank",
    "mean_std",
    "pairwise_distance",
    "single_shot_gallery",
]

METRIC_KEYS: tuple[str, ...] = ("rank1", "rank5", "rank10", "rank20", "mAP")
"""The reported metrics, in the paper's column order: CMC at ranks 1, 5, 10, 20 (``rank<k>`` is
``cmc[k - 1]``) and mAP. The names of metrics.json, MLflow metrics and tags, and every table column;
``<key>_std`` is the spread ``mean_std`` gives."""

# Default chunk: about this many distance entries (rows x gallery) are processed at a time.
CHUNK_ELEMENTS = 1 << 21


def _auto_rows(num_g: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(num_g, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_ids(name: str, ids: np.ndarray, n: int, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of length {n} (the number of {what}), got {ids.shape}")
    return ids


def _sortable(dist: np.ndarray) -> np.ndarray:
    """C-contiguous ``dist`` as float32, float64 or int64 (exact for every input dtype).

    No copy when it already is (float32/float64/int64 rows of a C-ordered matrix).
    """
    if dist.dtype == np.float16:
        return np.ascontiguousarray(dist, dtype=np.float32)
    if dist.dtype.kind == "f" or dist.dtype == np.int64:
        return np.ascontiguousarray(dist)
    return np.ascontiguousarray(dist, dtype=np.int64)  # narrower signed/unsigned ints: exact in int64


def _padded(
    values: np.ndarray, rows: np.ndarray, counts: np.ndarray, width: int, fill: float | int
) -> np.ndarray:
    """Scatter row-grouped ``values`` into a ``(len(counts), width)`` array padded with ``fill``."""
    out = np.full((counts.shape[0], max(width, 1)), fill, dtype=values.dtype)
    cols = np.arange(rows.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, cols] = values
    return out


def _searchsorted_rows(sorted_rows: np.ndarray, values: np.ndarray, right: bool = False) -> np.ndarray:
    """Row-wise ``np.searchsorted``: for each ``values[r, m]`` the number of ``sorted_rows[r]`` entries
    ``< value`` (or ``<= value`` if ``right``). A vectorised bisection over all rows at once: about
    log2(G) numpy steps per call, whatever the number of rows.
    """
    num_r, num_g = sorted_rows.shape
    rows = np.arange(num_r)[:, None]  # (R, 1)
    lo = np.zeros(values.shape, np.int64)  # (R, M) answer lies in [lo, hi]
    hi = np.full(values.shape, num_g, np.int64)
    for _ in range(max(1, num_g).bit_length() + 1):
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) >> 1  # < num_g wherever lo < hi
        probe = sorted_rows[rows, np.minimum(mid, num_g - 1)]
        up = (probe <= values if right else probe < values) & open_
        lo = np.where(up, mid + 1, lo)
        hi = np.where(open_ & ~up, mid, hi)
    return lo


def _match_ranks(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    g_by_pid: np.ndarray,
    g_pids_sorted: np.ndarray,
    g_camids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the correct matches of a chunk of queries.

    ``g_by_pid`` is the stable argsort of the gallery person ids and ``g_pids_sorted`` the sorted ids.

    Returns ``(ranks, n_match)`` for the rows that have at least one correct match: ``ranks`` is
    ``(R, M)`` int64, row r holding in ascending order the 0-based positions of its correct matches
    among the kept (non-junk) gallery entries; entries ``m >= n_match[r]`` are padding.

    The rank of a match at column j with distance d is ``#{kept k: d_k < d} + #{kept k: d_k == d, k < j}``
    (the tie rule). The first term comes from a row-wise bisection into the sorted row. The second
    term, when only other matches share the distance, is the match's place among the row's matches
    ordered by (distance, column); otherwise it is counted directly on the row.
    """
    num_b, num_g = dist.shape
    # Gallery entries of the query's person, row by row, ascending column within a row.
    lo = np.searchsorted(g_pids_sorted, q_pids, side="left")  # (B,)
    n_same = np.searchsorted(g_pids_sorted, q_pids, side="right") - lo  # (B,)
    r_idx = np.repeat(np.arange(num_b), n_same)
    c_idx = g_by_pid[np.arange(r_idx.shape[0]) - np.repeat(np.cumsum(n_same) - n_same - lo, n_same)]
    is_junk = q_camids[r_idx] == g_camids[c_idx]  # same person and camera: ignored
    r_val, c_val = r_idx[~is_junk], c_idx[~is_junk]  # correct matches
    r_junk, c_junk = r_idx[is_junk], c_idx[is_junk]
    n_match = np.bincount(r_val, minlength=num_b)  # (B,)
    rows = np.flatnonzero(n_match)  # queries that are evaluated
    if rows.shape[0] == 0:
        return np.zeros((0, 1), np.int64), n_match[rows]
    if rows.shape[0] < num_b:  # renumber rows to the evaluated ones
        new_row = np.cumsum(n_match > 0) - 1  # (B,)
        keep_junk = n_match[r_junk] > 0
        dist, n_match = dist[rows], n_match[rows]
        r_val = new_row[r_val]
        r_junk, c_junk = new_row[r_junk[keep_junk]], c_junk[keep_junk]
    num_r = rows.shape[0]
    n_junk = np.bincount(r_junk, minlength=num_r)  # (R,)
    m_max = int(n_match.max())

    work = _sortable(dist)  # (R, G)
    fill: float | int = np.inf if work.dtype.kind == "f" else int(np.iinfo(work.dtype).max)
    # Matches of each row ordered by (distance, column): values t and columns c_t, padded.
    t = _padded(work[r_val, c_val], r_val, n_match, m_max, fill)  # (R, M), column order
    c_t = _padded(c_val, r_val, n_match, m_max, num_g)  # (R, M)
    order = np.argsort(t, axis=1, kind="stable")  # pads (fill, after real ones) stay last
    t, c_t = np.take_along_axis(t, order, axis=1), np.take_along_axis(c_t, order, axis=1)
    pad = np.arange(m_max)[None, :] >= n_match[:, None]  # (R, M)
    t_junk = _padded(work[r_junk, c_junk], r_junk, n_junk, int(n_junk.max(initial=0)), fill)  # (R, J)
    c_junk_p = _padded(c_junk, r_junk, n_junk, t_junk.shape[1], num_g)  # (R, J)
    live_junk = np.arange(t_junk.shape[1])[None, :] < n_junk[:, None]  # (R, J)

    s_all = np.sort(work, axis=1)  # (R, G) sorted distances, junk included
    if work.dtype.kind == "f" and np.isnan(s_all[:, -1]).any():  # NaN sorts last
        raise ValueError("distmat contains NaN in a row that is evaluated")
    below_all = _searchsorted_rows(s_all, t)  # (R, M) entries with d < t (junk too)
    equal_all = _searchsorted_rows(s_all, t, right=True) - below_all
    del s_all
    below_match = _searchsorted_rows(t, t)  # (R, M) matches with d < t
    equal_match = _searchsorted_rows(t, t, right=True) - below_match
    below_junk = _searchsorted_rows(np.sort(t_junk, axis=1), t)  # (R, M) junk with d < t (pads: fill)

    # Kept entries strictly closer, plus the matches before this one among equal distances.
    ranks = below_all - below_junk + (np.arange(m_max)[None, :] - below_match)  # (R, M)
    # Where a non-match or junk entry has the same distance, count equal kept entries directly.
    tied_r, tied_m = np.nonzero(((equal_all != equal_match) | (t == fill)) & ~pad)
    for start in range(0, tied_r.shape[0], num_r):  # blocks of pairs: memory stays O(R x G)
        pr, pm = tied_r[start : start + num_r], tied_m[start : start + num_r]
        value, col = t[pr, pm], c_t[pr, pm]  # (P,)
        before = np.arange(num_g)[None, :] < col[:, None]  # (P, G)
        n_equal = np.count_nonzero((work[pr] == value[:, None]) & before, axis=1)  # (P,)
        junk_before = (t_junk[pr] == value[:, None]) & (c_junk_p[pr] < col[:, None]) & live_junk[pr]  # (P, J)
        n_equal_junk = np.count_nonzero(junk_before, axis=1)  # (P,)
        ranks[pr, pm] = below_all[pr, pm] - below_junk[pr, pm] + n_equal - n_equal_junk
    return ranks, n_match


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 20,
    *,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, float]:
    """Market-style CMC and mAP for a ``(num_query, num_gallery)`` distance matrix.

    Args:
        distmat: ``(Q, G)`` distances (smaller is more similar), float or integer, no NaN.
        q_pids, g_pids: person ids of queries ``(Q,)`` and gallery ``(G,)``.
        q_camids, g_camids: camera ids of queries ``(Q,)`` and gallery ``(G,)``.
        max_rank: length of the returned CMC curve (>= 1).
        chunk_size: queries processed at a time; peak extra memory is O(chunk_size x G).
            ``None`` picks about ``CHUNK_ELEMENTS // G`` rows.

    Returns:
        ``(cmc, mAP)``: ``cmc`` float64 of length ``max_rank`` (fractions; ``cmc[0]`` is rank 1), and
        ``mAP`` as a float in [0, 1]. Ties, junk entries, skipped queries and ``max_rank`` larger than
        the gallery are handled as described in the module docstring.

    Raises:
        ValueError: shapes disagree, ``max_rank < 1``, NaN distances, or no query has a correct match.
    """
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {distmat.shape}")
    if distmat.dtype.kind not in "fiu" or distmat.dtype == np.uint64:
        raise TypeError(f"distmat must hold floats or integers (not uint64), got {distmat.dtype}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    num_q, num_g = distmat.shape
    q_pids = _check_ids("q_pids", q_pids, num_q, "distmat rows")
    q_camids = _check_ids("q_camids", q_camids, num_q, "distmat rows")
    g_pids = _check_ids("g_pids", g_pids, num_g, "distmat columns")
    g_camids = _check_ids("g_camids", g_camids, num_g, "distmat columns")
    rows = _auto_rows(num_g, chunk_size)
    g_by_pid = np.argsort(g_pids, kind="stable")  # (G,) gallery grouped by person id
    g_pids_sorted = g_pids[g_by_pid]

    first_hist = np.zeros(max_rank + 1, np.int64)  # queries by rank of first match (capped)
    ap_sum = 0.0
    n_valid = 0
    for start in range(0, num_q, rows):
        stop = min(start + rows, num_q)
        ranks, n_match = _match_ranks(
            distmat[start:stop], q_pids[start:stop], q_camids[start:stop], g_by_pid, g_pids_sorted, g_camids
        )
        if n_match.shape[0] == 0:
            continue
        m_max = ranks.shape[1]
        first_hist += np.bincount(np.minimum(ranks[:, 0], max_rank), minlength=max_rank + 1)
        hits = np.arange(1, m_max + 1, dtype=np.float64)[None, :]  # (1, M) matches seen so far
        precision = hits / (ranks + 1.0)  # (R, M) precision at each correct match
        precision[np.arange(m_max)[None, :] >= n_match[:, None]] = 0.0
        ap_sum += float((precision.sum(axis=1) / n_match).sum())
        n_valid += n_match.shape[0]

    if n_valid == 0:
        raise ValueError(
            "no query has a correct match in the gallery (same person id, other camera): "
            "cannot compute CMC/mAP"
        )
    cmc = np.cumsum(first_hist[:max_rank]).astype(np.float64) / n_valid
    return cmc, ap_sum / n_valid


def pairwise_distance(
    q: torch.Tensor | np.ndarray,
    g: torch.Tensor | np.ndarray,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    chunk_size: int = 1024,
) -> np.ndarray:
    """``(Q, G)`` distances between query features ``(Q, D)`` and gallery features ``(G, D)``.

    ``euclidean`` is ``torch.cdist`` (p = 2); ``cosine`` is ``1 - <q/|q|, g/|g|>``. Queries are
    processed ``chunk_size`` rows at a time. The result is float64 if either input is float64, else
    float32; tensors are used on the device they live on and the result comes back as numpy.
    """
    q_t = torch.as_tensor(q)
    g_t = torch.as_tensor(g)
    if q_t.ndim != 2 or g_t.ndim != 2 or q_t.shape[1] != g_t.shape[1]:
        raise ValueError(
            f"expected (Q, D) and (G, D) features, got {tuple(q_t.shape)} and {tuple(g_t.shape)}"
        )
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.float64 if torch.float64 in (q_t.dtype, g_t.dtype) else torch.float32
    q_t, g_t = q_t.to(dtype), g_t.to(dtype=dtype, device=q_t.device)
    if metric == "cosine":
        g_t = F.normalize(g_t, dim=1)
    out = np.empty((q_t.shape[0], g_t.shape[0]), dtype=np.float64 if dtype == torch.float64 else np.float32)
    with torch.no_grad():
        for start in range(0, q_t.shape[0], chunk_size):
            q_chunk = q_t[start : start + chunk_size]  # (B, D)
            if metric == "euclidean":
                d_chunk = torch.cdist(q_chunk, g_t)  # (B, G)
            else:
                d_chunk = 1.0 - F.normalize(q_chunk, dim=1) @ g_t.T  # (B, G)
            out[start : start + q_chunk.shape[0]] = d_chunk.cpu().numpy()
    return out


def single_shot_gallery(
    g_pids: np.ndarray, g_camids: np.ndarray, seed: int, repeats: int
) -> list[np.ndarray]:
    """Single-shot gallery draws: ``repeats`` index arrays, each with one gallery image per identity.

    Each identity's image is drawn uniformly among all its gallery images (camera ids are only
    checked for length: the protocol's gallery already comes from the other camera, and evaluation
    applies the junk rule after sampling). All draws come in order from one
    ``np.random.default_rng(seed)``, so the same seed gives the same draws (and the first k draws do not
    depend on ``repeats``). Each index array is sorted ascending and has one entry per distinct id;
    ``repeats=0`` gives an empty list.
    """
    g_pids = np.asarray(g_pids)
    if g_pids.ndim != 1:
        raise ValueError(f"g_pids must be 1-D, got shape {g_pids.shape}")
    _check_ids("g_camids", g_camids, g_pids.shape[0], "gallery entries")
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(repeats):
        keys = rng.permutation(g_pids.shape[0])  # random distinct keys
        order = np.lexsort((keys, g_pids))  # by identity, then key
        _, first = np.unique(g_pids[order], return_index=True)  # smallest key per identity
        draws.append(np.sort(order[first]))
    return draws


def mean_std(values: ArrayLike, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation of `values` along `axis`: the one mean ± std of the project.

    The std is the sample one (ddof = 1, the n - 1 divisor): the values are a few draws (gallery draws,
    protocol trials, training seeds) from a distribution whose spread is what is reported, and with
    n = 2 or 3 of them the population std (ddof = 0) understates it by 29% or 18%. One value has no
    spread: its std is 0 (not NaN). Returns arrays (0-d for 1-D input); empty input is an error.
    """
    arr = np.asarray(values, dtype=np.float64)
    n = arr.shape[axis]
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = np.asarray(arr.mean(axis=axis))
    std = np.asarray(arr.std(axis=axis, ddof=1)) if n > 1 else np.zeros_like(mean)
    return mean, std
