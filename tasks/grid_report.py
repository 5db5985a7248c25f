"""Stage `grid_report`: the grid's tables, mean and standard deviation over seeds, beside the paper's.

Reads every <experiments>/<dataset>/runs/<config>/seed-<s>/result.json the tables need and writes, in
<experiments>/<dataset>/: results.md (the tables, with the paper's figures and what each run cost),
results.csv (one line per table row and metric), results.json, label_fraction.png (Figure 5) and
rate_bars.png (rank-1 per test rate). It opens an MLflow parent run for the grid and nests every run it
read under it (runs trained by an earlier, interrupted grid are moved under this one), so the MLflow UI
shows one grid with one child per configuration and seed.

Standard deviations are over seeds (sample std, n - 1: rain_model.metrics.mean_std); each seed's figure is
already the mean over `evaluate.gallery_repeats` single-shot gallery draws.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rain_model.config import RETRIEVAL_FEATURES
from rain_model.metrics import mean_std
from tasks.config import Params, load_params
from tasks.evaluation.reporting import METRIC_LABELS
from tasks.grid import configs as grid
from tasks.grid import tables as grid_tables
from tasks.grid.runs import experiments_mlflow_description, experiments_mlflow_name, load_result
from tasks.infra.logs import setup_logging
from tasks.infra.tracking import COLLAPSE, RANK1_BY_FEATURE

log = logging.getLogger(__name__)

BASELINES = ("baseline_hr", "baseline_hrlr")
RATE_BAR_CONFIGS = (*BASELINES, "single_level", "multi_level")


class MissingRuns(RuntimeError):
    """Some runs the tables need have no result; the message lists them."""


def collect(params: Params, seeds: tuple[int, ...], configs: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    results, missing = {}, []
    for config in configs:
        for seed in seeds:
            result = load_result(params, config, seed)
            if result is None:
                missing.append(f"{config} seed {seed}")
            else:
                results[(config, seed)] = result
    if missing:
        raise MissingRuns(f"{len(missing)} grid run(s) have no result yet: {', '.join(missing)} "
                          "(run `prefect deployment run rain-grid/experiments` or `dvc repro`)")
    return results


def stat(values: list[float]) -> tuple[float, float]:
    """``mean_std`` of per-seed values, as floats."""
    mean, std = mean_std(values)
    return float(mean), float(std)


def figure(result: dict[str, Any], query_set: str, metric: str) -> float:
    """One figure of a run: an evaluation row's, or (query set `val`) the validation split's LR rank-1 at the
    epoch the run kept."""
    if query_set == "val":
        if metric != "rank1" or result.get("validation") is None:
            raise ValueError(f"run {result['config']} seed {result['seed']}: no validation {metric} (only rank1 of "
                             "a configuration with a validation split)")
        return float(result["validation"]["lr_rank1"])
    return float(result["rows"][query_set][metric])


SWEEP = tuple(grid.sweep_config(w) for w in grid.ADV_SWEEP)  # the L_adv sweep's configurations, w_adv ascending
SWEEP_BASELINE, SWEEP_DEFAULT = SWEEP[0], SWEEP[-1]  # w_adv = 0 (the HR & LR baseline) and the paper's w_adv = 1


def choose_adv_weight(results: dict[tuple[str, int], dict[str, Any]], seeds: tuple[int, ...]) -> str:
    """The sweep's configuration with the best mean validation LR rank-1 over seeds (the smaller weight on a
    tie). Reads the validation split only: the test figures cannot change the choice."""
    means = {c: stat([figure(results[(c, s)], "val", "rank1") for s in seeds])[0] for c in SWEEP}
    return max(SWEEP, key=lambda c: (means[c], -SWEEP.index(c)))


NO_CHOICE = "none: every candidate collapsed"


def choose(results: dict[tuple[str, int], dict[str, Any]], seeds: tuple[int, ...],
           candidates: tuple[tuple[str, str], ...]) -> tuple[str, dict[str, float]]:
    """(label of the candidate with the best mean validation LR rank-1 over seeds, each candidate's mean); the
    earlier candidate on a tie. Reads the validation split only: the test figures cannot change the choice.

    A candidate is compared only when its runs were validated on the same identities as the choice runs: a
    table configuration (multi_level: the x1 rate) has a validation split only when protocol.val_identities
    equals experiments.val_identities (presets/cuhk03-crops.yaml); otherwise it is left out of the choice."""
    def split(c: str) -> set[Any]:
        return {(results[(c, s)].get("validation") or {}).get("identities") for s in seeds}

    wanted = set().union(*(split(c) for _, c in candidates if not grid.CONFIGS[c].test))
    compared = [(label, c) for label, c in candidates if split(c) == wanted and None not in wanted]
    means = {label: stat([figure(results[(c, s)], "val", "rank1") for s in seeds])[0] for label, c in compared}
    # A candidate whose features collapsed on a seed ranks nothing: it cannot be chosen, whatever its figure.
    eligible = [label for label, c in compared if not any(results[(c, s)].get(COLLAPSE) for s in seeds)]
    if not eligible:
        return NO_CHOICE, means
    return max(eligible, key=lambda label: (means[label], -list(means).index(label))), means


def retrieval_choice(results: dict[tuple[str, int], dict[str, Any]]
                     ) -> tuple[str, dict[str, float], list[str]] | None:
    """model.retrieval_feature chosen on the validation split: (feature, its mean last-epoch validation LR rank-1
    over every run that scored both, those runs); None when no run did (BNNeck off everywhere)."""
    keys = {f: f"last_epoch_{RANK1_BY_FEATURE}{f}" for f in RETRIEVAL_FEATURES}
    scored = sorted((c, s) for (c, s), r in results.items()
                    if all(k in (r.get("validation") or {}) for k in keys.values()))
    if not scored:
        return None
    means = {f: float(np.mean([results[run]["validation"][k] for run in scored])) for f, k in keys.items()}
    chosen = max(means, key=lambda f: (means[f], -RETRIEVAL_FEATURES.index(f)))
    return chosen, means, [f"`{c}` seed {s}" for c, s in scored]


def choices_markdown(results: dict[tuple[str, int], dict[str, Any]], seeds: tuple[int, ...]) -> str:
    """Each setting the choices table compares, the candidate the validation split prefers, and the runs that chose."""
    lines = ["### Settings chosen on the validation split", "",
             "Each choice is the best mean validation LR rank-1 over seeds " + ", ".join(map(str, seeds)) +
             "; the choice runs read no test rows, and the chooser reads only `validation` of each run (and whether "
             "it collapsed: a collapsed candidate is never chosen).", "",
             "| Setting | Candidates (validation LR rank-1, %) | Chosen | Runs that chose |", "|:---|:---|:---|:---|"]
    for what, candidates in grid_tables.CHOICE_GROUPS:
        chosen, means = choose(results, seeds, candidates)
        runs = ", ".join(f"`{c}`" for label, c in candidates if label in means)
        left_out = [f"{label} (`{c}`: not validated on the choice runs' split)" for label, c in candidates
                    if label not in means]
        collapsed = {label for label, c in candidates if any(results[(c, s)].get(COLLAPSE) for s in seeds)}
        shown = [f"{label} {100 * m:.1f}" + (" (collapsed)" if label in collapsed else "")
                 for label, m in means.items()]
        lines.append(f"| {what} | " + ", ".join([*shown, *left_out])
                     + f" | **{chosen}** | {runs} (seeds {', '.join(map(str, seeds))}) |")
    feature = retrieval_choice(results)
    if feature is not None:
        best, scores, scored = feature
        lines.append("| model.retrieval_feature (last epoch) | " + ", ".join(
            f"{f} {100 * m:.1f}" for f, m in scores.items()) + f" | **{best}** | {', '.join(scored)} |")
    return "\n".join(lines)


EVAL_GAME = (("last_epoch_probe_accuracy", "probe HR/LR (eval, val)"),
             ("last_epoch_centroid_gap", "centroid gap (eval, val)"))


def game_markdown(results: dict[tuple[str, int], dict[str, Any]], configs: list[str]) -> str:
    """The game at the last epoch of every configuration, mean over its runs: how well a fresh linear probe tells
    HR gallery from LR query features on the validation split in eval mode (0.5: aligned), their centroid gap,
    and the D_j's own train-mode accuracies and loss."""
    shown = (*EVAL_GAME, *GAME_SHOWN[:4], ("L_D", "L_D"))
    lines = ["### The game, last epoch (mean over seeds)", "",
             "A probe accuracy of 0.5 means HR and LR features are indistinguishable as retrieval sees them; a "
             "configuration without L_adv shows how far apart they are when F does not fight D. L_D of a coin flip "
             "is 2 ln 2 per level.", "",
             "| Configuration | " + " | ".join(label for _, label in shown) + " |", "|:---|" + "---:|" * len(shown)]
    for config in configs:
        runs = [r for (c, _), r in sorted(results.items()) if c == config]
        lines.append(f"| `{config}` | " + " | ".join(_game_cell(runs, key) for key, _ in shown) + " |")
    return "\n".join(lines)


def _game_cell(runs: list[dict[str, Any]], key: str) -> str:
    """Mean over `runs` of a validation, game or loss figure named `key`; - when a run lacks it."""
    values = [(r.get("validation") or {}).get(key, r.get("final_game", {}).get(key, r.get("final_losses", {}).get(key)))
              for r in runs]
    return "-" if any(v is None for v in values) else f"{np.mean([float(v) for v in values]):.3g}"


GAME_SHOWN = (("D4_accuracy_HR", "D4 accuracy HR"), ("D4_accuracy_LR", "D4 accuracy LR"),
              ("D5_accuracy_HR", "D5 accuracy HR"), ("D5_accuracy_LR", "D5 accuracy LR"),
              ("feature_distance", "HR-LR feature distance"), ("centroid_gap", "HR-LR centroid gap"),
              ("grad_f4_ratio", "gradient norm at f4, w_adv L_adv over L_cls + L_tri"),
              ("grad_f5_ratio", "gradient norm at f5, w_adv L_adv over L_cls + L_tri"))


def sweep_markdown(results: dict[tuple[str, int], dict[str, Any]], seeds: tuple[int, ...]) -> str:
    """The weight chosen on the validation split, its test LR rank-1 against the HR & LR baseline's (paired by
    seed), and the game's diagnostics in the last epoch of the chosen and the default weights."""
    chosen = choose_adv_weight(results, seeds)
    lines = ["### The weight of L_adv, chosen on the validation split", "",
             f"Chosen: `{chosen}` ({grid.CONFIGS[chosen].description}), the best mean validation LR rank-1. Test "
             "figures of the chosen weight and of the baseline only (each run keeps its best validation epoch):", "",
             "| Seed | Chosen, test LR rank-1 | HR & LR baseline (w_adv = 0), test LR rank-1 | Chosen - baseline | "
             "Epochs kept (chosen / baseline) |", "|---:|---:|---:|---:|---:|"]
    gaps = []
    for s in seeds:
        a, b = (100 * figure(results[(c, s)], "lr", "rank1") for c in (chosen, SWEEP_BASELINE))
        gaps.append(a - b)
        kept = " / ".join(str(results[(c, s)]["validation"]["kept_epoch"]) for c in (chosen, SWEEP_BASELINE))
        lines.append(f"| {s} | {a:.1f} | {b:.1f} | {a - b:+.1f} | {kept} |")
    every = "on every seed" if all(g >= 0 for g in gaps) else f"on {sum(g >= 0 for g in gaps)} of {len(gaps)} seeds"
    lines += ["", f"The chosen weight's test LR rank-1 is at least the baseline's {every}." if chosen != SWEEP_BASELINE
              else "The validation split chose w_adv = 0: on it, L_adv did not help at any weight tried.", "",
              "Diagnostics of the game in the last epoch, mean over seeds (`game/` in each run's MLflow metrics):",
              "", "| Diagnostic | " + " | ".join(f"`{c}`" for c in SWEEP) + " |", "|:---|" + "---:|" * len(SWEEP)]
    for key, label in GAME_SHOWN:
        cells = []
        for c in SWEEP:
            values = [results[(c, s)].get("final_game", {}).get(key) for s in seeds]
            cells.append("-" if any(v is None for v in values) else f"{stat([float(v) for v in values])[0]:.3g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_rows(table: grid_tables.Table, results: dict[tuple[str, int], dict[str, Any]],
               seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """One dict per table row: label, config, query_set, seeds, and <metric>/<metric>_std as fractions (a
    validation row of runs without a validation split is left out)."""
    out = []
    for row in table.rows:
        if row.query_set == "val" and any(results[(row.config, s)].get("validation") is None for s in seeds):
            continue  # a choice's table-configuration candidate, validated on no split here (choose says so)
        entry: dict[str, Any] = {"table": table.key, "row": row.label, "config": row.config,
                                 "query_set": row.query_set, "seeds": len(seeds)}
        for metric in table.metrics:
            values = [figure(results[(row.config, s)], row.query_set, metric) for s in seeds]
            entry[metric], entry[f"{metric}_std"] = stat(values)
            entry[f"paper_{metric}"] = row.paper.get(metric)
        out.append(entry)
    return out


def markdown(table: grid_tables.Table, rows: list[dict[str, Any]]) -> str:
    """The table in Markdown; a paper column only for a table of the paper (one with a paper dataset)."""
    paper_column = [f"Paper rank 1 ({table.paper_dataset})"] if table.paper_dataset else []
    heads = ["Method", *(METRIC_LABELS[m] for m in table.metrics), *paper_column]
    lines = [f"### {table.title}", "", "| " + " | ".join(heads) + " |", "|:---|" + "---:|" * (len(heads) - 1)]
    for r in rows:
        cells = [f"{100 * r[m]:.1f} ± {100 * r[m + '_std']:.1f}" for m in table.metrics]
        if paper_column:
            cells.append("-" if r["paper_rank1"] is None else f"{r['paper_rank1']:.1f}")
        lines.append(f"| {r['row']} (`{r['config']}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a test on each seed: the rank-1 points of A - B (A and B: a configuration and
    query set, paired by seed), or, with `share_of` = C, the share (A - B) / (C - B) in %, must exceed
    `minimum`. A sign claim has minimum 0; a claim that a gap is small says how small (e.g. 40% labels
    within 5 points of 100%: minimum -5), since the sign alone would not test what the paper asserts."""

    text: str
    source: str
    a: tuple[str, str]
    b: tuple[str, str]
    paper: float  # the paper's value of the same quantity (nan: the paper has none)
    minimum: float = 0.0
    share_of: tuple[str, str] | None = None


ML = ("multi_level", "lr")
CLAIMS: tuple[Claim, ...] = (
    Claim("RAIN beats the baseline trained on HR", "Table 1", ML, ("baseline_hr", "lr"), 78.9 - 60.6),
    Claim("RAIN beats the baseline trained on HR & LR", "Table 1", ML, ("baseline_hrlr", "lr"), 78.9 - 65.9),
    Claim("Training on LR images helps the baseline", "Table 1", ("baseline_hrlr", "lr"), ("baseline_hr", "lr"),
          65.9 - 60.6),
    Claim("Multi-level beats single-level", "Table 1", ML, ("single_level", "lr"), 78.9 - 77.6),
    # Table 2's "train r in {1,2,3,4}" is the standard training set: each HR image (r = 1) with its LR copy.
    Claim("Unseen r = 8 costs less than 10 points against the seen rates", "Table 2", ("multi_level", "r8"), ML,
          37.5 - 42.5, minimum=-10.0),
    Claim("L_cls helps", "Table 3", ML, ("no_cls", "lr"), 78.9 - 70.8),
    Claim("L_tri helps", "Table 3", ML, ("no_tri", "lr"), 78.9 - 69.1),
    Claim("L_rec helps", "Table 3", ML, ("no_rec", "lr"), 78.9 - 67.3),
    Claim("L_adv helps", "Table 3", ML, ("baseline_hrlr", "lr"), 78.9 - 65.9),
    Claim("Rates {2,3,4} beat rate 2 alone", "Table 4", ML, ("rates_2", "lr"), 78.9 - 70.9),
    Claim("Rates {2,3,4} beat rate 3 alone", "Table 4", ML, ("rates_3", "lr"), 78.9 - 72.3),
    Claim("Rates {2,3,4} beat rate 4 alone", "Table 4", ML, ("rates_4", "lr"), 78.9 - 77.2),
    Claim("20% labels recover over half of what 100% gains over 0%", "Figure 5", ("labels_0.2", "lr"),
          ("labels_0.0", "lr"), 100 * (66.3 - 3.3) / (78.9 - 3.3), minimum=50.0, share_of=ML),
    Claim("40% labels come within 5 points of 100% (label efficiency)", "Figure 5", ("labels_0.4", "lr"), ML,
          76.1 - 78.9, minimum=-5.0),
    # Not the paper's table, its claim on a stronger footing: does L_adv still add to the strong baseline?
    Claim("RAIN beats the baseline trained on HR & LR, both on the strong-baseline options", "Table 1 + strong",
          (grid.STRONG_PREFIX + "multi_level", "lr"), (grid.STRONG_PREFIX + "baseline_hrlr", "lr"), 78.9 - 65.9),
    Claim("RAIN beats the baseline trained on HR, both on the strong-baseline options", "Table 1 + strong",
          (grid.STRONG_PREFIX + "multi_level", "lr"), (grid.STRONG_PREFIX + "baseline_hr", "lr"), 78.9 - 60.6),
    Claim("The strong-baseline options help RAIN", "Table 1 + strong", (grid.STRONG_PREFIX + "multi_level", "lr"),
          ML, math.nan),
    Claim("The strong-baseline options help the HR & LR baseline", "Table 1 + strong",
          (grid.STRONG_PREFIX + "baseline_hrlr", "lr"), ("baseline_hrlr", "lr"), math.nan),
)
ABLATIONS = (("w/o L_cls", "no_cls", 70.8), ("w/o L_tri", "no_tri", 69.1), ("w/o L_rec", "no_rec", 67.3),
             ("w/o L_adv", "baseline_hrlr", 65.9))


def claim_configs(claim: Claim) -> set[str]:
    return {claim.a[0], claim.b[0], *((claim.share_of[0],) if claim.share_of else ())}


def verdict(passed: int, seeds: int) -> str:
    """Resolved only when every seed agrees: with 3 seeds a mixed result is noise as much as signal."""
    if passed == seeds:
        return "holds"
    if passed == 0:
        return "does not hold"
    return f"not resolved at n = {seeds}"


def claims_markdown(results: dict[tuple[str, int], dict[str, Any]], seeds: tuple[int, ...]) -> str:
    """Each claim tested on every seed (paired: same seed = same split and initial seed) and its verdict."""
    def rank1(which: tuple[str, str], seed: int) -> float:
        return 100 * float(results[(which[0], seed)]["rows"][which[1]]["rank1"])

    lines = ["### The paper's claims, checked on each seed (rank-1 points; A - B paired by seed)", "",
             "A claim holds when it holds on every seed, does not hold when it fails on every seed, and is not "
             "resolved otherwise.", "",
             "| Claim (source) | Asserts | Paper | Ours (mean ± std) | Per seed | Seeds where it holds | Verdict |",
             "|:---|:---|---:|---:|---:|---:|:---|"]
    for claim in CLAIMS:
        if not all((c, s) in results for c in claim_configs(claim) for s in seeds):
            continue
        values = []
        for s in seeds:
            gain = rank1(claim.a, s) - rank1(claim.b, s)
            if claim.share_of is not None:
                whole = rank1(claim.share_of, s) - rank1(claim.b, s)
                gain = 100 * gain / whole if whole > 0 else float("nan")  # no gain to share: fails the test
            values.append(gain)
        passed = sum(v > claim.minimum for v in values)
        asserts = (f"(A - B) / ({claim.share_of[0]} - B) > {claim.minimum:.0f}%" if claim.share_of
                   else f"A - B > {claim.minimum:+.0f}")
        mean, std = stat(values)
        unit = "%" if claim.share_of else ""
        per_seed = " / ".join(f"{v:+.1f}{unit}" for v in values)
        paper = "-" if math.isnan(claim.paper) else f"{claim.paper:+.1f}{unit}"
        lines.append(f"| {claim.text} ({claim.source}) | {asserts} | {paper} | "
                     f"{mean:+.1f}{unit} ± {std:.1f} | {per_seed} | {passed}/{len(values)} | "
                     f"{verdict(passed, len(values))} |")
    if all((c, s) in results for _, c, _ in ABLATIONS for s in seeds):
        ours = sorted(ABLATIONS, key=lambda a: -np.mean([rank1((a[1], "lr"), s) for s in seeds]))
        lines += ["", "Ablation order, best to worst rank-1: paper " +
                  " > ".join(f"{n} ({p:.1f})" for n, _, p in ABLATIONS) + "; ours " +
                  " > ".join(f"{n} ({np.mean([rank1((c, 'lr'), s) for s in seeds]):.1f})" for n, c, _ in ours)
                  + "."]
    return "\n".join(lines)


def query_sets(results: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """The test query sets the runs were scored on, in their order (a choice run has none: it reads no test rows)."""
    return list(next((r["rows"] for r in results.values() if r["rows"]), {}))


def rate_table(results: dict[tuple[str, int], dict[str, Any]], configs: list[str],
               seeds: tuple[int, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """Rank-1 (mean, std over seeds) of the main methods on every test set but the mixed MLR one."""
    sets = [q for q in query_sets(results) if q != "lr"]
    names = {q: "HR" if q == "hr" else f"r={q[1:]}" for q in sets}
    methods = {row.config: row.label for row in grid_tables.tables(("table1",))[0].rows}  # the paper's names
    return {methods[m]: {names[q]: stat([results[(m, s)]["rows"][q]["rank1"] for s in seeds]) for q in sets}
            for m in RATE_BAR_CONFIGS if m in configs} if sets else {}


def rates_markdown(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    sets = list(next(iter(table.values())))
    lines = ["### Rank-1 by test rate (rate_bars.png)", "", "| Method | " + " | ".join(sets) + " |",
             "|:---|" + "---:|" * len(sets)]
    lines += [f"| {m} | " + " | ".join(f"{100 * v[q][0]:.1f} ± {100 * v[q][1]:.1f}" for q in sets) + " |"
              for m, v in table.items()]
    return "\n".join(lines)


def runs_markdown(results: dict[tuple[str, int], dict[str, Any]], configs: list[str]) -> str:
    """Rank-1 of every run on every query set: the per-seed figures behind each mean."""
    sets = query_sets(results)
    lines = ["### Every run: rank-1 per query set (%)", "",
             "| Configuration | Seed | Trial | " + " | ".join(sets) + " | Collapsed |",
             "|:---|---:|---:|" + "---:|" * len(sets) + ":---|"]
    for config in configs:
        for (c, seed), r in sorted(results.items()):
            if c == config:
                lines.append(f"| `{c}` | {seed} | {r['trial']} | " +
                             " | ".join(f"{100 * r['rows'][q]['rank1']:.1f}" if q in r["rows"] else "-"
                                        for q in sets) + f" | {_collapsed(r)} |")
    return "\n".join(lines)


def _collapsed(result: dict[str, Any]) -> str:
    """`no`, `yes: <why>` (the last epoch's features collapsed), or `-` for a run recorded before the check."""
    if COLLAPSE not in result:
        return "-"
    return "no" if result[COLLAPSE] is None else f"yes: {result[COLLAPSE]}"


def collapse_warning(results: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """A line leading the report when a run ended collapsed: its figures rank nothing."""
    collapsed = sorted(f"`{c}` seed {s}" for (c, s), r in results.items() if r.get(COLLAPSE))
    if not collapsed:
        return []
    return [f"**{len(collapsed)} run(s) ended with collapsed features** (every feature at one point; their figures "
            f"rank nothing): {', '.join(collapsed)}. The last table says why."]


def cost_markdown(results: dict[tuple[str, int], dict[str, Any]], configs: list[str],
                  tables: tuple[grid_tables.Table, ...]) -> str:
    """Seconds per configuration and compute per table (a shared configuration counts in each table)."""
    lines = ["### What each configuration cost (one run, this machine)", "",
             "| Configuration | Runs | Epochs | Train s (mean) | Eval s (mean) |", "|:---|---:|---:|---:|---:|"]
    for config in configs:
        runs = [r for (c, _), r in results.items() if c == config]
        lines.append(f"| `{config}` | {len(runs)} | {runs[0]['epochs']} | "
                     f"{np.mean([r['train_seconds'] for r in runs]):.0f} | "
                     f"{np.mean([r['eval_seconds'] for r in runs]):.0f} |")
    lines += ["", "| Table | Configurations | Runs | Compute min (train + eval, all seeds) |", "|:---|---:|---:|---:|"]
    for table in tables:
        used = {row.config for row in table.rows}
        runs = [r for (c, _), r in results.items() if c in used]
        lines.append(f"| {table.key} | {len(used)} | {len(runs)} | "
                     f"{sum(r['train_seconds'] + r['eval_seconds'] for r in runs) / 60:.1f} |")
    total = sum(r["train_seconds"] + r["eval_seconds"] for r in results.values())
    lines.append(f"\nCompute summed over all {len(results)} runs: {total / 60:.1f} min (a shared configuration "
                 "counts once here; runs go side by side, so the grid's wall time is shorter: the flow records it "
                 "in grid_runs.jsonl).")
    return "\n".join(lines)


def run(params: Params, seeds: tuple[int, ...] | None = None, parent_run_id: str | None = None,
        table_keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    seeds = tuple(seeds or params.experiments.seeds)
    selected = grid_tables.tables(table_keys)
    configs = grid_tables.configs_of(selected)
    results = collect(params, seeds, configs)
    out_dir = params.experiments_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    all_rows = {t.key: table_rows(t, results, seeds) for t in selected}
    precision = "bf16 autocast" if params.objective.bf16_autocast else "fp32"
    decays = params.train.lr_decay_epochs
    schedule = f"Adam at {params.objective.lr:g}" + (
        f" (x{params.train.lr_decay:g} at epochs {', '.join(map(str, decays))})" if decays else ", constant")
    header = (f"# Experiment grid on `{params.dataset.name}`\n\nMean ± std over seeds {list(seeds)} (each seed: "
              f"train.seed = s on protocol trial s mod {params.protocol.trials}; each figure the mean of "
              f"{params.evaluate.gallery_repeats} single-shot gallery draws); {params.experiments.epochs} epochs "
              f"per run; {params.model.backbone} ({params.model.base_channels} base channels) at "
              f"{params.train.height}x{params.train.width}, {precision}, {schedule}. LR queries and 'r in "
              f"{{2,3,4}}' rows use the MLR protocol's rates, here {list(params.protocol.train_rates)}; unseen: "
              f"{list(params.protocol.unseen_rates)}. Percent.\n")
    rates = rate_table(results, configs, seeds)
    sweep = [sweep_markdown(results, seeds)] if any(t.key == "adv_sweep" for t in selected) else []
    chosen = [choices_markdown(results, seeds)] if any(t.key == "choices" for t in selected) else []
    parts = [header, *collapse_warning(results), *(markdown(t, all_rows[t.key]) for t in selected), *sweep, *chosen,
             claims_markdown(results, seeds), game_markdown(results, configs),
             *([rates_markdown(rates)] if rates else []), runs_markdown(results, configs),
             cost_markdown(results, configs, selected)]
    (out_dir / "results.md").write_text("\n\n".join(parts) + "\n")
    flat = [r for rows in all_rows.values() for r in rows]
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["table", "row", "config", "query_set", "metric", "mean", "std",
                                                "seeds", "paper"])
        writer.writeheader()
        for t in selected:
            for r in all_rows[t.key]:
                for m in t.metrics:
                    writer.writerow({"table": t.key, "row": r["row"], "config": r["config"],
                                     "query_set": r["query_set"], "metric": m, "mean": round(r[m], 6),
                                     "std": round(r[m + "_std"], 6), "seeds": r["seeds"], "paper": r[f"paper_{m}"]})
    _plots(results, configs, seeds, out_dir, params.train.label_fraction, rates)
    summary = {"dataset": params.dataset.name, "seeds": list(seeds), "configs": configs, "tables": all_rows,
               "runs": {f"{c}/seed-{s}": {"train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
                                          "mlflow_run_id": r["mlflow_run_id"], COLLAPSE: r.get(COLLAPSE)}
                        for (c, s), r in results.items()}}
    summary["parent_run_id"] = _mlflow_parent(params, results, flat, out_dir, parent_run_id)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log.info("grid_report: %d tables from %d runs -> %s", len(selected), len(results), out_dir / "results.md")
    return summary


def _plots(results: dict[tuple[str, int], dict[str, Any]], configs: list[str], seeds: tuple[int, ...],
           out_dir: Path, default_fraction: float, rates: dict[str, dict[str, tuple[float, float]]]) -> None:
    from tasks.evaluation.reporting import plot_label_fraction, plot_rate_bars

    def rank1(config: str) -> tuple[float, float]:
        return stat([results[(config, s)]["rows"]["lr"]["rank1"] for s in seeds])

    spread = f"mean ± std over {len(seeds)} seeds"
    curve = {row.config for t in grid_tables.tables(("figure5",)) for row in t.rows} - set(BASELINES)
    points = sorted((float(grid.CONFIGS[c].overrides.get("train.label_fraction", default_fraction)), c)
                    for c in configs if c in curve)
    if points:
        stats = [rank1(c) for _, c in points]
        curves = {"RAIN (this grid)": ([x for x, _ in points], [m for m, _ in stats], [s for _, s in stats])}
        paper = sorted(grid_tables.FIGURE5_PAPER.items())
        curves["RAIN, paper (the points its text gives, MLR-CUHK03)"] = (
            [x for x, _ in paper], [y / 100 for _, y in paper], [0.0] * len(paper))
        refs = {grid.CONFIGS[c].description: rank1(c) for c in BASELINES if c in configs}
        plot_label_fraction(curves, out_dir / "label_fraction.png", refs, spread=spread)
    if rates:
        plot_rate_bars(rates, out_dir / "rate_bars.png", spread=spread,
                       xlabel="test queries: HR, or LR down-sampled by r")


def open_parent_run(params: Params) -> str:
    """A new MLflow parent run for one grid; its runs nest under it, the report finishes it."""
    from mlflow import MlflowClient

    from tasks.infra.tracking import git_commit, mlflow_experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp_id = mlflow_experiment_id(client, experiments_mlflow_name(params), experiments_mlflow_description(params))
    return str(client.create_run(exp_id, run_name=f"grid-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        "stage": "experiments", "dataset": params.dataset.name, "git_commit": git_commit()}).info.run_id)


def _mlflow_parent(params: Params, results: dict[tuple[str, int], dict[str, Any]], rows: list[dict[str, Any]],
                   out_dir: Path, parent_run_id: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from tasks.infra.tracking import eval_metrics, log_metrics, tracking_uri

    client = MlflowClient(tracking_uri())
    if parent_run_id is None:
        parent_run_id = open_parent_run(params)
    for (config, seed), result in sorted(results.items()):
        try:
            client.set_tag(result["mlflow_run_id"], "mlflow.parentRunId", parent_run_id)
        except MlflowException:
            log.warning("MLflow run %s of %s seed %d is not in %s; not nested", result["mlflow_run_id"], config, seed,
                        client.tracking_uri)
    now = int(time.time() * 1000)
    # A table row's figure over seeds: eval/<config>.<query set>_<metric>, its std eval_std/..., as a run's rows; a
    # configuration read by several tables is logged once.
    figures = {f"{r['config']}.{r['query_set']}": {k: r[k] for m in grid_tables.RANK1_AND_MAP if m in r
                                                   for k in (m, f"{m}_std")} for r in rows}
    log_metrics(client, parent_run_id, [Metric(key, value, now, 0) for key, value in eval_metrics(figures).items()])
    client.set_tag(parent_run_id, "runs", str(len(results)))
    for name in ("results.md", "results.csv", "label_fraction.png", "rate_bars.png"):
        if (out_dir / name).exists():
            client.log_artifact(parent_run_id, str(out_dir / name))
    client.set_terminated(parent_run_id, status="FINISHED")
    return str(parent_run_id)


def main() -> None:
    ap = argparse.ArgumentParser(description="Tables and plots of the experiment grid.")
    ap.add_argument("--parent-run-id", default=None, help="MLflow parent run of this grid (default: a new one)")
    ap.add_argument("--table", action="append", default=None, help="only this table (repeat); default: all")
    args = ap.parse_args()
    setup_logging()
    run(load_params(), parent_run_id=args.parent_run_id, table_keys=tuple(args.table) if args.table else None)


if __name__ == "__main__":
    main()
