"""Where a grid run's training data lives: the pipeline's MLR manifest and store, or the rate variant
that the grid_data stage synthesizes for Tables 2 and 4."""

from __future__ import annotations

from pathlib import Path

from tasks.config import Params, ParamsError
from tasks.grid import configs as grid


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
