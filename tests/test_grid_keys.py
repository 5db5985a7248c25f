"""A grid run's key hashes what the run executes: editing a table's label or a paper figure keeps every
key (no run is trained again for a change of wording); editing the training loop changes every key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.grid import configs, runs, tables
from tasks.infra.imports import module_files
from tests.micro_project import REPO, micro_params


@pytest.fixture()
def code(tmp_path: Path) -> Path:
    for pkg in ("tasks", "rain_model"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _keys(root: Path) -> dict[tuple[str, int], str]:
    params, code_hash = micro_params(), runs.code_hash(root)
    inputs = {"train_manifest": "m", "eval_manifest": "e", "code": code_hash}  # the manifests stay fixed here
    return {(name, seed): configs.run_key(params, name, seed, inputs) for name in configs.CONFIGS for seed in (0, 1)}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}"
    path.write_text(text.replace(old, new, 1))


def test_editing_a_table_label_or_a_paper_figure_keeps_every_run_key(code: Path) -> None:
    before = _keys(code)
    row = tables.TABLES[0].rows[0]
    _edit(code / "tasks/grid/tables.py", f'Row("{row.label}"', f'Row("{row.label} (renamed)"')
    _edit(code / "tasks/grid/tables.py", "60.6, 89.4", "61.6, 89.4")
    assert _keys(code) == before


def test_editing_the_training_loop_changes_every_run_key(code: Path) -> None:
    before = _keys(code)
    loop = code / "tasks/training/loop.py"
    loop.write_text(loop.read_text() + "\n# a learning-rate warm-up would go here\n")
    after = _keys(code)
    assert all(after[run] != key for run, key in before.items())


def test_the_code_a_run_executes_excludes_the_tables_and_includes_the_loop() -> None:
    files = {f.as_posix() for f in module_files(runs.STAGE)}
    assert "tasks/training/loop.py" in files and "rain_model/objective.py" in files
    assert "tasks/grid/tables.py" not in files and "tasks/grid_report.py" not in files
