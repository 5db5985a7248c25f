"""Stage `decode`: every image of the MLR manifest decoded once into the decoded-image store.

Reads the MLR manifest (and the HR and LR images it names); writes <paths.store>/<dataset>/ (pixels.npy,
index.json: see tasks/images/store.py), each image at the model's input size (train.height x train.width),
which training and evaluation read instead of decoding the files again every epoch.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import Params, load_params
from tasks.images.store import decode_manifest
from tasks.infra.logs import setup_logging


def run(params: Params, mlr_path: Path, store_dir: Path) -> dict[str, int]:
    return decode_manifest(params, mlr_path, store_dir)


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.mlr_manifest_path(), params.store_dir())


if __name__ == "__main__":
    main()
