"""bench/width.py, tiny: it times each width against the first."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.micro_project import REPO
from tests.printed import ratio_agrees


def test_width_bench_prints_every_width_against_the_first() -> None:
    out = subprocess.run([sys.executable, "bench/width.py", "--base-channels", "16", "8", "--height", "64",
                          "--width", "32", "--batch", "8", "--steps", "1", "--warmup", "0"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    base = re.search(r"^base 16\s+(\d+\.\d+)\s+1\.00$", out, re.M)
    narrow = re.search(r"^base 8\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, re.M)
    assert base and narrow, out
    # the speed column is the first width's step time over this one's (each printed rounded)
    assert ratio_agrees(float(narrow[2]), float(base[1]), float(narrow[1])), out
