"""The MLR protocol (DESIGN.md, Protocol) as LR images plus one Parquet manifest (stage `synthesize`,
and the grid's training-rate variants).

Every image gets a down-sampling rate r drawn from `protocol.train_rates` by a generator seeded with
the protocol seed and the image's path (so the draw does not depend on order or worker count), and an
LR copy: shrunk by r, then brought back to its original size with bilinear interpolation. View-1
images (the distant camera of each pair) also get a copy at every unseen rate.

MLR manifest schema, one row per (trial, role, image):
  trial, role (train | query | gallery | gallery_pool, and val_query | val_gallery | val_gallery_pool for
  the validation identities of `protocol.val_identities`), query_set (mlr | hr | r<rate> for queries, or
  native on a genuine-LR dataset; "" otherwise), person_id, camera_id, camera_pair, rate (1 = HR), path
  (the image this row feeds to the model, relative to the project folder), hr_path (its HR source),
  lr_path (train: its LR copy; query: = path; else ""), label (train: class index 0..K-1 of the trial's
  training identities; -1 otherwise).
Per trial, identities seen by both views are split at random (seeded) into train and test; a test
identity's view-1 images are the queries, and one of its view-0 images, drawn at random, is the
single-shot gallery (the rest are `gallery_pool`, for repeated single-shot draws at evaluation). On a
genuine-LR dataset (the adapter's `native_lr_queries`: CAVIAR) the queries are the view-1 images as they are
(query_set native), not shrunk again, and there are no HR or unseen-rate query sets.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.config import Params, ProtocolConfig
from tasks.datasets import get_adapter
from tasks.images.imageio import load_rgb
from tasks.infra.parallel import map_chunks, worker_count
from tasks.protocol.splits import TEST, VAL, role

log = logging.getLogger(__name__)

MLR_SCHEMA = pa.schema([
    ("trial", pa.int32()),
    ("role", pa.string()),
    ("query_set", pa.string()),
    ("person_id", pa.int64()),
    ("camera_id", pa.int32()),
    ("camera_pair", pa.int32()),
    ("rate", pa.int32()),
    ("path", pa.string()),
    ("hr_path", pa.string()),
    ("lr_path", pa.string()),
    ("label", pa.int64()),
])


def draw_rate(path: str, cfg: ProtocolConfig) -> int:
    """The image's down-sampling rate: seeded by the protocol seed and the path, nothing else."""
    key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    rng = np.random.default_rng([cfg.seed, key])
    return int(cfg.train_rates[rng.integers(len(cfg.train_rates))])


def lr_stem(path: str) -> str:
    """Where an image's LR copies go, relative to the LR folder. Paths relative to the raw folder keep
    their layout; absolute ones (a user's own data lives anywhere) get a name keyed by the whole path,
    so LR copies never land outside the LR folder and two folders' `0001.jpg` never collide."""
    if Path(path).is_absolute():
        key = hashlib.sha256(path.encode()).hexdigest()[:16]
        return f"external/{key}-{Path(path).stem}"
    return Path(path).with_suffix("").as_posix()


def degrade(img: Image.Image, rate: int) -> Image.Image:
    """Shrink by `rate`, then bilinear back to the original size (the paper's synthetic LR image)."""
    small = img.resize((max(1, round(img.width / rate)), max(1, round(img.height / rate))),
                       Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.BILINEAR)


def _degrade_chunk(jobs: Sequence[tuple[str, str, tuple[int, ...]]], formats: tuple[str, ...]) -> list[int]:
    written = []
    made: set[str] = set()  # one mkdir per folder, not per file
    for src, dst_stem, rates in jobs:
        hr = load_rgb(src, formats, verify=False)  # checked at ingest (manifest stage)
        folder = os.path.dirname(dst_stem)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        for rate in rates:
            degrade(hr, rate).save(f"{dst_stem}_r{rate}.png", compress_level=1)
        written.append(len(rates))
    return written


def split_identities(person_ids: Sequence[int], trial: int, cfg: ProtocolConfig,
                     paper_split: int | None = None) -> tuple[set[int], set[int]]:
    """(train, test) identities of `trial`. The test set has `protocol.test_identities` of them; when that is 0,
    `paper_split` (the dataset's paper split, e.g. CUHK03's 100), or half when the dataset has none."""
    ids = np.array(sorted(set(person_ids)))
    n_test = cfg.test_identities or paper_split or len(ids) // 2
    if not 0 < n_test < len(ids):
        source = (f"protocol.test_identities = {cfg.test_identities}" if cfg.test_identities else
                  f"the dataset's paper split of {paper_split} test identities (protocol.test_identities = 0)"
                  if paper_split else "half of the identities (protocol.test_identities = 0)")
        raise ValueError(f"{source}: need between 1 and {len(ids) - 1} of the {len(ids)} identities seen by "
                         f"both views")
    order = np.random.default_rng([cfg.seed, trial]).permutation(ids)
    return {int(i) for i in order[n_test:]}, {int(i) for i in order[:n_test]}


