"""Speed and memory of `rain_model.metrics.evaluate_rank` against per-query loops, in the same run.

    .venv/bin/python bench/evaluate.py [--queries 5000] [--gallery 20000] [--ids 751] [--cams 6]
                                       [--dim 128] [--seed 0] [--noise 1.5] [--chunk-size N]
                                       [--max-rank 20]

Data: seeded random features, one centre per identity plus noise (so the ranking is neither perfect
nor random), query and gallery identities and cameras drawn at random; distances with
`pairwise_distance` (float32, torch.cdist). The distance matrix itself is not counted in any figure.

Timed, one after the other on the same matrix:
- `evaluate_rank` (vectorised, chunked);
- "toolkit loop": the per-query loop of the common re-ID toolkits' eval_market1501 (argsort per query,
  keep mask, cumsum, AP from a list comprehension over the ranked gallery), with a stable argsort so
  that ties follow the same rule;
- "numpy loop": the same loop with the AP computed by numpy instead of the list comprehension (a stronger
  baseline; the speed-up is reported against both).
Results are asserted equal (cmc allclose, mAP within 1e-9).

Memory: peak of traced allocations (tracemalloc; numpy buffers are traced) during `evaluate_rank`,
measured in a separate run from the timing, at the default chunk and at 4x that chunk, and for a fifth
of the queries: the peak follows the chunk size, not the number of queries. evaluate_rank allocates
with numpy only, so tracemalloc sees all of it.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from rain_model.metrics import CHUNK_ELEMENTS, evaluate_rank, pairwise_distance

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def toolkit_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """eval_market1501 as in the common toolkits (stable argsort; short curves padded like ours)."""
    num_q = distmat.shape[0]
    all_cmc, all_ap = [], []
    for q_idx in range(num_q):
        order = np.argsort(distmat[q_idx], kind="stable")
        matches = (g_pids[order] == q_pids[q_idx]).astype(np.int32)
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        keep = np.invert(remove)
        raw_cmc = matches[keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - cmc.shape[0])), mode="edge"))
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    return np.asarray(all_cmc, dtype=np.float64).mean(axis=0), float(np.mean(all_ap))


def numpy_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """The same per-query loop with the AP done by numpy (no Python loop over the gallery)."""
    num_q = distmat.shape[0]
    all_cmc, all_ap = [], []
    for q_idx in range(num_q):
        order = np.argsort(distmat[q_idx], kind="stable")
        same = g_pids[order] == q_pids[q_idx]
        keep = ~(same & (g_camids[order] == q_camids[q_idx]))
        raw_cmc = same[keep]
        if not raw_cmc.any():
            continue
        hits = raw_cmc.cumsum()
        cmc = np.minimum(hits, 1)
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - cmc.shape[0])), mode="edge"))
        precision = hits / np.arange(1, hits.shape[0] + 1)
        all_ap.append(precision[raw_cmc].sum() / hits[-1])
    return np.asarray(all_cmc, dtype=np.float64).mean(axis=0), float(np.mean(all_ap))


def make_problem(args: argparse.Namespace) -> Arrays:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.ids, args.dim)).astype(np.float32)  # (I, D)
    q_pids = rng.integers(0, args.ids, args.queries)
    g_pids = rng.integers(0, args.ids, args.gallery)
    q_cams = rng.integers(0, args.cams, args.queries)
    g_cams = rng.integers(0, args.cams, args.gallery)
    noise = np.float32(args.noise)
    q_feat = centres[q_pids] + noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    g_feat = centres[g_pids] + noise * rng.standard_normal((args.gallery, args.dim), dtype=np.float32)
    distmat = pairwise_distance(q_feat, g_feat)  # (Q, G) float32
    return distmat, q_pids, g_pids, q_cams, g_cams


def timed(fn: Callable[[], tuple[np.ndarray, float]]) -> tuple[tuple[np.ndarray, float], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def traced_peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--gallery", type=int, default=20000)
    parser.add_argument("--ids", type=int, default=751)
    parser.add_argument("--cams", type=int, default=6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=1.5, help="feature noise around identity centres")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    parser.add_argument("--max-rank", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    problem = make_problem(args)
    distmat = problem[0]
    chunk = args.chunk_size or max(1, CHUNK_ELEMENTS // args.gallery)
    print(
        f"problem: {args.queries} queries x {args.gallery} gallery, {args.ids} ids, {args.cams} cameras, "
        f"dim {args.dim}, distmat {distmat.dtype} {distmat.nbytes / 2**20:.0f} MiB "
        f"(built in {time.perf_counter() - start:.1f} s); chunk {chunk} rows"
    )

    def ours() -> tuple[np.ndarray, float]:
        return evaluate_rank(*problem, max_rank=args.max_rank, chunk_size=chunk)

    (cmc, m_ap), t_ours = timed(ours)
    (cmc_np, map_np), t_np = timed(lambda: numpy_loop(*problem, max_rank=args.max_rank))
    (cmc_tk, map_tk), t_tk = timed(lambda: toolkit_loop(*problem, max_rank=args.max_rank))
    for name, (c, m) in {"numpy loop": (cmc_np, map_np), "toolkit loop": (cmc_tk, map_tk)}.items():
        np.testing.assert_allclose(cmc, c, rtol=0, atol=1e-12, err_msg=name)
        assert abs(m_ap - m) < 1e-9, (name, m_ap, m)
    print(f"results equal: rank-1 {cmc[0]:.4f}, rank-5 {cmc[4]:.4f}, mAP {m_ap:.6f}")
    print(f"evaluate_rank  {t_ours:8.2f} s")
    print(f"numpy loop     {t_np:8.2f} s   speed-up {t_np / t_ours:6.1f}x")
    print(f"toolkit loop   {t_tk:8.2f} s   speed-up {t_tk / t_ours:6.1f}x")

    n_sub = max(1, args.queries // 5)
    sub = (distmat[:n_sub], problem[1][:n_sub], problem[2], problem[3][:n_sub], problem[4])
    peak = traced_peak(ours)
    peak4 = traced_peak(lambda: evaluate_rank(*problem, max_rank=args.max_rank, chunk_size=4 * chunk))
    peak_sub = traced_peak(lambda: evaluate_rank(*sub, max_rank=args.max_rank, chunk_size=chunk))
    mib = 2**20
    print(
        f"peak traced memory (tracemalloc) of evaluate_rank: {peak / mib:.1f} MiB at chunk {chunk}; "
        f"{peak4 / mib:.1f} MiB at chunk {4 * chunk}; {peak_sub / mib:.1f} MiB for {n_sub} "
        f"queries at chunk {chunk} (distmat {distmat.nbytes / mib:.0f} MiB not counted)"
    )


if __name__ == "__main__":
    main()
