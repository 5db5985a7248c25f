"""The grid's report: mean and std over seeds per table row, Markdown/CSV/plots, MLflow nesting, missing runs."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tasks.config import Params
from tasks.grid import configs as grid
from tasks.grid import tables as grid_tables
from tasks.grid.runs import result_path
from tasks.grid_report import NO_CHOICE, SWEEP, MissingRuns, choose, choose_adv_weight, collect, run, stat
from tests.micro_project import micro_params

QUERY_SETS = ("lr", "r2", "r3", "r4", "r8", "hr")


# The paper's configurations first, in grid order, then the strong and choice ones: each gets a known score.
ORDER = sorted(grid.CONFIGS, key=lambda c: c.startswith(grid.STRONG_PREFIX) or not grid.CONFIGS[c].test)


def _score(config: str, seed: int, query_set: str) -> float:
    """A distinct, known rank-1 per (config, seed, query set), so the test can recompute every cell."""
    return round(0.05 * (ORDER.index(config) % 10) + 0.01 * seed + 0.002 * QUERY_SETS.index(query_set), 6)


def _val_score(config: str, seed: int) -> float:
    """The validation LR rank-1 of a run: in the sweep highest at w_adv = 0.3, among the learning rates at x3 with
    the paper's recipe and x1 with the strong options, D's pace at 3 D steps with the paper's recipe and as is with
    the strong options, whatever the test figures say."""
    return {"adv_0.0": 0.30, "adv_0.1": 0.32, "adv_0.3": 0.40, "adv_1.0": 0.35, "lr_x3": 0.45, "d_steps3": 0.3,
            "strong_multi_level": 0.5}.get(config, 0.25) + 0.01 * seed


def _figure(config: str, seed: int, query_set: str) -> float:
    return _val_score(config, seed) if query_set == "val" else _score(config, seed, query_set)


def _write_result(params: Params, config: str, seed: int, run_id: str,
                  test_score: Callable[[str, int, str], float] = _score) -> None:
    rows = {q: {"row": q, "rank1": test_score(config, seed, q), "rank5": 0.9, "rank10": 0.95, "rank20": 1.0,
                "mAP": test_score(config, seed, q) / 2} for q in QUERY_SETS} if grid.CONFIGS[config].test else {}
    cfg = grid.CONFIGS[config]
    identities = params.experiments.val_identities if cfg.validation else params.protocol.val_identities
    validation = {"identities": identities, "kept_epoch": 1 + seed, "lr_rank1": _val_score(config, seed),
                  "last_epoch_lr_rank1": 0.2, "last_epoch_probe_accuracy": 0.5 + 0.1 * seed,
                  **({"last_epoch_lr_rank1_v": 0.3, "last_epoch_lr_rank1_bnneck": 0.2 + 0.01 * seed}
                     if config.startswith(grid.STRONG_PREFIX) else {})} if identities else None
    game = {"D4_accuracy_HR": 0.75, "D4_accuracy_LR": 0.7, "feature_distance": 0.2 + 0.1 * seed}
    path = result_path(params, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "seed": seed, "trial": seed, "rows": rows, "epochs": 1,
                                "train_seconds": 10.0, "eval_seconds": 2.0, "mlflow_run_id": run_id,
                                "validation": validation, "final_game": game}))


def _write_favouring(params: Params, configs: list[str], seeds: tuple[int, ...], favoured: str) -> None:
    """Every run's result, with test figures that favour `favoured` (0.9 against 0.1 for the others)."""
    def test_score(config: str, seed: int, query_set: str) -> float:
        return 0.9 if config == favoured else 0.1

    for config in configs:
        for seed in seeds:
            _write_result(params, config, seed, "x", test_score)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.chdir(tmp_path)
    return micro_params({"experiments": {"seeds": [0, 1]}})