def split_validation(train_ids: set[int], trial: int, cfg: ProtocolConfig) -> tuple[set[int], set[int]]:
    """(train, validation) identities: `protocol.val_identities` of the trial's training identities, drawn
    by their own seeded generator, so the test split and its gallery draws stay those without validation."""
    if cfg.val_identities == 0:
        return train_ids, set()
    ids = np.array(sorted(train_ids))
    if not cfg.val_identities <= len(ids) - 2:
        raise ValueError(f"protocol.val_identities = {cfg.val_identities}: trial {trial} has {len(ids)} training "
                         f"identities seen by both views, and at least 2 must stay for training")
    order = np.random.default_rng([cfg.seed, trial, 2]).permutation(ids)
    return {int(i) for i in order[cfg.val_identities:]}, {int(i) for i in order[:cfg.val_identities]}


def synthesize(params: Params, raw_dir: Path, manifest_path: Path, lr_dir: Path, mlr_path: Path) -> dict[str, int]:
    cfg = params.protocol
    adapter = get_adapter(params.dataset.name)
    images = pq.read_table(manifest_path).to_pylist()
    if not images:
        raise ValueError(f"{manifest_path}: the manifest has no images")
    for img in images:  # every path derived once here; trial rows only copy them
        img["rate"] = draw_rate(img["path"], cfg)
        img["hr_path"] = (raw_dir / img["path"]).as_posix()
        stem = (lr_dir / lr_stem(img["path"])).as_posix()
        img["lr_stem"] = stem
        img["lr_path"] = img["hr_path"] if img["rate"] == 1 else f"{stem}_r{img['rate']}.png"

    jobs = []
    for img in images:
        rates = {img["rate"]} - {1}
        if img["view"] == 1 and not adapter.native_lr_queries:  # unseen-rate query sets
            rates |= set(cfg.unseen_rates)
        if rates:
            jobs.append((img["hr_path"], img["lr_stem"], tuple(sorted(rates))))

    summary: dict[str, int] = {}

    def write_manifest() -> None:  # runs while the pool writes LR images
        views: dict[int, set[int]] = {}
        for img in images:
            views.setdefault(img["person_id"], set()).add(img["view"])
        both = [pid for pid, v in views.items() if v == {0, 1}]
        rows: list[dict] = []
        for trial in range(cfg.trials):
            train_ids, test_ids = split_identities(both, trial, cfg, adapter.test_identities(params))
            train_ids, val_ids = split_validation(train_ids, trial, cfg)
            train_ids |= {pid for pid, v in views.items() if v != {0, 1}}  # one-view identities: train only
            labels = {pid: i for i, pid in enumerate(sorted(train_ids))}
            rows += _trial_rows(trial, images, labels, test_ids, cfg, adapter.native_lr_queries)
            rows += _trial_rows(trial, images, {}, val_ids, cfg, adapter.native_lr_queries, split=VAL)
            summary["test_identities"] = len(test_ids)
        mlr_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=MLR_SCHEMA), mlr_path)

    written = map_chunks(functools.partial(_degrade_chunk, formats=tuple(adapter.image_formats)), jobs,
                         worker_count(cfg.workers), chunk_size=32, meanwhile=write_manifest)
    summary |= {"images": len(images), "lr_images": int(sum(written)), "trials": cfg.trials}
    log.info("synthesize: %(lr_images)d LR images from %(images)d HR images, %(trials)d trials, "
             "%(test_identities)d test identities per trial", summary)
    return summary


def _trial_rows(trial: int, images: list[dict], labels: dict[int, int], eval_ids: set[int],
                cfg: ProtocolConfig, native_lr: bool = False, split: str = TEST) -> list[dict]:
    """The trial's rows: training rows of the `labels` identities, and the query and gallery rows of the
    `eval_ids` identities, with roles `role(split, ...)`. A validation split gets only the headline LR queries."""
    rng = np.random.default_rng([cfg.seed, trial, 1 if split == TEST else 3])
    rows: list[dict] = []

    def row(img: dict, kind: str, query_set: str, rate: int, path: str, lr_path: str, label: int) -> dict:
        return {"trial": trial, "role": role(split, kind), "query_set": query_set, "person_id": img["person_id"],
                "camera_id": img["camera_id"], "camera_pair": img["camera_pair"], "rate": rate,
                "path": path, "hr_path": img["hr_path"], "lr_path": lr_path, "label": label}

    galleries: dict[int, list[dict]] = {}
    for img in images:
        pid = img["person_id"]
        if pid in labels:
            rows.append(row(img, "train", "", img["rate"], img["hr_path"], img["lr_path"], labels[pid]))
        elif pid in eval_ids and img["view"] == 1 and native_lr:  # the distant camera's image as it is
            rows.append(row(img, "query", "native", 1, img["hr_path"], img["hr_path"], -1))
        elif pid in eval_ids and img["view"] == 1:
            rows.append(row(img, "query", "mlr", img["rate"], img["lr_path"], img["lr_path"], -1))
            if split == VAL:  # what choosing needs: the headline LR queries
                continue
            rows.append(row(img, "query", "hr", 1, img["hr_path"], img["hr_path"], -1))
            for rate in cfg.unseen_rates:
                unseen = f"{img['lr_stem']}_r{rate}.png"
                rows.append(row(img, "query", f"r{rate}", rate, unseen, unseen, -1))
        elif pid in eval_ids:
            galleries.setdefault(pid, []).append(img)
    for pid in sorted(galleries):
        pool = galleries[pid]
        chosen = int(rng.integers(len(pool)))
        for i, img in enumerate(pool):
            rows.append(row(img, "gallery" if i == chosen else "gallery_pool", "", 1, img["hr_path"], "", -1))
    return rows
