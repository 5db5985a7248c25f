"""Images from the MLR manifest as tensors, and the manifest rows a stage reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.images.imageio import load_rgb

# Stored LR images are PNG; HR images are whatever the dataset ships (all checked at ingest).
LOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "PPM", "WEBP")


def read_rows(mlr_path: str, trial: int, roles: Sequence[str]) -> list[dict]:
    table = pq.read_table(mlr_path, filters=[("trial", "=", trial)])
    table = table.filter(pc.is_in(table["role"], value_set=pa.array(list(roles))))
    return table.to_pylist()


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image as uint8 (3, H, W) at the model's input size (bilinear): training, evaluation and
    the served model all go through here, so their features agree."""
    if (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W)


def load_tensor(path: str, size: tuple[int, int]) -> torch.Tensor:
    return to_tensor(load_rgb(path, LOAD_FORMATS), size)


def semi_supervised_labels(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Keep the labels of a seeded `fraction` of the identities, renumbered 0..M-1 in their order; the others
    become -1 (unlabelled). Nothing downstream sees an unlabelled image's identity: the batch sampler groups
    only the labelled ones, and the classifier C has one output per labelled identity (Figure 5's setting)."""
    classes = sorted(set(labels))
    keep_n = round(fraction * len(classes))
    kept = sorted(np.random.default_rng(seed).permutation(classes)[:keep_n].tolist())
    dense = {y: i for i, y in enumerate(kept)}
    return [dense.get(y, -1) for y in labels]
