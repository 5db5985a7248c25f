"""A model registered before `model.base_channels` existed still loads: it was trained at torchvision's width."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from rain_model.config import ModelConfig
from rain_model.network import RAIN
from tasks.registry.pyfunc_model import RainEmbedder


def test_settings_without_base_channels_load_at_torchvisions_width(tmp_path: Path) -> None:
    cfg = ModelConfig(base_channels=64)
    assert ModelConfig().base_channels != 64  # else this test would pass without the fallback
    weights = tmp_path / "weights.safetensors"
    save_file(RAIN(cfg, 3).state_dict(), str(weights))
    settings = dataclasses.asdict(cfg)
    del settings["base_channels"]  # as register wrote them before the key existed
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": settings, "num_classes": 3, "height": 64, "width": 32, "flip": False}))
    embedder = RainEmbedder()
    embedder.load_context(SimpleNamespace(artifacts={"weights": str(weights), "config": str(config)}))
    assert embedder.model.generator.backbone.channels[0] == 64
    assert embedder.model.embed(torch.rand(1, 3, 64, 32)).shape == (1, 512)
