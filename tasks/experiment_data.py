"""Stage `experiment_data`: the training LR images Tables 2 and 4 need, one folder per rate set.

Each rate set of the grid other than protocol.train_rates is synthesized by the synthesize stage's own
code with only the rates changed, and decoded by the decode stage's own code, into
<experiments>/<dataset>/data/rates-<r...>/ (lr/, mlr.parquet and store/).
The train/test split does not depend on the rates, so these runs train on the same identities as the
pipeline's and are tested on the pipeline's MLR queries (rates {2, 3, 4} and the unseen ones).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from tasks import grid
from tasks.config import Params, ParamsError, load_params
from tasks.logs import setup_logging

log = logging.getLogger(__name__)


def variant_dir(params: Params, rates: tuple[int, ...]) -> Path:
    return params.experiments_dir() / "data" / grid.rates_key(rates)


def data_dir(params: Params) -> Path:
    return params.experiments_dir() / "data"


def train_manifest(params: Params, config: str) -> Path:
    """The MLR manifest whose training rows configuration `config` trains on."""
    if config not in grid.CONFIGS:
        raise ParamsError(f"unknown experiment configuration {config!r}: choose from {list(grid.CONFIGS)}")
    rates = grid.CONFIGS[config].train_rates
    if rates is None or rates == tuple(params.protocol.train_rates):
        return params.mlr_manifest_path()
    return variant_dir(params, rates) / "mlr.parquet"


def train_store(params: Params, config: str) -> Path:
    """The decoded-image store holding the images of `train_manifest(params, config)`."""
    manifest = train_manifest(params, config)
    return params.store_dir() if manifest == params.mlr_manifest_path() else manifest.parent / "store"


def run(params: Params) -> dict[str, int]:
    from tasks import decode, synthesize

    out = data_dir(params)
    if out.exists():
        shutil.rmtree(out)  # a DVC output: rebuilt whole, nothing stale survives a change of the grid
    out.mkdir(parents=True)
    summary: dict[str, int] = {}
    for rates in grid.rate_variants(params):
        variant = dataclasses.replace(params, protocol=dataclasses.replace(params.protocol, train_rates=rates))
        folder = variant_dir(params, rates)
        done = synthesize.run(variant, params.raw_dir(), params.manifest_path(), folder / "lr",
                              folder / "mlr.parquet")
        decode.run(variant, folder / "mlr.parquet", folder / "store")
        summary[grid.rates_key(rates)] = done["lr_images"]
    log.info("experiment_data: %s", summary or "no rate variants needed")
    return summary


def main() -> None:
    setup_logging()
    run(load_params())


if __name__ == "__main__":
    main()
