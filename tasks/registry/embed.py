"""Load trained weights and turn images into L2-comparable embeddings v = GAP(f5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from rain_model.config import ModelConfig
from rain_model.network import RAIN
from tasks.images.loaders import load_tensor
from tasks.images.store import ImageStore


def load_model(weights: Path, cfg: ModelConfig, num_classes: int, device: str = "cpu") -> RAIN:
    from safetensors.torch import load_file

    # The weights hold every parameter, the pretrained ones included: reading `pretrained_path` again would
    # only make loading need a file from the training machine.
    model = RAIN(dataclasses.replace(cfg, pretrained=None, pretrained_path=None), num_classes)
    model.load_state_dict(load_file(str(weights), device=device))
    return model.to(device).eval()


def retrieval_feature(model: RAIN, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, d) v; with `flip`, averaged with the mirrored image's. What either runtime
    computes: embed_batch through PyTorch, and the graph onnx_model exports."""
    v = model.embed(x)  # (B, d)
    if flip:
        v = (v + model.embed(torch.flip(x, dims=[3]))) / 2
    return v


@torch.inference_mode()
def embed_batch(model: RAIN, x_uint8: torch.Tensor, flip: bool) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, d) float features; with `flip`, averaged with the mirrored image."""
    device = next(model.parameters()).device
    return retrieval_feature(model, x_uint8.to(device).float().div_(255), flip).float().cpu()


def embed_paths(model: RAIN, paths: Sequence[str], size: tuple[int, int], batch_size: int = 64,
                flip: bool = True) -> np.ndarray:
    """Features of image files, decoded by Pillow (search, serving: images outside any store)."""
    batches = (torch.stack([load_tensor(p, size) for p in paths[i:i + batch_size]])  # (B, 3, H, W)
               for i in range(0, len(paths), batch_size))
    return _embed_all(model, batches, flip)


def embed_store(model: RAIN, store: ImageStore, paths: Sequence[str], size: tuple[int, int], batch_size: int = 64,
                flip: bool = True) -> np.ndarray:
    """Features of manifest images read from the decoded-image store: the same pixels as `embed_paths`."""
    rows = store.rows(paths, size)
    return _embed_all(model, (store.read(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)), flip)


def _embed_all(model: RAIN, batches: Iterable[torch.Tensor], flip: bool) -> np.ndarray:
    out = [embed_batch(model, x, flip) for x in batches]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)
