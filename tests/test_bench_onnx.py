"""bench/onnx_runtime.py, tiny: it prints both runtimes' median and their ratio, and the two agree on v."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.micro_project import REPO
from tests.printed import ratio_agrees


def test_onnx_bench_prints_the_ratio_of_its_two_medians() -> None:
    out = subprocess.run([sys.executable, "bench/onnx_runtime.py", "--batch", "2", "--height", "64", "--width", "32",
                          "--base-channels", "8", "--threads", "1", "--repeats", "1", "--warmup", "0"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    torch_s = re.search(r"^pytorch\s+(\d+\.\d+) s$", out, re.M)
    onnx_s = re.search(r"^onnxruntime\s+(\d+\.\d+) s$", out, re.M)
    ratio = re.search(r"^ratio onnxruntime / pytorch: (\d+\.\d+)$", out, re.M)
    diff = re.search(r"max \|v_onnx - v_torch\| = (\S+)$", out, re.M)
    assert torch_s and onnx_s and ratio and diff, out
    assert ratio_agrees(float(ratio[1]), float(onnx_s[1]), float(torch_s[1]), decimals=4), out
    assert float(diff[1]) <= 1e-4, out  # it timed the network it exported, not another one
