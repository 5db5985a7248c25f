"""The paper's grid: which configurations the tables read, what each one changes, when a result is stale."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from tasks.config import ParamsError
from tasks.grid import configs as grid
from tasks.grid import tables as grid_tables
from tests.micro_project import REPO, micro_params


def test_dvc_matrix_lists_exactly_the_grid_configurations() -> None:
    stages = yaml.safe_load((REPO / "grid" / "dvc.yaml").read_text())["stages"]
    assert stages["grid_run"]["matrix"]["config"] == list(grid.CONFIGS)
    assert stages["grid_run"]["matrix"]["seed"] == "${experiments.seeds}"


def test_every_configuration_is_read_by_a_table_and_shared_ones_are_trained_once() -> None:
    rows = [row for table in grid_tables.TABLES for row in table.rows]
    assert {row.config for row in rows} == set(grid.CONFIGS)
    assert grid_tables.configs_of(grid_tables.TABLES) == list(grid.CONFIGS)
    assert len(rows) == 45 and len(grid.CONFIGS) == 32  # 45 table rows from 32 trainings per seed
    # The full model is Table 1's multi-level row, Table 3's "Ours", Table 4's {2,3,4} and Figure 5's 100%.
    readers = {t.key for t in grid_tables.TABLES for r in t.rows if r.config == "multi_level"}
    assert readers == {"table1", "table2", "table3", "table4", "figure5", "choices"}
    # "w/o L_adv" is the HR & LR baseline (Eq. 7 without L_adv), as the paper's identical rows show.
    table3 = {r.label: r.config for r in grid_tables.tables(("table3",))[0].rows}
    assert table3["Ours w/o L_adv"] == "baseline_hrlr"


def test_a_subset_of_tables_needs_only_its_configurations() -> None:
    assert grid_tables.configs_of(grid_tables.tables(("table4",))) == ["multi_level", "rates_2", "rates_3", "rates_4"]
    with pytest.raises(ParamsError, match="table9"):
        grid_tables.tables(("table1", "table9"))


@pytest.mark.parametrize(("name", "check"), [
    ("baseline_hr", lambda p: p.objective.variant == "baseline_hr"),
    ("baseline_hrlr", lambda p: p.objective.variant == "baseline_hrlr" and p.objective.w_adv == 1.0),
    ("single_level", lambda p: p.model.levels == (5,)),
    ("multi_level", lambda p: p.model.levels == (4, 5) and p.objective.variant == "rain"),
    ("no_cls", lambda p: p.objective.w_cls == 0.0 and p.objective.active_terms() == ("L_adv", "L_rec", "L_tri")),
    ("no_tri", lambda p: p.objective.active_terms() == ("L_adv", "L_rec", "L_cls")),
    ("no_rec", lambda p: p.objective.active_terms() == ("L_adv", "L_cls", "L_tri")),
    ("rates_2", lambda p: p.protocol.train_rates == (2,)),
    ("rates_3", lambda p: p.protocol.train_rates == (3,)),
    ("labels_0.4", lambda p: p.train.label_fraction == pytest.approx(0.4)),
    ("labels_0.0", lambda p: p.train.label_fraction == 0.0 and p.objective.variant == "rain"),
])
def test_configure_applies_the_configuration(name: str, check) -> None:  # type: ignore[no-untyped-def]
    assert check(grid.configure(micro_params(), name, 0))


def test_seed_sets_the_training_seed_the_trial_and_the_grid_length() -> None:
    params = micro_params({"experiments": {"epochs": 7}, "protocol": {"trials": 2}})
    run = grid.configure(params, "multi_level", 3)
    assert (run.train.seed, run.train.trials, run.train.epochs) == (3, (1,), 7)
    assert grid.configure(params, "multi_level", 4).train.trials == (0,)
    with pytest.raises(ParamsError, match="'no_such'"):
        grid.configure(params, "no_such", 0)


def test_data_variants_skip_the_pipeline_data() -> None:
    # Table 4's rates, and the L_adv sweep's validation split (MICRO: experiments.val_identities 2).
    assert grid.data_variants(micro_params()) == [((2,), 0), ((2, 3, 4), 2), ((3,), 0), ((4,), 0)]
    # With the pipeline at rate 2, rates_2 trains on the pipeline's own LR images.
    assert grid.data_variants(micro_params({"protocol": {"train_rates": [2]}})) == [((2,), 2), ((3,), 0), ((4,), 0)]
    # With the pipeline validating as the sweep does, the sweep trains on the pipeline's manifest.
    assert grid.data_variants(micro_params({"protocol": {"val_identities": 2}})) == [((2,), 2), ((3,), 2), ((4,), 2)]


def test_run_key_follows_what_changes_a_result_and_nothing_else() -> None:
    params = micro_params()
    inputs = {"train_manifest": "a", "eval_manifest": "b", "code": "c"}
    key = grid.run_key(params, "multi_level", 0, inputs)
    assert re.fullmatch(r"[0-9a-f]{64}", key)  # a sha256 digest
    assert grid.run_key(params, "multi_level", 0, dict(reversed(inputs.items()))) == key  # inputs are a mapping
    # result.json keeps the key for later processes: another interpreter (other str hashes) computes the same.
    code = ("from tests.micro_project import micro_params; from tasks.grid import configs as grid; "
            f"print(grid.run_key(micro_params(), 'multi_level', 0, {inputs!r}))")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "12345"},
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == key
    same = [
        dataclasses.replace(params, experiments=dataclasses.replace(params.experiments, seeds=(0, 5), cpus_per_run=4)),
        dataclasses.replace(params, paths=dataclasses.replace(params.paths, experiments="elsewhere")),
        dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=99, seed=42)),  # grid sets both
        dataclasses.replace(params, serve=dataclasses.replace(params.serve, max_images=1)),  # serving, not training
    ]
    for other in same:
        assert grid.run_key(other, "multi_level", 0, inputs) == key
    changed = [
        grid.run_key(params, "multi_level", 1, inputs),
        grid.run_key(params, "single_level", 0, inputs),
        grid.run_key(params, "multi_level", 0, inputs | {"code": "d"}),
        grid.run_key(params, "multi_level", 0, inputs | {"eval_manifest": "x"}),
        grid.run_key(dataclasses.replace(params, experiments=dataclasses.replace(params.experiments, epochs=3)),
                     "multi_level", 0, inputs),
        grid.run_key(dataclasses.replace(params, objective=dataclasses.replace(params.objective, margin=0.5)),
                     "multi_level", 0, inputs),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize(("section", "message"), [
    ({"seeds": []}, "experiments.seeds"),
    ({"seeds": [0, 0]}, "experiments.seeds"),
    ({"epochs": 0}, "experiments.epochs"),
    ({"cpus_per_run": 0}, "experiments.cpus_per_run"),
    ({"epoch": 3}, "unknown key 'experiments.epoch'"),
])
def test_bad_experiments_params_are_refused_by_name(section: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        micro_params({"experiments": section})


def test_the_strong_configurations_are_table_1_s_with_every_strong_option_on_top() -> None:
    for name in ("baseline_hr", "baseline_hrlr", "single_level", "multi_level"):
        plain, strong = grid.CONFIGS[name], grid.CONFIGS[grid.STRONG_PREFIX + name]
        assert dict(strong.overrides) == {**plain.overrides, **grid.STRONG}
    table1 = {r.config for r in grid_tables.tables(("table1",))[0].rows}
    assert {grid.STRONG_PREFIX + c.name for c in grid.TABLE1} <= table1


def test_a_choice_run_reads_no_test_rows_and_scales_params_yaml_s_value() -> None:
    choices = [c for c in grid.CONFIGS.values() if not c.test]
    assert {c.name for c in choices} == {c.name for c in grid.CHOICES}
    assert all(c.validation for c in choices)  # each is scored on the validation split instead
    params = micro_params()
    configured = grid.configure(params, "lr_x3", 0)
    assert configured.objective.lr == pytest.approx(3 * params.objective.lr)
    assert grid.configure(params, "strong_lr_x0.3", 0).model.bnneck
    with pytest.raises(ValueError, match="neither the test nor a validation split"):
        grid.Configuration("nowhere", test=False)


def test_the_strong_recipe_trains_at_its_own_rate_when_one_is_set() -> None:
    params = micro_params({"experiments": {"strong_lr": 0.01}})
    assert grid.configure(params, "strong_multi_level", 0).objective.lr == 0.01
    assert grid.configure(params, "strong_lr_x3", 0).objective.lr == pytest.approx(0.03)  # its choice scales it
    assert grid.configure(params, "multi_level", 0).objective.lr == params.objective.lr  # the paper's recipe: not
    unset = micro_params()
    assert grid.configure(unset, "strong_baseline_hr", 0).objective.lr == unset.objective.lr


def test_the_strong_rate_changes_only_the_strong_runs_keys() -> None:
    inputs = {"code": "c"}
    before, after = micro_params(), micro_params({"experiments": {"strong_lr": 0.01}})
    assert grid.run_key(before, "multi_level", 0, inputs) == grid.run_key(after, "multi_level", 0, inputs)
    assert grid.run_key(before, "strong_multi_level", 0, inputs) != grid.run_key(after, "strong_multi_level", 0, inputs)
