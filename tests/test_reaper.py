"""The watchdog behind "nothing a flow started outlives it" (tasks/infra/reaper.py), on its own: a guarded
process killed with SIGKILL takes a child with it that left its session and process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.micro_project import REPO

GUARDED = """
import subprocess, sys, time
from tasks.infra import reaper
reaper.guard()
child = subprocess.Popen(["sleep", "600"], start_new_session=True)  # out of reach of any process-group kill
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the watchdog finds processes through /proc")
def test_a_killed_guarded_process_takes_its_escaped_child_with_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAIN_GUARDS"}
    parent = subprocess.Popen([sys.executable, "-c", GUARDED], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)
        assert _alive(child)  # the parent alone does not end it
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


CHAIN = """
import subprocess, sys, time
from tasks.infra import reaper
reaper.guard()
# A middle process that dies on SIGTERM without passing it on (DVC does), above a stage that, on SIGTERM,
# records whether the worker it started is still running (the train stage marks MLflow and stops Ray).
STAGE = '''
import signal, subprocess, sys, time
worker = subprocess.Popen(["sleep", "600"])
def stop(*_):
    time.sleep(1)  # recording the kill takes a moment
    open(sys.argv[1], "w").write("running" if worker.poll() is None else "gone")
    worker.kill()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(worker.pid, flush=True)
time.sleep(600)
'''
middle = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                           sys.executable, "-c", STAGE, sys.argv[1]])
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the watchdog finds processes through /proc")
def test_a_stage_under_a_parent_that_drops_sigterm_gets_it_while_its_worker_still_runs(tmp_path: Path) -> None:
    record = tmp_path / "at-sigterm"
    env = {k: v for k, v in os.environ.items() if k != "RAIN_GUARDS"}
    parent = subprocess.Popen([sys.executable, "-c", CHAIN, str(record)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 30
        while not _sleepers_under(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sleepers_under(parent.pid), "the stage did not start its worker"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert record.read_text() == "running"  # the stage was told before its worker was
    finally:
        if parent.poll() is None:
            parent.kill()


def _sleepers_under(root: int) -> list[int]:
    """`sleep` processes descending from `root`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])

    def descends(pid: int) -> bool:
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    found = []
    for pid in parents:
        try:
            if (Path(f"/proc/{pid}/comm")).read_text().strip() == "sleep" and descends(pid):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells zombies apart through /proc")
def test_ending_a_group_whose_leader_has_exited_does_not_wait_out_the_grace() -> None:
    """The leader, our unreaped child, is a zombie once it has ended: nothing of its group runs any more."""
    from tasks.infra.reaper import end_group

    leader = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        started = time.monotonic()
        end_group(leader.pid, grace=120)
        assert time.monotonic() - started < 60  # not the 120 s grace: SIGTERM ended it at once
        assert leader.wait(timeout=10) == -signal.SIGTERM
    finally:
        if leader.poll() is None:
            leader.kill()
