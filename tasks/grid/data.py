"""Where a grid run's training data lives: the pipeline's MLR manifest and store, or the variant that the
grid_data stage synthesizes (other training rates for Table 4, a validation split for the L_adv sweep)."""

from __future__ import annotations

from pathlib import Path

from tasks.config import Params, ParamsError
from tasks.grid import configs as grid


def variant_dir(params: Params, rates: tuple[int, ...], val_identities: int) -> Path:
    return data_dir(params) / grid.data_key(rates, val_identities)


def data_dir(params: Params) -> Path:
    return params.experiments_dir() / "data"


def train_manifest(params: Params, config: str) -> Path:
    """The MLR manifest whose training (and validation) rows configuration `config` trains on."""
    if config not in grid.CONFIGS:
        raise ParamsError(f"unknown experiment configuration {config!r}: choose from {list(grid.CONFIGS)}")
    rates, val = grid.data_protocol(params, config)
    if (rates, val) == (tuple(params.protocol.train_rates), params.protocol.val_identities):
        return params.mlr_manifest_path()
    return variant_dir(params, rates, val) / "mlr.parquet"


def train_store(params: Params, config: str) -> Path:
    """The decoded-image store holding the images of `train_manifest(params, config)`."""
    manifest = train_manifest(params, config)
    return params.store_dir() if manifest == params.mlr_manifest_path() else manifest.parent / "store"
