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
