"""The suite's exit status is pytest's verdict, whatever the interpreter's teardown does afterwards."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Registered before pytest starts, so it runs after every exit handler the session registers: where the
# interpreter's teardown of native libraries runs (the CI run that passed every test and then got SIGSEGV).
CRASHING_TEARDOWN = """
import atexit, os, signal, sys
atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def run_pytest(test_file: Path, *plugins: str) -> int:
    args = [sys.executable, "-c", CRASHING_TEARDOWN, "-q", "-p", "no:cacheprovider", "--noconftest"]
    for plugin in plugins:
        args += ["-p", plugin]
    return subprocess.run([*args, str(test_file)], cwd=ROOT, capture_output=True, timeout=120).returncode


def test_a_passing_suite_exits_0_even_when_the_teardown_after_it_would_crash(tmp_path: Path) -> None:
    test_file = tmp_path / "test_passes.py"
    test_file.write_text("def test_passes():\n    pass\n")
    assert run_pytest(test_file) == -signal.SIGSEGV  # without this project's conftest
    assert run_pytest(test_file, "tests.conftest") == 0


def test_a_failing_suite_still_exits_1(tmp_path: Path) -> None:
    test_file = tmp_path / "test_fails.py"
    test_file.write_text("def test_fails():\n    assert False\n")
    assert run_pytest(test_file, "tests.conftest") == 1
