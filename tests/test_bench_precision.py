"""bench/precision.py, tiny: it times both precisions and says whether this CPU has bf16 instructions."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.micro_project import REPO
from tests.printed import ratio_agrees


def test_precision_bench_prints_both_settings_and_the_cpus_bf16_support() -> None:
    out = subprocess.run([sys.executable, "bench/precision.py", "--height", "64", "--width", "32", "--batch", "8",
                          "--steps", "1", "--warmup", "0"], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert re.search(r"cpu bf16 instructions \(avx512_bf16 or AMX\)=(True|False) threads=1 input=64x32", out), out
    fp32 = re.search(r"^fp32\s+(\d+\.\d+)\s+1\.00$", out, re.M)
    bf16 = re.search(r"^bf16 autocast\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, re.M)
    assert fp32 and bf16, out
    # the speed column is fp32's step time over bf16's (each printed rounded)
    assert ratio_agrees(float(bf16[2]), float(fp32[1]), float(bf16[1])), out
