"""The embedding network as ONNX: images (B, 3, H, W) float32 in [0, 1] -> v (B, d), any batch size.

The register stage exports it (torch.onnx.export, the torch.export-based exporter), checks it against PyTorch on an
example batch (max abs difference of v at most `register.onnx_atol`) and saves it in MLflow's onnx flavor, with its
input and output signature, as the artifact `onnx` of the registered pyfunc: the same logged model, so the same model
version (``artifacts/onnx/model.onnx`` in the model's files). The graph computes what ``embed.embed_batch`` computes
after the uint8 -> [0, 1] conversion, the mirrored-image average included when the model's settings say `flip`, so
either runtime turns the same pixels into the same v.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rain_model.network import RAIN
from tasks.infra.logs import quieted
from tasks.registry.embed import retrieval_feature

INPUT = "images"  # (B, 3, H, W) float32 in [0, 1]
OUTPUT = "v"  # (B, d) float32, before L2 normalisation (the pyfunc normalises both runtimes' v alike)
ONNX_FILE = "model.onnx"  # inside the onnx flavor's folder, as mlflow.onnx.save_model names it
# Two batch sizes: the dynamic batch axis is checked, not only the size it was traced with.
PARITY_BATCHES = (2, 5)


class OnnxExportError(RuntimeError):
    """The network could not be exported, or the export does not give PyTorch's v; nothing was logged."""


class EmbeddingNet(nn.Module):
    """What is exported: embed.retrieval_feature of images in [0, 1] (averaged with the mirrored image's when
    `flip`), as a module torch.onnx.export can trace."""

    def __init__(self, model: RAIN, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.flip = flip

    def forward(self, images: Tensor) -> Tensor:
        return retrieval_feature(self.model, images, self.flip)  # (B, d)


@dataclass(frozen=True)
class Exported:
    folder: Path  # the MLflow onnx flavor: MLmodel (with the signature) and model.onnx
    max_abs_diff: float  # of v against PyTorch, over PARITY_BATCHES
    opset: int


def export_onnx(model: RAIN, size: tuple[int, int], flip: bool, path: Path) -> None:
    """Write the embedding network of `model` (eval mode, CPU) for images of `size` (H, W) to `path`, with a
    dynamic batch axis."""
    net = EmbeddingNet(model, flip).eval()
    example = torch.rand(PARITY_BATCHES[0], 3, *size)  # (B, 3, H, W)
    batch = torch.export.Dim("batch", min=1)
    with quieted("onnx_ir", "onnxscript"):  # their passes log each rewrite at INFO
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    if program is None:  # typed Optional for the legacy exporter; the dynamo one always returns its program
        raise OnnxExportError("torch.onnx.export returned no program")
    program.save(str(path))


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU for the ONNX file at `path` (`threads`: intra-op threads; None: its
    default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, images: Tensor) -> Tensor:
    """v (B, d) of images (B, 3, H, W) float32 in [0, 1] through an onnxruntime session."""
    out = sess.run([OUTPUT], {INPUT: images.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
    return torch.from_numpy(np.asarray(out))


def max_abs_diff(model: RAIN, sess: Any, size: tuple[int, int], flip: bool, batches: tuple[int, ...] =
                 PARITY_BATCHES, seed: int = 0) -> float:
    """Largest |v_onnx - v_torch| over random image batches of each size in `batches` (fp32)."""
    net = EmbeddingNet(model, flip).eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        images = torch.rand(b, 3, *size, generator=generator)  # (b, 3, H, W)
        with torch.inference_mode():
            v_torch = net(images)  # (b, d)
        worst = max(worst, float((run_session(sess, images) - v_torch).abs().max()))
    return worst


def export_checked(model: RAIN, size: tuple[int, int], flip: bool, atol: float, folder: Path) -> Exported:
    """Export, check parity within `atol`, and save as MLflow's onnx flavor under `folder` (which must not exist).
    Raises OnnxExportError (one line naming what failed) on any failure; `folder` is then not written."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / ONNX_FILE
        try:
            export_onnx(model, size, flip, raw)
            diff = max_abs_diff(model, session(raw), size, flip)
            if not diff <= atol:  # `not <=`: a NaN difference fails too
                raise OnnxExportError(f"ONNX export gives v {diff:.3g} away from PyTorch's (max abs on batches of "
                                      f"{PARITY_BATCHES}), over register.onnx_atol = {atol:g}")
            import onnx

            proto = onnx.load(str(raw))  # read once: its opset, then the flavor
            opset = next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))
            _save_flavor(proto, folder, size, model)
        except OnnxExportError:
            raise
        except Exception as exc:  # the exporter, onnx and onnxruntime raise many types; all mean "no usable export"
            first = (str(exc).strip().splitlines() or [""])[0]
            raise OnnxExportError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
    return Exported(folder, diff, opset)


def _save_flavor(proto: Any, folder: Path, size: tuple[int, int], model: RAIN) -> None:
    """MLflow's onnx flavor of the ONNX model `proto` in `folder`: one self-contained model.onnx, and the signature
    images (-1, 3, H, W) float32 -> v (-1, d) float32."""
    import mlflow.onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    dim = model.generator.backbone.channels[4]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, *size), INPUT)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), OUTPUT)]))
    # One file, not weights beside it: onnxruntime and any copy of the folder need nothing else.
    mlflow.onnx.save_model(proto, str(folder), signature=signature, save_as_external_data=False)


class OnnxEmbedder:
    """The `onnx` runtime of the registered pyfunc: uint8 images -> v through onnxruntime, as embed_batch does
    through PyTorch."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ONNX_FILE
        self.session = session(self.path)

    def __call__(self, x_uint8: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 -> (B, d) float32."""
        return run_session(self.session, x_uint8.float().div_(255))
