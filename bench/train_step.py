"""Throughput of one RAIN training step per variant, relative to baseline_hr measured in the same run.

    .venv/bin/python bench/train_step.py [--backbone resnet18] [--height 128 --width 64] [--batch 32]
                                         [--steps 10] [--warmup 2] [--device cpu]

"images/s" counts identity images (HR images in the batch; RAIN also processes their LR versions).
"cost x" = time per identity image divided by baseline_hr's, "speed x" its inverse. The variants take
turns step by step and the median step time is reported, so load from other processes on a shared
machine spreads over all of them alike and outliers drop out. Warm-up steps are excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without installing the project too

from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.network import RAIN
from rain_model.objective import Batch, make_optimizers, place_model, train_step

VARIANTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "baseline_hr": ("baseline_hr", (5,)),
    "baseline_hrlr": ("baseline_hrlr", (5,)),
    "rain single-level (5,)": ("rain", (5,)),
    "rain multi-level (4,5)": ("rain", (4, 5)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(size: int, height: int, width: int, device: torch.device) -> Batch:
    """`size` random HR images of `size // 4` identities (K = 4) and their x4 down-and-up-sampled LR copies."""
    labels = torch.arange(size, device=device) // 4 % max(1, size // 4)  # (B,)
    x_hr = torch.rand(size, 3, height, width, device=device)  # (B, 3, H, W)
    x_lr = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(x_hr, scale_factor=0.25, mode="bilinear", antialias=True),
        size=(height, width),
        mode="bilinear",
    )  # (B, 3, H, W)
    return Batch(x_hr, x_lr, labels)


def median_step_times(settings: dict[str, tuple[ModelConfig, ObjectiveConfig]], batch: Batch, warmup: int,
                      steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of a training step per setting (name -> model and objective); the settings take turns
    step by step after `warmup` untimed steps each."""
    num_ids = int(batch.labels.max()) + 1
    runs = {}
    for name, (model_cfg, obj) in settings.items():
        model = place_model(RAIN(model_cfg, num_ids), obj, device)
        model.train()
        optimizers = make_optimizers(model, obj)
        for step in range(warmup):
            train_step(model.generator, model.discriminators, optimizers, batch, obj, step)
        runs[name] = (model, obj, optimizers)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(warmup, warmup + steps):
        for name, (model, obj, optimizers) in runs.items():
            _sync(device)
            start = time.perf_counter()
            train_step(model.generator, model.discriminators, optimizers, batch, obj, step)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_step_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a bench that times settings of one training step on the CPU (precision.py, width.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a grid run uses 1)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="HR images per step (P x K with K = 4)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    return parser


def cpu_batch(args: argparse.Namespace) -> Batch:
    """Sets the threads and the seed that `cpu_step_parser`'s options ask for; the batch every setting steps on."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return random_batch(args.batch, args.height, args.width, torch.device("cpu"))


def print_speedups(median: dict[str, float], baseline: str) -> None:
    """A table of each setting's median step time and its speed relative to `baseline`'s."""
    print(f"{'setting':<16}{'s/step':>9}{'speed x':>9}")
    for name, per_step in median.items():
        print(f"{name:<16}{per_step:>9.3f}{median[baseline] / per_step:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="HR images per step (P x K with K = 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast + channels_last (CUDA only)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = random_batch(args.batch, args.height, args.width, device)
    settings = {name: (ModelConfig(backbone=args.backbone, levels=levels),
                       ObjectiveConfig(variant=variant, bf16_autocast=args.bf16, channels_last=args.bf16))
                for name, (variant, levels) in VARIANTS.items()}
    median = median_step_times(settings, batch, args.warmup, args.steps, device)
    base = median["baseline_hr"]
    print(
        f"device={device} backbone={args.backbone} input={args.height}x{args.width} batch={args.batch} "
        f"threads={torch.get_num_threads()} steps={args.steps} (+{args.warmup} warm-up), median step time"
    )
    print(f"{'variant':<26}{'s/step':>9}{'images/s':>10}{'cost x':>8}{'speed x':>9}")
    for name in settings:
        per_step = median[name]
        rate = args.batch / per_step
        print(f"{name:<26}{per_step:>9.3f}{rate:>10.1f}{per_step / base:>8.2f}{base / per_step:>9.2f}")


if __name__ == "__main__":
    main()
