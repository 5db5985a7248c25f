"""A failed stage's one line gives its own exit code and the error that started it, not a wrapper's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import StageFailed
from tasks.infra.logs import ERROR_MARKER, one_line, root_cause


def test_a_stage_run_by_dvc_reports_its_own_exit_code_not_dvcs(tmp_path: Path) -> None:
    """DVC exits 255 for any failed stage; the command's own code is in its ERROR line."""
    dvc = Path(sys.executable).parent / "dvc"
    (tmp_path / "fail.py").write_text(f"import sys\nprint('{ERROR_MARKER} ValueError: bad input', file=sys.stderr)\n"
                                      "sys.exit(3)\n")
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  broken:\n    cmd: {sys.executable} fail.py\n")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([str(dvc), "repro", "broken"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 255, out.stderr  # DVC's own code, which the line must not show
    failed = StageFailed("broken", out.returncode, out.stdout + out.stderr)
    assert failed.returncode == 3
    assert str(failed) == "stage 'broken' failed (exit 3): ValueError: bad input"


def test_a_stage_run_without_dvc_keeps_its_exit_code() -> None:
    assert StageFailed("train", 1, f"{ERROR_MARKER} ValueError: x").returncode == 1


def test_a_ray_train_worker_failure_ends_with_the_workers_own_error(ray_local: None, tmp_path: Path) -> None:
    """The cause of a failed fit (here train.p larger than the identities at hand) is the stage's last line, not
    `WorkerGroupError: Training failed due to worker errors: (+16 more lines)`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_worker() -> None:
        raise ValueError("train.p is 8 but the training split has 1 identity")

    trainer = TorchTrainer(train_worker, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=str(tmp_path), failure_config=FailureConfig(0)))
    with pytest.raises(Exception) as info:
        trainer.fit()
    assert one_line(info.value).startswith("WorkerGroupError")  # what the stage said before
    assert one_line(root_cause(info.value)) == "ValueError: train.p is 8 but the training split has 1 identity"


def test_the_root_cause_of_an_error_without_a_wrapped_one_is_itself() -> None:
    exc = KeyError("x")
    assert root_cause(exc) is exc
