"""Stage `synthesize`: the MLR protocol (tasks/protocol/mlr.py) on the HR manifest.

Reads the HR manifest and its images; writes the LR copies into <paths.lr>/<dataset>/ and the MLR manifest
<paths.manifests>/<dataset>-mlr.parquet (schema in tasks/protocol/mlr.py).
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import Params, load_params
from tasks.infra.logs import setup_logging
from tasks.protocol.mlr import synthesize


def run(params: Params, raw_dir: Path, manifest_path: Path, lr_dir: Path, mlr_path: Path) -> dict[str, int]:
    return synthesize(params, raw_dir, manifest_path, lr_dir, mlr_path)


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.raw_dir(), params.manifest_path(), params.lr_dir(), params.mlr_manifest_path())


if __name__ == "__main__":
    main()
