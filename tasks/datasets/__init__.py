"""Dataset adapters by params name (`dataset.name` in params.yaml)."""

from __future__ import annotations

from tasks.datasets.base import DatasetAdapter, DatasetError, RawImage
from tasks.datasets.caviar import CaviarDataset
from tasks.datasets.cuhk03 import CUHK03Dataset
from tasks.datasets.custom import CustomDataset
from tasks.datasets.market1501 import Market1501Dataset
from tasks.datasets.synthetic import SyntheticDataset
from tasks.datasets.viper import VIPeRDataset

ADAPTERS: dict[str, DatasetAdapter] = {
    SyntheticDataset.name: SyntheticDataset(),
    VIPeRDataset.name: VIPeRDataset(),
    "cuhk03": CUHK03Dataset("labeled"),
    "cuhk03-detected": CUHK03Dataset("detected"),
    CaviarDataset.name: CaviarDataset(),
    Market1501Dataset.name: Market1501Dataset(),
    CustomDataset.name: CustomDataset(),
}


def get_adapter(name: str) -> DatasetAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r} (dataset.name in params.yaml); known: "
                           f"{', '.join(sorted(ADAPTERS))}") from None


__all__ = ["ADAPTERS", "DatasetAdapter", "DatasetError", "RawImage", "get_adapter"]
