"""Stage `grid_data`: the training LR images Tables 2 and 4 need, one folder per rate set.

Each rate set of the grid other than protocol.train_rates is synthesized by the MLR protocol's code
(tasks/protocol/mlr.py) with only the rates changed, and decoded as the decode stage does, into
<experiments>/<dataset>/data/rates-<r...>/ (lr/, mlr.parquet and store/).
The train/test split does not depend on the rates, so these runs train on the same identities as the
pipeline's and are tested on the pipeline's MLR queries (rates {2, 3, 4} and the unseen ones).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

from tasks.config import Params, load_params
from tasks.grid import configs as grid
from tasks.grid.data import data_dir, variant_dir
from tasks.infra.logs import setup_logging

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, int]:
    from tasks.images.store import decode_manifest
    from tasks.protocol.mlr import synthesize

    out = data_dir(params)
    if out.exists():
        shutil.rmtree(out)  # a DVC output: rebuilt whole, nothing stale survives a change of the grid
    out.mkdir(parents=True)
    summary: dict[str, int] = {}
    for rates in grid.rate_variants(params):
        variant = dataclasses.replace(params, protocol=dataclasses.replace(params.protocol, train_rates=rates))
        folder = variant_dir(params, rates)
        done = synthesize(variant, params.raw_dir(), params.manifest_path(), folder / "lr", folder / "mlr.parquet")
        decode_manifest(variant, folder / "mlr.parquet", folder / "store")
        summary[grid.rates_key(rates)] = done["lr_images"]
    log.info("grid_data: %s", summary or "no rate variants needed")
    return summary


def main() -> None:
    setup_logging()
    run(load_params())


if __name__ == "__main__":
    main()