def test_stat_is_the_mean_and_the_sample_std() -> None:
    assert stat([0.5]) == (0.5, 0.0)
    mean, std = stat([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)


def test_missing_runs_are_listed_by_configuration_and_seed(project: Params) -> None:
    _write_result(project, "multi_level", 0, "x")
    with pytest.raises(MissingRuns, match="multi_level seed 1") as info:
        collect(project, (0, 1), ["multi_level", "rates_2"])
    assert "rates_2 seed 0" in str(info.value) and "3 grid run(s)" in str(info.value)


def test_report_tables_csv_plots_and_mlflow_parent(project: Params, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tasks.grid.runs import experiments_mlflow_description
    from tasks.infra.tracking import mlflow_experiment_id

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = mlflow_experiment_id(client, "rain-synthetic-experiments", experiments_mlflow_description(project),
                                  tmp_path)
    children = {}
    for config in grid.CONFIGS:
        for seed in (0, 1):
            children[(config, seed)] = client.create_run(exp_id, run_name=f"{config}-seed{seed}").info.run_id
            _write_result(project, config, seed, children[(config, seed)])

    summary = run(project)

    out = tmp_path / project.experiments_dir()
    # Every cell is the mean (and sample std) over the two seeds of that row's configuration and query set.
    for table in grid_tables.TABLES:
        shown = [row for row in table.rows if row.query_set != "val" or grid.CONFIGS[row.config].validation]
        for row, got in zip(shown, summary["tables"][table.key], strict=True):
            values = [_figure(row.config, s, row.query_set) for s in (0, 1)]
            assert got["rank1"] == pytest.approx(sum(values) / 2)
            assert got["rank1_std"] == pytest.approx(stat(values)[1])
    table2 = {r["row"]: r for r in summary["tables"]["table2"]}
    unseen = table2["train r in {1,2,3,4}, test r = 8 (unseen)"]  # the full model: HR (r = 1) and LR at 2, 3, 4
    assert unseen["rank1"] == pytest.approx((_score("multi_level", 0, "r8") + _score("multi_level", 1, "r8")) / 2)

    text = (out / "results.md").read_text()
    assert text.count("### Table") == 4 and "### Figure 5" in text
    # What the runs trained, in the header: width, precision and learning rate decide the figures too.
    model, obj, train = project.model, project.objective, project.train
    decays = ", ".join(map(str, train.lr_decay_epochs))
    assert decays and f"Adam at {obj.lr:g} (x{train.lr_decay:g} at epochs {decays})." in text
    assert f"{model.backbone} ({model.base_channels} base channels) at 64x32, fp32, Adam at" in text
    # The sweep: w_adv = 0.3 has the best validation figure; its test LR rank-1 against the baseline's, per seed.
    assert "Chosen: `adv_0.3`" in text
    gap = 100 * (_score("adv_0.3", 0, "lr") - _score("adv_0.0", 0, "lr"))
    chosen, baseline = 100 * _score("adv_0.3", 0, "lr"), 100 * _score("adv_0.0", 0, "lr")
    assert f"| 0 | {chosen:.1f} | {baseline:.1f} | {gap:+.1f} | 1 / 1 |" in text
    assert "| HR-LR feature distance | 0.25 | 0.25 | 0.25 | 0.25 |" in text
    assert "| w_adv = 0.3 (`adv_0.3`) | " in text and "Paper rank 1 ()" not in text  # not the paper's table
    # The choices: x1 is multi_level itself, validated here on no split (protocol.val_identities 0): left out.
    assert ("| objective.lr (the paper's recipe) | x0.3 25.5, x3 45.5, x1 (`multi_level`: not validated on the "
            "choice runs' split) | **x3** | `lr_x0.3`, `lr_x3` (seeds 0, 1) |") in text
    assert "| model.retrieval_feature (last epoch) | v 30.0, bnneck 20.5 | **v** |" in text
    assert "### The game, last epoch" in text and "| `adv_mean` | 0.55 |" in text  # probe accuracy, mean of seeds
    assert ("| RAIN beats the baseline trained on HR & LR, both on the strong-baseline options (Table 1 + strong) | "
            "A - B > +0 | +13.0 |") in text
    assert "| The strong-baseline options help RAIN (Table 1 + strong) | A - B > +0 | - |" in text
    ours = summary["tables"]["table1"][3]
    assert f"| Ours (multi-level) (`multi_level`) | {100 * ours['rank1']:.1f} ± {100 * ours['rank1_std']:.1f} |" in text
    assert "| 78.9 |" in text  # the paper's figure next to ours
    # Claims tested per seed: multi_level - baseline_hr is 15 points on every seed; no_cls scores above RAIN.
    assert ("| RAIN beats the baseline trained on HR (Table 1) | A - B > +0 | +18.3 | +15.0 ± 0.0 | +15.0 / +15.0 | "
            "2/2 | holds |" in text)
    assert "| L_cls helps (Table 3) | A - B > +0 | +8.1 | -5.0 ± 0.0 | -5.0 / -5.0 | 0/2 | does not hold |" in text
    # A bound, not a sign: labels_0.4 scores 5 points below the full model here, not less than 5.
    assert ("| 40% labels come within 5 points of 100% (label efficiency) (Figure 5) | A - B > -5 | -2.8 | "
            "-5.0 ± 0.0 | -5.0 / -5.0 | 0/2 | does not hold |" in text)
    r8 = [_score("multi_level", s, "r8") for s in (0, 1)]  # the numbers behind rate_bars.png, as a table
    assert "| `multi_level` | " in text and f"{100 * stat(r8)[0]:.1f} ± {100 * stat(r8)[1]:.1f} |" in text
    assert "; ours w/o L_rec (" in text  # no_rec scores highest of the four here
    assert f"| `rates_3` | 1 | 1 | {100 * _score('rates_3', 1, 'lr'):.1f} |" in text  # every run, per seed

    with (out / "results.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == sum(len(summary["tables"][t.key]) * len(t.metrics) for t in grid_tables.TABLES)
    choice_rows = grid_tables.tables(("choices",))[0].rows  # the validation-only ones (not x1, sum, as is) have rows
    assert len(summary["tables"]["choices"]) == len([r for r in choice_rows if not grid.CONFIGS[r.config].test])
    first = lines[0]
    assert (first["table"], first["config"], first["metric"]) == ("table1", "baseline_hr", "rank1")
    assert float(first["paper"]) == 60.6

    for picture in ("label_fraction.png", "rate_bars.png"):
        with Image.open(out / picture) as img:
            assert img.size[0] >= 800

    parent = summary["parent_run_id"]
    nested = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert {r.info.run_id for r in nested} == set(children.values())
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    # A row's figure over seeds in the eval/ section, its std in eval_std/, named as a run's rows are.
    # In percent, to the 4 decimals tracking.shown keeps.
    assert parent_run.data.metrics["eval/multi_level.lr_rank1"] == pytest.approx(100 * ours["rank1"], abs=5e-5)
    assert parent_run.data.metrics["eval_std/multi_level.lr_rank1"] == pytest.approx(100 * ours["rank1_std"], abs=5e-5)
    assert all(k.startswith(("eval/", "eval_std/")) for k in parent_run.data.metrics), parent_run.data.metrics
    assert {"results.md", "results.csv", "label_fraction.png", "rate_bars.png"} <= {
        a.path for a in client.list_artifacts(parent)}
    assert json.loads((out / "results.json").read_text())["parent_run_id"] == parent


def test_the_sweep_chooses_on_the_validation_split_whatever_the_test_figures(project: Params) -> None:
    """The choice reads validation figures only: test figures that favour each other weight change nothing."""
    seeds = (0, 1)
    for favoured in SWEEP:
        _write_favouring(project, list(SWEEP), seeds, favoured)
        assert choose_adv_weight(collect(project, seeds, list(SWEEP)), seeds) == "adv_0.3"


def test_the_choices_read_the_validation_split_only_whatever_the_test_figures(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run validated on one split (as presets/cuhk03-crops.yaml sets it), so the x1 candidates (the table's
    own multi_level runs, which also read the test split) are compared too; test figures favouring each candidate
    in turn change no choice."""
    monkeypatch.chdir(tmp_path)
    params = micro_params({"experiments": {"seeds": [0, 1], "val_identities": 2}, "protocol": {"val_identities": 2}})
    seeds = (0, 1)
    groups = grid_tables.CHOICE_GROUPS
    configs = sorted({c for _, group in groups for _, c in group})
    for favoured in configs:
        _write_favouring(params, configs, seeds, favoured)
        results = collect(params, seeds, configs)
        chosen = [choose(results, seeds, group) for _, group in groups]
        assert [c for c, _ in chosen] == ["x3", "x1", "sum", "objective.d_steps 3", "as is"], favoured
        assert all(len(means) == len(group) for (_, means), (_, group) in zip(chosen, groups, strict=True))


def test_a_collapsed_candidate_is_never_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CUHK03 crops the paper's recipe collapsed at two of three rates: a collapsed run's validation figure
    (chance, or a lucky draw) must not win a choice; when every candidate collapsed, nothing is chosen."""
    monkeypatch.chdir(tmp_path)
    params = micro_params({"experiments": {"seeds": [0], "val_identities": 2}, "protocol": {"val_identities": 2}})
    group = dict(grid_tables.CHOICE_GROUPS)["objective.lr (the paper's recipe)"]
    for _, config in group:
        _write_result(params, config, 0, "x")
    results = collect(params, (0,), [c for _, c in group])
    assert choose(results, (0,), group)[0] == "x3"  # the best validation figure (_val_score)
    results[("lr_x3", 0)]["collapse"] = "every feature at one point"
    assert choose(results, (0,), group)[0] == "x0.3"  # the next best of those that did not collapse (a tie: first)
    for _, config in group:
        results[(config, 0)]["collapse"] = "every feature at one point"
    assert choose(results, (0,), group)[0] == NO_CHOICE
