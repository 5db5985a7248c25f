"""Stage `decode`: every image of the MLR manifest decoded once into the decoded-image store.

Reads the MLR manifest (and the HR and LR images it names); writes <paths.store>/<dataset>/ (pixels.npy,
index.json: see tasks/imagestore.py), each image at the model's input size (train.height x train.width),
which training and evaluation read instead of decoding the files again every epoch.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from tasks.config import Params, load_params
from tasks.imagestore import build, manifest_images
from tasks.logs import setup_logging
from tasks.parallel import worker_count

log = logging.getLogger(__name__)


def run(params: Params, mlr_path: Path, store_dir: Path) -> dict[str, int]:
    paths = manifest_images(pq.read_table(mlr_path, columns=["path", "hr_path", "lr_path"]).to_pylist())
    if store_dir.exists():
        shutil.rmtree(store_dir)  # a DVC output: rebuilt whole
    started = time.perf_counter()
    count = build(paths, (params.train.height, params.train.width), store_dir, worker_count(params.protocol.workers))
    seconds = time.perf_counter() - started
    log.info("decode: %d images at %dx%d into %s in %.1f s", count, params.train.height, params.train.width,
             store_dir, seconds)
    return {"images": count}


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.mlr_manifest_path(), params.store_dir())


if __name__ == "__main__":
    main()
