"""Stage `grid_data`: the training data the grid needs beyond the pipeline's: other LR rates (Table 4) and
a validation split (the L_adv sweep), one folder per (rates, validation identities).

Each variant is synthesized by the MLR protocol's code (tasks/protocol/mlr.py) with only the rates and
`protocol.val_identities` changed, and decoded as the decode stage does, into
<experiments>/<dataset>/data/rates-<r...>[-val<n>]/ (lr/, mlr.parquet and store/). The train/test split
depends on neither (validation identities come out of the training ones), so these runs are tested on the
pipeline's MLR queries (rates {2, 3, 4} and the unseen ones).
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
    for rates, val in grid.data_variants(params):
        variant = dataclasses.replace(params, protocol=dataclasses.replace(params.protocol, train_rates=rates,
                                                                            val_identities=val))
        folder = variant_dir(params, rates, val)
        done = synthesize(variant, params.raw_dir(), params.manifest_path(), folder / "lr", folder / "mlr.parquet")
        decode_manifest(variant, folder / "mlr.parquet", folder / "store")
        summary[grid.data_key(rates, val)] = done["lr_images"]
    log.info("grid_data: %s", summary or "no data variants needed")
    return summary


def main() -> None:
    setup_logging()
    run(load_params())


if __name__ == "__main__":
    main()
