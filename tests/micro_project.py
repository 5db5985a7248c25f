"""Builders of throw-away project folders running the real pipeline on a micro configuration."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks.config import Params, parse

if TYPE_CHECKING:  # bench/gpu.py imports this module on a bare GPU machine, which has no pytest
    import pytest

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per stage on 2 cores, big enough to exercise every code path
# (two Ray workers with DDP, two trials, every query set).
MICRO: dict[str, Any] = {
    "synthetic": {"identities": 12, "test_identities": 0, "images_per_camera": 2, "height": 64, "width": 32},
    "protocol": {"trials": 2, "workers": 2},
    "model": {"backbone": "resnet18"},
    # A checkpoint every epoch: the resume tests need one before the last epoch.
    "train": {"height": 64, "width": 32, "epochs": 2, "p": 4, "k": 2, "trials": [0], "checkpoint_every_epochs": 1},
    "ray": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
    "evaluate": {"gallery_repeats": 2, "tsne_identities": 6, "sheet_queries": 2, "batch_size": 16},
    "experiments": {"seeds": [0], "epochs": 1, "val_identities": 2},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(project: Path, overrides: dict[str, Any]) -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge(base, overrides), sort_keys=False))


def make_project(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A git + DVC project with this repo's stages and code, and params.yaml = defaults + MICRO + overrides."""
    project = root / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    (project / "grid").mkdir()
    shutil.copy(REPO / "grid" / "dvc.yaml", project / "grid" / "dvc.yaml")
    for pkg in ("tasks", "rain_model"):
        shutil.copytree(REPO / pkg, project / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    write_params(project, merge(MICRO, overrides or {}))
    # A git repository, as a user's clone is: DVC behaves differently with an SCM (ignored files, lock).
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


def dvc(project: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                         env=_env())
    if out.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def micro_params(overrides: dict[str, Any] | None = None) -> Params:
    """The repository's params.yaml + MICRO + overrides, parsed like a stage would."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return parse(Params, merge(merge(base, MICRO), overrides or {}), "")


def prepare_data(root: Path, params: Params) -> Path:
    """download -> manifest -> synthesize -> decode with `root` as the current folder; returns the MLR manifest
    (the decoded-image store is at `params.store_dir()`)."""
    from tasks import decode, download, manifest, synthesize

    download.run(params, params.raw_dir())
    manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())
    synthesize.run(params, params.raw_dir(), params.manifest_path(), params.lr_dir(), params.mlr_manifest_path())
    decode.run(params, params.mlr_manifest_path(), params.store_dir())
    return params.mlr_manifest_path()


def prepared(factory: pytest.TempPathFactory, name: str, overrides: dict[str, Any]) -> tuple[Path, Params]:
    """A folder with the micro dataset downloaded, synthesized and decoded (module-scoped fixtures)."""
    import pytest

    root = factory.mktemp(name)
    params = micro_params(overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prepare_data(root, params)
    return root, params
