"""A multi-level RAIN training step in bf16 autocast relative to fp32, measured in the same run.

    .venv/bin/python bench/precision.py [--threads 1] [--height 128 --width 64] [--batch 32] [--steps 6]

Whether `objective.bf16_autocast: true` pays depends on the CPU: oneDNN runs bf16 in hardware only with
avx512_bf16 or AMX, and emulates it elsewhere. The bench prints what this CPU has and the ratio, so the
setting can be chosen from a figure measured on the machine at hand. The two settings take turns step by
step and the median step time is reported (load from other processes spreads over both alike).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without installing the project too

from bench.train_step import cpu_batch, cpu_step_parser, median_step_times, print_speedups
from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.objective import cpu_has_native_bf16


def main() -> None:
    parser = cpu_step_parser(__doc__)
    args = parser.parse_args()
    batch = cpu_batch(args)
    settings = {name: (ModelConfig(levels=(4, 5)), ObjectiveConfig(bf16_autocast=bf16))
                for name, bf16 in (("fp32", False), ("bf16 autocast", True))}
    median = median_step_times(settings, batch, args.warmup, args.steps, torch.device("cpu"))
    print(f"cpu bf16 instructions (avx512_bf16 or AMX)={cpu_has_native_bf16()} threads={args.threads} "
          f"input={args.height}x{args.width} batch={args.batch} steps={args.steps} (+{args.warmup} warm-up), "
          "median step time, multi-level RAIN")
    print_speedups(median, "fp32")


if __name__ == "__main__":
    main()
