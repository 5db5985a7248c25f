"""The registered model: an MLflow pyfunc that turns images into L2-normalised RAIN embeddings.

Logged as "models from code" (this file is the model definition, nothing is pickled) with the weights
as a safetensors artifact, so loading a registered model never unpickles anything.

Input: a DataFrame with a column `image` holding encoded image bytes (PNG, JPEG, BMP), or their
base64 text (what JSON requests to `mlflow models serve` carry). Output: an (N, d) float32 array of
unit-norm embeddings; compare them with Euclidean distance or dot product.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import mlflow.pyfunc
import numpy as np


class InvalidInput(ValueError):
    """A request the model cannot answer; becomes a 4xx with this message when served."""


def _decode(value: object, row: int) -> Any:
    from PIL import Image

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"row {row}: `image` is text but not base64 ({exc})") from exc
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput(f"row {row}: `image` must be image bytes or base64 text, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value), formats=["PNG", "JPEG", "BMP"]) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"row {row}: not a decodable PNG/JPEG/BMP image ({exc})") from exc


class RainEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from rain_model.config import ModelConfig
        from tasks.config import parse
        from tasks.embed import load_model

        with open(context.artifacts["config"]) as fh:
            meta = json.load(fh)
        self.size = (int(meta["height"]), int(meta["width"]))
        self.flip = bool(meta["flip"])
        cfg = parse(ModelConfig, meta["model"], "model")
        self.model = load_model(context.artifacts["weights"], cfg, int(meta["num_classes"]))

    # No type hints on predict: MLflow would read them as a schema; the signature comes from the example.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd
        import torch
        from PIL import Image

        from tasks.embed import embed_batch

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise InvalidInput(f"input needs a column `image`; got columns {list(model_input.columns)}")
            values = model_input["image"].tolist()
        else:
            raise InvalidInput(f"input must be a table with a column `image`, got {type(model_input).__name__}")
        if not values:
            raise InvalidInput("empty batch: send at least one image")
        tensors = []
        for row, value in enumerate(values):
            img = _decode(value, row).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        v = embed_batch(self.model, torch.stack(tensors), self.flip)  # (N, d)
        return torch.nn.functional.normalize(v, dim=1).numpy().astype(np.float32)


mlflow.models.set_model(RainEmbedder())
