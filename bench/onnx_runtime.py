"""Embedding a batch with onnxruntime against PyTorch, on this CPU, measured in the same process.

    .venv/bin/python bench/onnx_runtime.py [--batch 32] [--threads 2] [--repeats 15] [--warmup 3]
                                           [--height 128 --width 64] [--base-channels 32] [--flip]

The network is the register stage's ONNX export (tasks/registry/onnx_model.py) of a RAIN with params.yaml's
model defaults (initial weights: time does not depend on their values), run on the same random batch of images in
[0, 1]: PyTorch under inference_mode with `--threads` threads, onnxruntime with as many intra-op threads. The two
take turns each repeat, so a load that comes and goes weighs on both; the median of each is reported, and the ratio
onnxruntime / PyTorch (below 1: onnxruntime is faster). Name the CPU beside the ratio: it differs between machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without installing the project too

from rain_model.config import ModelConfig
from rain_model.network import RAIN
from tasks.registry.onnx_model import EmbeddingNet, export_onnx, run_session, session


def cpu_name() -> str:
    """The CPU's model name and whether it has avx512_bf16 (STACK-NOTES: name the CPU beside every figure)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name}{', avx512_bf16' if 'avx512_bf16' in info else ''}"


def median_seconds(runs: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each callable, the callables taking turns within each repeat."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images per call (serve.max_images, search's batch)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each runtime")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=ModelConfig().base_channels)
    parser.add_argument("--flip", action="store_true", help="average with the mirrored image (evaluate.flip)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RAIN(ModelConfig(base_channels=args.base_channels), num_classes=4).eval()
    net = EmbeddingNet(model, args.flip).eval()
    images = torch.rand(args.batch, 3, args.height, args.width)  # (B, 3, H, W)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, (args.height, args.width), args.flip, path)
        sess = session(path, threads=args.threads)

        def torch_run() -> torch.Tensor:
            with torch.inference_mode():
                return net(images)

        diff = float((run_session(sess, images) - torch_run()).abs().max())
        median = median_seconds({"pytorch": torch_run, "onnxruntime": lambda: run_session(sess, images)},
                                args.warmup, args.repeats)
    print(f"{cpu_name()}; threads={args.threads} batch={args.batch} input={args.height}x{args.width} "
          f"base_channels={args.base_channels} flip={args.flip} repeats={args.repeats} (+{args.warmup} warm-up), "
          f"max |v_onnx - v_torch| = {diff:.2g}")
    print(f"pytorch      {median['pytorch']:.4f} s")
    print(f"onnxruntime  {median['onnxruntime']:.4f} s")
    print(f"ratio onnxruntime / pytorch: {median['onnxruntime'] / median['pytorch']:.2f}")


if __name__ == "__main__":
    main()
