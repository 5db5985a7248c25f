"""Scoring a trained model under the MLR protocol: CMC of every query set of a trial for each single-shot
gallery draw, mAP over all HR images of the test identities (`score_rows`), and their mean and spread.
Shared by the evaluate stage and grid runs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rain_model.metrics import METRIC_KEYS, mean_std
from tasks.config import Params
from tasks.images.store import ImageStore
from tasks.protocol.splits import TEST, role

RANKS = tuple(int(k.removeprefix("rank")) for k in METRIC_KEYS if k.startswith("rank"))  # (1, 5, 10, 20)

__all__ = ["METRIC_KEYS", "PROTOCOL_NOTE", "RANKS", "row_label", "row_names", "score_rows", "score_trial", "summarise"]


def row_names(rows: list[dict], unseen: tuple[int, ...]) -> dict[str, list[int]]:
    """Row name -> indices into `rows` (the query rows of one trial)."""
    names: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["query_set"] == "mlr":
            names["lr"].append(i)
            names[f"r{r['rate']}"].append(i)
        elif r["query_set"] == "native":  # a genuine-LR dataset's queries: the headline row, by no rate
            names["lr"].append(i)
        else:  # "hr" or "r<unseen>"
            names[r["query_set"]].append(i)
    order = ["lr"] + sorted((n for n in names if n[1:].isdigit() and int(n[1:]) not in unseen),
                            key=lambda n: int(n[1:])) + [f"r{u}" for u in unseen if f"r{u}" in names] + ["hr"]
    return {n: names[n] for n in order if n in names}


def score_trial(model: Any, params: Params, mlr_path: Path, trial: int, store: ImageStore, split: str = TEST
                ) -> tuple[dict[str, list[tuple[int, np.ndarray, float]]], dict[str, Any]]:
    """(CMC, AP) of every evaluation row of `trial` for each gallery draw, and what the pictures need, on the
    test split or (`split="val"`) on the validation identities; neither reads the other's rows."""
    from rain_model.metrics import pairwise_distance, single_shot_gallery
    from tasks.images.loaders import read_rows
    from tasks.registry.embed import embed_store

    cfg = params.evaluate
    queries = read_rows(str(mlr_path), trial, [role(split, "query")])
    gallery_rows = read_rows(str(mlr_path), trial, [role(split, "gallery"), role(split, "gallery_pool")])
    if not queries or not gallery_rows:
        raise ValueError(f"{mlr_path}: trial {trial} has no {split} queries or no {split} gallery")
    paths = sorted({r["path"] for r in queries} | {r["path"] for r in gallery_rows})
    feats = embed_store(model, store, paths, (params.train.height, params.train.width), cfg.batch_size, cfg.flip)
    index = {p: i for i, p in enumerate(paths)}
    q_feat = feats[[index[r["path"]] for r in queries]]
    g_feat = feats[[index[r["path"]] for r in gallery_rows]]
    dist = pairwise_distance(q_feat, g_feat, metric="cosine" if cfg.distance == "cosine" else "euclidean")
    q_pids = np.array([r["person_id"] for r in queries])
    q_cams = np.array([r["camera_id"] for r in queries])
    g_pids = np.array([r["person_id"] for r in gallery_rows])
    g_cams = np.array([r["camera_id"] for r in gallery_rows])
    first = np.array([i for i, r in enumerate(gallery_rows) if r["role"] == role(split, "gallery")])
    draws = [first, *single_shot_gallery(g_pids, g_cams, seed=params.protocol.seed + trial,
                                         repeats=cfg.gallery_repeats - 1)]
    results: dict[str, list[tuple[int, np.ndarray, float]]] = defaultdict(list)
    for name, rows_idx in row_names(queries, params.protocol.unseen_rates).items():
        for cmc, mean_ap in score_rows(dist[np.asarray(rows_idx)], q_pids[rows_idx], q_cams[rows_idx], g_pids,
                                       g_cams, draws):
            results[name].append((trial, cmc, mean_ap))
    pictures = {"queries": queries, "gallery": [gallery_rows[i] for i in first], "q_feat": q_feat,
                "g_feat": g_feat[first], "dist": dist[:, first]}
    return results, pictures


def score_rows(dist: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray,
               draws: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
    """(CMC, mAP) per gallery draw for queries with distances `dist` (Q, G) to every HR image of the test
    identities. CMC is single-shot, on the draw's one image per identity (the paper's protocol); mAP is over
    all G images, where a query has several true matches, so it is the same for every draw and can be below
    rank-1 (over a single-shot gallery AP = 1 / rank, which would make mAP >= rank-1 by construction)."""
    from rain_model.metrics import evaluate_rank

    _, mean_ap = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max(RANKS))
    out = []
    for g_idx in draws:
        cmc, _ = evaluate_rank(dist[:, g_idx], q_pids, g_pids[g_idx], q_cams, g_cams[g_idx], max_rank=max(RANKS))
        out.append((cmc, mean_ap))
    return out


# What metrics.json says about its figures (tasks/evaluate.py writes it there).
PROTOCOL_NOTE = {"queries": "lr: the distant camera's images, down-sampled at the MLR rates (on a genuine-LR "
                            "dataset such as CAVIAR: as they are)",
                 "cmc": "single-shot: one HR gallery image per test identity, drawn evaluate.gallery_repeats times",
                 "mAP": "over every HR image of the test identities (gallery and gallery_pool): several true "
                        "matches per query, so mAP can be below rank-1"}


def summarise(name: str, evals: list[tuple[int, np.ndarray, float]]) -> dict[str, Any]:
    """Mean over gallery draws within each trial, then mean and std over trials; with one trial the
    std is over its gallery draws (metrics.json says which in `std_over`). The std is the sample one
    (``rain_model.metrics.mean_std``). With one trial there is no `mAP_std`: mAP is over every HR image of
    the test identities, the same for every draw, and a "± 0.0" would read as a measured stability."""
    trials = sorted({t for t, _, _ in evals})
    cmcs = np.stack([c for _, c, _ in evals])  # (E, max_rank)
    maps = np.array([m for _, _, m in evals])  # (E,)
    if len(trials) > 1:
        cmcs = np.stack([np.mean([c for t, c, _ in evals if t == k], axis=0) for k in trials])  # (T, max_rank)
        maps = np.array([np.mean([m for t, _, m in evals if t == k]) for k in trials])  # (T,)
    cmc_mean, cmc_std = mean_std(cmcs)  # (max_rank,) each
    map_mean, map_std = mean_std(maps)
    out: dict[str, Any] = {"row": name}
    for r in RANKS:
        out[f"rank{r}"] = round(float(cmc_mean[r - 1]), 6)
        out[f"rank{r}_std"] = round(float(cmc_std[r - 1]), 6)
    out["mAP"] = round(float(map_mean), 6)
    if len(trials) > 1:
        out["mAP_std"] = round(float(map_std), 6)
    return out


ROW_LABELS = {"lr": "LR queries", "hr": "HR queries (no down-sampling)"}


def row_label(name: str, unseen: tuple[int, ...]) -> str:
    if name in ROW_LABELS:
        return ROW_LABELS[name]
    rate = int(name[1:])
    return f"LR r={rate}" + (" (unseen)" if rate in unseen else "")
