"""bench/gpu.py, the prepared GPU check, in its tiny CPU mode: it runs where only PyTorch is installed
and writes every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.micro_project import REPO

# What the bare GPU image lacks: the script must import none of them. (pandas is missing there too, but
# pyarrow imports it when present to write pandas metadata, and does without it when absent.)
ABSENT = ("ray", "prefect", "mlflow", "dvc", "h5py", "safetensors", "sklearn", "matplotlib", "typer", "pytest")
# Runs the script, then names every one of those that got imported (torch probes some with find_spec,
# which imports nothing).
SCRIPT = """
import runpy, sys
sys.argv = ["bench/gpu.py", "--tiny", "--out", OUT]
runpy.run_path("bench/gpu.py", run_name="__main__")
print("IMPORTED", sorted(m for m in ABSENT if m in sys.modules))
"""


def test_gpu_check_runs_tiny_on_the_cpu_without_the_orchestration_stack(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    script = f"ABSENT = {ABSENT!r}\nOUT = {str(out)!r}\n{SCRIPT}"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "IMPORTED []"
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["config"]["backbone"] == "resnet18"
    assert result["plain_images_per_second"] > 0 and result["rain_images_per_second"] > 0
    plain, rain = result["plain_images_per_second"], result["rain_images_per_second"]  # rounded to 0.1: off by <= 0.05
    ratio = rain / plain  # of the rounded figures: off from the exact one by up to the rounding's share of each
    assert result["rain_over_plain"] == pytest.approx(ratio, abs=ratio * (0.05 / plain + 0.05 / rain) + 5e-4)
    assert set(result["bf16_vs_fp32"]["fp32"]) == {"L_adv", "L_rec", "L_cls", "L_tri"}
    assert result["bf16_vs_fp32"]["max_relative_difference"] < 0.05
    assert result["loader_keeps_up"] == (result["loader_images_per_second"] > result["rain_images_per_second"])
    assert result["ddp"] == result["ddp"] | {"backend": "gloo", "steps": 3, "finite": True}
    for run in result["train_loop"].values():
        assert [e["epoch"] for e in run["epochs"]] == [0, 1]
        assert all(e["images"] > 0 and e["L_total"] > 0 for e in run["epochs"])
    paper = result["paper_preset"]  # presets/paper.yaml's objective, trained and scored as evaluate scores
    assert paper["objective"] == {"mining": "sampled", "adv_loss": "minimax", "bf16_autocast": True}
    assert paper["flip"] is False and paper["train_seconds"] > 0
    assert {"lr", "hr", "r8"} <= set(paper["rows"])
    assert all(0 <= row["rank1"] <= 1 and 0 < row["mAP"] <= 1 for row in paper["rows"].values())
