"""A cache is a promise: every project file a DVC stage's command executes is among that stage's deps
(tasks/infra/imports.py follows the imports), and no code dep is listed that the stage never runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.infra.imports import PACKAGES, module_files
from tests.micro_project import REPO

DVC_FILES = ("dvc.yaml", "grid/dvc.yaml")


def stage_commands(dvc_file: Path) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the module of its `python -m` command, its deps as written)."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        assert words[:2] == ["python", "-m"], f"{dvc_file}: stage {name} is not `python -m <module>`"
        out[name] = (words[2], [str(d) for d in stage.get("deps", [])])
    return out


def dep_problems(module: str, deps: list[str], root: Path = REPO) -> list[str]:
    """What is wrong with `deps` for a stage running `python -m module`: files it executes that no dep
    covers (a listed folder covers the files under it), and code deps that cover none of them."""
    code_deps = [d.rstrip("/") for d in deps if d.partition("/")[0] in PACKAGES]
    executed = [f.as_posix() for f in module_files(module, root)]

    def covers(dep: str, file: str) -> bool:
        return file == dep or file.startswith(dep + "/")

    missing = [f"not in deps: {f}" for f in executed if not any(covers(d, f) for d in code_deps)]
    unused = [f"dep never executed: {d}" for d in code_deps if not any(covers(d, f) for f in executed)]
    return missing + unused


def _all_stages() -> list[tuple[str, str, str, list[str]]]:
    return [(dvc_file, name, module, deps) for dvc_file in DVC_FILES
            for name, (module, deps) in stage_commands(REPO / dvc_file).items()]


STAGES = _all_stages()


@pytest.mark.parametrize("dvc_file, stage, module, deps", STAGES, ids=[f"{f}:{s}" for f, s, _, _ in STAGES])
def test_stage_deps_cover_exactly_the_code_it_executes(dvc_file: str, stage: str, module: str, deps: list[str]) -> None:
    problems = dep_problems(module, deps)
    assert problems == [], (f"{dvc_file} stage {stage}: {problems}; its code deps are "
                            f"`python -m tasks.infra.imports {module}`")


def test_a_removed_dep_is_reported_by_name() -> None:
    module, deps = stage_commands(REPO / "dvc.yaml")["train"]
    assert "tasks/training" in deps or "tasks/training/loop.py" in deps
    without = [d for d in deps if not d.startswith("tasks/training")]
    assert "not in deps: tasks/training/loop.py" in dep_problems(module, without)


def test_a_stale_dep_is_reported_by_name() -> None:
    module, deps = stage_commands(REPO / "dvc.yaml")["download"]
    assert dep_problems(module, [*deps, "tasks/registry/search.py"]) == ["dep never executed: tasks/registry/search.py"]


def test_the_walk_follows_lazy_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks import typed\n"
                                  "def run():\n    from tasks.lazy import f\n")
    (pkg / "lazy.py").write_text("from . import helper\n")
    for name in ("typed", "helper", "unused"):
        (pkg / f"{name}.py").write_text("")
    files = [f.as_posix() for f in module_files("tasks.stage", tmp_path)]
    assert files == ["tasks/__init__.py", "tasks/helper.py", "tasks/lazy.py", "tasks/stage.py"]



def test_tasks_holds_exactly_the_stage_commands_and_config() -> None:
    commands = {module for _, _, module, _ in STAGES}
    top = {f"tasks.{p.stem}" for p in (REPO / "tasks").glob("*.py")} - {"tasks.__init__", "tasks.config"}
    assert top == commands


@pytest.mark.parametrize("module", sorted({module for _, _, module, _ in STAGES}))
def test_no_stage_module_imports_another(module: str) -> None:
    stage_files = {f"{m.replace('.', '/')}.py" for _, _, m, _ in STAGES} - {f"{module.replace('.', '/')}.py"}
    assert stage_files.isdisjoint(f.as_posix() for f in module_files(module))


def test_train_params_are_every_train_setting_but_the_output_neutral_ones() -> None:
    import dataclasses

    from tasks.config import OUTPUT_NEUTRAL, TrainConfig, train_stage_params

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert tuple(stage["params"]) == train_stage_params()  # the resume key hashes the same list
    listed = {p for p in stage["params"] if p.startswith("train.")}
    every = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    assert set(OUTPUT_NEUTRAL) < every  # names that exist
    assert listed == every - set(OUTPUT_NEUTRAL)
    assert "train" not in stage["params"]


def test_no_dvc_lock_is_shipped() -> None:
    """A dvc.lock records one machine's run: shipped, it would tell a fresh clone that stages ran which did not."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "dvc.lock", "grid/dvc.lock"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked == []
