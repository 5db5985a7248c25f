"""Failure without surprises, seen from the command line: `rain run` killed with SIGKILL mid-training leaves
no process and no write behind (tasks/infra/reaper.py), and a failed stage ends the flow with its one-line
error and the path of its whole log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.micro_project import make_project
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


def _rain_run(project: Path, tag: str, home: Path, **popen: object) -> subprocess.Popen[str]:
    """`rain run` in `project`, every descendant's environment carrying RAIN_TEST_TAG=`tag`."""
    env = dict(os.environ, RAIN_TEST_TAG=tag, PREFECT_HOME=str(home))
    for key in ("PREFECT_API_URL", "RAIN_GUARDS"):  # a temporary server; no guard of this test session
        env.pop(key, None)
    rain = str(Path(sys.executable).parent / "rain")
    return subprocess.Popen([rain, "run", "--project", str(project)], env=env, text=True, **popen)  # type: ignore[call-overload]


def _tagged(tag: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries RAIN_TEST_TAG=`tag`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"RAIN_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
    return found


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.heavy
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the survivors through /proc")
def test_a_killed_flow_leaves_no_process_running_and_nothing_written(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"train": {"epochs": 500}})
    tag = uuid.uuid4().hex
    rain_log = tmp_path / "rain.log"
    log = rain_log.open("w")
    flow = _rain_run(project, tag, tmp_path / "prefect-home", stdout=log, stderr=subprocess.STDOUT)
    ray_runs = project / "runs" / "ray"
    try:
        wait_until(lambda: any(ray_runs.glob("*/checkpoint_*")),  # training is under way: it has checkpointed
                   progress=lambda: (rain_log.stat().st_size, len(_tagged(tag))), what="rain run before training",
                   failed=lambda: None if flow.poll() is None else rain_log.read_text()[-3000:], poll_s=0.5)
        before = _tagged(tag)
        flow.send_signal(signal.SIGKILL)
        flow.wait()
    finally:
        if flow.poll() is None:
            flow.kill()
    # Survivors, if there were any, are what the flow had started: the scan can see them.
    commands = " ".join(before.values())
    for started in ("tasks.train", "raylet", "ray::RayTrainWorker", "uvicorn", "dvc"):
        assert started in commands, f"{started} not among the flow's processes: {before}"

    deadline = time.monotonic() + 60
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tagged(tag) == {}, "still running 60 s after the kill"
    settled = _files(project / "runs") | _files(project / "models")
    time.sleep(5)
    assert _files(project / "runs") | _files(project / "models") == settled  # nothing writes any more
    assert not list((project / "models").rglob("*.safetensors")), "weights written after the kill"
    with sqlite3.connect(project / "mlflow.db") as db:
        statuses = {status for (status,) in db.execute("SELECT status FROM runs")}
    assert statuses == {"KILLED"}  # the training's MLflow run is not left RUNNING


def test_a_failed_stage_ends_the_flow_with_its_one_line_error_and_the_log(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"dataset": {"name": "custom"},
                                      "sources": {"custom": {"url": str(tmp_path / "missing.csv")}}})
    done = _rain_run(project, uuid.uuid4().hex, tmp_path / "prefect-home", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 1, out + err
    lines = (out + err).splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    message = errors[0]
    assert f"DatasetError: {tmp_path / 'missing.csv'}: no such file" in message
    log = Path(message.rpartition("(full log: ")[2].rstrip(")"))
    assert log.is_file() and log.parent.parent == project / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last):" in text  # the whole story is in the log ...
    assert not any(line.startswith("Traceback") for line in lines)  # ... not on the screen
    assert len(lines) < 40, "\n".join(lines)
