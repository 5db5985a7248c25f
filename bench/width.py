"""A multi-level RAIN training step with a narrower F (`model.base_channels`) relative to torchvision's 64,
measured in the same run.

    .venv/bin/python bench/width.py [--base-channels 64 48 32] [--threads 1] [--height 128 --width 64]
                                    [--batch 32] [--steps 6]

A convolution's cost goes with the product of its input and output channels, so halving F's width quarters
its multiply-adds; what a step gains is less (batch norm, pooling, G and the optimizers shrink only
linearly or not at all). The settings take turns step by step and the median step time is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without installing the project too

from bench.train_step import cpu_batch, cpu_step_parser, median_step_times, print_speedups
from rain_model.config import ModelConfig, ObjectiveConfig


def main() -> None:
    parser = cpu_step_parser(__doc__)
    parser.add_argument("--base-channels", type=int, nargs="+", default=[64, 48, 32],
                        help="widths to time; the first is the baseline")
    args = parser.parse_args()
    batch = cpu_batch(args)
    settings = {f"base {c}": (ModelConfig(base_channels=c, levels=(4, 5)), ObjectiveConfig())
                for c in args.base_channels}
    median = median_step_times(settings, batch, args.warmup, args.steps, torch.device("cpu"))
    print(f"threads={args.threads} input={args.height}x{args.width} batch={args.batch} steps={args.steps} "
          f"(+{args.warmup} warm-up), median step time, multi-level RAIN (resnet18, fp32)")
    print_speedups(median, next(iter(settings)))


if __name__ == "__main__":
    main()
