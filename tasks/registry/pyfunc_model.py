"""The registered model: an MLflow pyfunc that turns images into L2-normalised RAIN embeddings.

Logged as "models from code" (this file is the model definition, nothing is pickled) with the weights
as a safetensors artifact and its settings as JSON, so loading a registered model never unpickles
anything: it loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Input: a table with one column ``image`` whose cells are encoded images (PNG, JPEG, BMP, TIFF, PPM,
WebP: the formats the training loader reads) as base64 text, which is what JSON requests to
``mlflow models serve`` carry; in-process callers may pass the raw bytes instead. Images are decoded
as strictly as at ingest (``tasks.images.imageio``: decompression bombs and truncated files are refused) and
resized exactly like the training loader does, so a served embedding equals the evaluation's feature
of the same file. Output: an (N, d) float32 array of unit-norm embeddings; rank a gallery by Euclidean
distance or, equivalently, by dot product.

Runtime (MLflow's model_config ``{"runtime": "torch" | "onnx"}`` at load, tasks/registry/runtime.py): `torch`
(the default) embeds with the safetensors weights through PyTorch; `onnx` with the model's ONNX export (its artifact
``onnx``, tasks/registry/onnx_model.py) through onnxruntime. Decoding, limits and normalisation are the same code for
both. A version registered before the export, loaded with `onnx`, raises ``NoOnnxModel``.

Limits (``serve`` in params.yaml, carried in the model's settings): at most ``max_images`` rows per call
and ``max_pixels`` pixels per image. Both are checked before any pixel is decoded (the size comes from
each image's header), so an oversized request costs milliseconds, not the seconds and gigabytes that
decoding it would. A model registered before the limits existed gets the defaults of ``ServeConfig``.

A request the model cannot answer (no rows, no ``image`` column, a cell that is not text or bytes,
text that is not base64, bytes that are not an image, more images or pixels than the limits) raises
:class:`InvalidInput`, an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the scoring server
turns into a 400 whose body carries the message (any other exception would come back as a generic 400
without it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

# Images per forward pass: a large request is embedded in chunks rather than in one huge batch.
CHUNK = 64


class InvalidInput(MlflowException):
    """A request the model cannot answer; served, it becomes a 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value: object, row: int) -> bytes:
    """The encoded image in one cell: base64 text (JSON requests) or raw bytes (in-process)."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"row {row}: `image` is text but not base64 ({exc})") from exc
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise InvalidInput(f"row {row}: `image` must be base64 text or bytes of an encoded image, "
                       f"got {type(value).__name__}")


def fingerprint(weights_path: str, config_path: str, runtime_file: str | None = None) -> str:
    """sha256 of the weights and the settings (and of the ONNX file the `onnx` runtime runs): what an embedding
    depends on (the search cache key). The runtimes' embeddings differ in their last digits, so a search with one
    never reads the other's cached vectors."""
    digest = hashlib.sha256()
    for path in (weights_path, config_path, *([runtime_file] if runtime_file else [])):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class RainEmbedder(PythonModel):
    embed: Callable[[Any], Any]  # (B, 3, H, W) uint8 tensor -> (B, d) float32 tensor, in the loaded runtime

    def load_context(self, context: Any) -> None:
        from tasks.config import ServeConfig, parse
        from tasks.registry.runtime import runtime_of

        with open(context.artifacts["config"]) as fh:
            meta = json.load(fh)
        self.size = (int(meta["height"]), int(meta["width"]))
        self.flip = bool(meta["flip"])
        self.limits = parse(ServeConfig, meta.get("serve"), "serve")
        self.runtime = runtime_of(getattr(context, "model_config", None))
        if self.runtime == "onnx":
            self._load_onnx(context.artifacts)
        else:
            self._load_torch(context.artifacts, meta)

    def _load_torch(self, artifacts: dict[str, str], meta: dict[str, Any]) -> None:
        from rain_model.config import ModelConfig
        from tasks.config import parse
        from tasks.registry.embed import embed_batch, load_model

        # load_model ignores pretrained_path (embed.py); a model registered before `base_channels` existed
        # was trained at torchvision's width
        cfg = parse(ModelConfig, {"base_channels": 64, **meta["model"]}, "model")
        self.model = load_model(Path(artifacts["weights"]), cfg, int(meta["num_classes"]))
        self.embed = lambda x_uint8: embed_batch(self.model, x_uint8, self.flip)
        self.fingerprint = fingerprint(artifacts["weights"], artifacts["config"])

    def _load_onnx(self, artifacts: dict[str, str]) -> None:
        from tasks.registry.onnx_model import OnnxEmbedder
        from tasks.registry.runtime import NO_ONNX, NoOnnxModel

        if "onnx" not in artifacts:
            raise NoOnnxModel(NO_ONNX)
        self.embed = OnnxEmbedder(Path(artifacts["onnx"]))  # the flip average is in the graph
        self.fingerprint = fingerprint(artifacts["weights"], artifacts["config"], str(self.embed.path))

    # pd.DataFrame is a hint MLflow infers no schema from: the signature comes from the input example.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        if not isinstance(model_input, pd.DataFrame):
            raise InvalidInput(f"input must be a table with one column `image`, got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise InvalidInput(f"input needs a column `image` (base64-encoded images); got columns "
                               f"{[str(c) for c in model_input.columns]}")
        values = model_input["image"].tolist()
        if not values:
            raise InvalidInput("empty batch: send at least one image")
        if len(values) > self.limits.max_images:
            raise InvalidInput(f"{len(values)} images in one request, over this model's limit serve.max_images = "
                               f"{self.limits.max_images}: send them in several requests")
        blobs = [image_bytes(value, row) for row, value in enumerate(values)]
        for row, blob in enumerate(blobs):  # every header before any pixel: a refusal costs no decoding
            self._check_pixels(blob, row)
        tensors = [self._tensor(blob, row) for row, blob in enumerate(blobs)]  # decode all before any work
        out = []
        for start in range(0, len(tensors), CHUNK):
            v = self.embed(torch.stack(tensors[start:start + CHUNK]))  # (B, d)
            out.append(torch.nn.functional.normalize(v, dim=1))
        return torch.cat(out).numpy().astype(np.float32)  # (N, d)

    def _check_pixels(self, blob: bytes, row: int) -> None:
        from tasks.images.imageio import ImageRejected, image_size
        from tasks.images.loaders import LOAD_FORMATS

        try:
            width, height = image_size(blob, LOAD_FORMATS, name=f"row {row}")
        except ImageRejected as exc:
            raise InvalidInput(f"`image` is not a usable image: {exc}") from exc
        if width * height > self.limits.max_pixels:
            raise InvalidInput(f"row {row}: image of {width}x{height} = {width * height} pixels, over this model's "
                               f"limit serve.max_pixels = {self.limits.max_pixels}")

    def _tensor(self, blob: bytes, row: int) -> Any:
        from tasks.images.imageio import ImageRejected, decode_rgb
        from tasks.images.loaders import LOAD_FORMATS, to_tensor

        try:  # the limit again: decode_rgb checks it on the header it decodes from
            img = decode_rgb(blob, LOAD_FORMATS, name=f"row {row}", max_pixels=self.limits.max_pixels)
        except ImageRejected as exc:
            raise InvalidInput(f"`image` is not a usable image: {exc}") from exc
        return to_tensor(img, self.size)  # (3, H, W) uint8


mlflow.models.set_model(RainEmbedder())
