"""`make install` from nothing, both ways: uv (the default, pinned in constraints.txt) and plain pip (INSTALLER=pip,
and what a failing uv falls back to). Each installs the pinned set into its own fresh virtual environment, so
these are slow: minutes with pip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.micro_project import REPO

pytestmark = pytest.mark.slow


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_make_install_from_nothing_gives_the_pinned_set(tmp_path: Path, installer: str) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "MAKE"))}
    out = subprocess.run(["make", "install", f"VENV={venv}", f"INSTALLER={installer}", f"PYTHON={sys.executable}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if installer == "uv":
        assert "installing with pip" not in out.stdout + out.stderr  # uv did the work, no fallback
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {n.lower().replace("_", "-"): v for n, _, v in (line.partition("==") for line in listed.splitlines())}
    pins = _pins()
    for name in ("torch", "ray", "prefect", "mlflow", "dvc"):
        assert installed[name].split("+")[0] == pins[name], name
    check = subprocess.run([str(venv / "bin" / "rain"), "--help"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
