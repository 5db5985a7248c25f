"""The Prefect flow `rain`: the DVC stages of dvc.yaml, one Prefect task each, in order.

DVC alone decides what is up to date (`dvc repro --single-item <stage>` skips a stage whose deps and
params did not change); Prefect adds retries on the download, logs, the UI, artifacts, deployments.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.config import load_params
from tasks.download import TRANSIENT_MARKER

STAGES = ("download", "manifest", "synthesize", "decode", "train", "evaluate", "register")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str) -> None:
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")
        self.stage, self.returncode, self.tail = stage, returncode, tail


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | up to date | restored from run cache
    seconds: float


def stage_env() -> dict[str, str]:
    """The stages' `python` is this interpreter; DVC sends no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


# Loaded here, not in a forked child: only the prctl call itself runs between fork and exec.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """A stage must not outlive a killed flow (a restarted flow would race it for its outputs)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stream_command(cmd: list[str], cwd: Path, env: dict[str, str], label: str) -> list[str]:
    """Run `cmd`, streaming its output to the Prefect log as `label | line`; returns the lines. Raises
    StageFailed with the tail on a non-zero exit; a cancelled or interrupted task takes the process down."""
    logger = get_run_logger()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            logger.info("%s | %s", label, line.rstrip())
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise StageFailed(label, code, "\n".join(lines[-40:]))
    return lines


def dvc_repro(stage: str, project_dir: Path) -> StageResult:
    """Run one stage through DVC, streaming its output to the Prefect log."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    lines = stream_command(cmd, project_dir, stage_env(), stage)
    text = "\n".join(lines)
    if re.search(rf"Stage '{stage}' didn't change, skipping", text):
        status = "up to date"
    elif re.search(rf"Stage '{stage}' is cached - skipping run", text):
        status = "restored from run cache"
    else:
        status = "ran"
    return StageResult(stage, status, round(time.perf_counter() - started, 1))


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry the download only when its own retries ran out on transient errors (the stage says so);
    a checksum mismatch, a 404, a missing sign-up archive or a bad params.yaml fail at once."""
    try:
        state.result()
    except StageFailed as exc:
        return TRANSIENT_MARKER in exc.tail
    except Exception:
        return False
    return False


@task(name="download", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def download(project_dir: Path) -> StageResult:
    return dvc_repro("download", project_dir)


@task(name="stage")
def stage_task(stage: str, project_dir: Path) -> StageResult:
    return dvc_repro(stage, project_dir)


@flow(name="rain", log_prints=True)
def rain(project_dir: str = ".") -> dict[str, Any]:
    """download -> manifest -> synthesize -> decode -> train -> evaluate -> register, as DVC decides."""
    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")  # refuses a bad params.yaml before any stage runs
    results = [download(root)]
    for stage in STAGES[1:]:
        results.append(stage_task.with_options(name=stage)(stage, root))
    report_dir = root / params.report_dir()
    metrics = json.loads((report_dir / "metrics.json").read_text())
    registration = json.loads((report_dir / "registration.json").read_text())
    create_table_artifact(key="rain-stages", table=[r.__dict__ for r in results],
                          description="What DVC ran or skipped in this flow run")
    table = (report_dir / "table.md").read_text() if (report_dir / "table.md").exists() else ""
    pictures = "\n".join(f"- {p.stem.replace('_', ' ')}: `{p}`" for p in sorted(report_dir.glob("*.png")))
    create_markdown_artifact(
        key=f"rain-results-{re.sub(r'[^a-z0-9-]', '-', params.dataset.name.lower())}",
        markdown=f"# {params.dataset.name}\n\n{table}\n\nModel: `{registration['model_uri']}` "
                 f"(alias `{registration['alias']}`; pictures also in its MLflow run under `evaluation/`)"
                 f"\n\n{pictures}\n")
    return {"stages": [r.__dict__ for r in results], "metrics": metrics, "registration": registration}
