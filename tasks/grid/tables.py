"""The tables of the paper's grid: which configuration and query set each row reads, its label, and the
paper's own figures beside it. Nothing here runs: editing a label or a paper figure changes the report
only, never a run's key (tasks/grid/runs.py hashes the code a run executes, and this is not part of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rain_model.metrics import METRIC_KEYS
from tasks.config import ParamsError
from tasks.grid.configs import (
    ADV_SWEEP,
    CONFIGS,
    D_PACE,
    LR_FACTORS,
    STRONG_PREFIX,
    choice_name,
    lr_choice,
    spelled,
    sweep_config,
)

RANK1_AND_MAP = (METRIC_KEYS[0], METRIC_KEYS[-1])  # rank1, mAP: the tables where the paper gives only those


@dataclass(frozen=True)
class Row:
    label: str
    config: str
    query_set: str = "lr"  # an evaluate row: lr (MLR queries, rates {2, 3, 4}), r2.., r8 (unseen), hr; or val:
    # the LR queries of the validation split, at the epoch the run kept
    paper: Mapping[str, float] = field(default_factory=dict)  # the paper's figures (%) for this row


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[str, ...] = METRIC_KEYS
    paper_dataset: str = ""


def _paper(*values: float, keys: tuple[str, ...] = METRIC_KEYS) -> dict[str, float]:
    return dict(zip(keys, values, strict=False))


TABLES: tuple[Table, ...] = (
    Table("table1", "Table 1: cross-resolution re-ID, LR queries (MLR) against the HR gallery", (
        Row("Baseline (train on HR)", "baseline_hr", paper=_paper(60.6, 89.4, 95.0, 98.4)),
        Row("Baseline (train on HR & LR)", "baseline_hrlr", paper=_paper(65.9, 92.1, 97.4, 98.9)),
        Row("Ours (single-level)", "single_level", paper=_paper(77.6, 96.2, 98.5, 99.3)),
        Row("Ours (multi-level)", "multi_level", paper=_paper(78.9, 97.3, 98.7, 99.5)),
        # The same four on the strong baseline (not in the paper): does RAIN still add to a baseline users compare with?
        *(Row(f"{label} + strong-baseline options", STRONG_PREFIX + config) for label, config in (
            ("Baseline (train on HR)", "baseline_hr"), ("Baseline (train on HR & LR)", "baseline_hrlr"),
            ("Ours (single-level)", "single_level"), ("Ours (multi-level)", "multi_level"))),
    ), paper_dataset="MLR-CUHK03"),
    # The paper's "train r in {1,2,3,4}" is the standard training set: each HR image (r = 1) and its LR copy
    # at r in {2,3,4}, i.e. the full model.
    Table("table2", "Table 2: seen and unseen test rates (train r in {1,2,3,4}: HR and LR at 2, 3, 4), rank 1", (
        Row("train r in {1,2,3,4}, test r in {2,3,4}", "multi_level", "lr", _paper(42.5)),
        Row("train r in {1,2,3,4}, test r = 8 (unseen)", "multi_level", "r8", _paper(37.5)),
    ), metrics=RANK1_AND_MAP, paper_dataset="MLR-VIPeR"),
    Table("table3", "Table 3: ablations, each loss off", (
        Row("Ours", "multi_level", paper=_paper(78.9, 97.3, 98.7, 99.5, 74.5)),
        Row("Ours w/o L_cls", "no_cls", paper=_paper(70.8, 95.1, 97.7, 98.9, 68.0)),
        Row("Ours w/o L_tri", "no_tri", paper=_paper(69.1, 92.2, 96.6, 98.7, 64.1)),
        Row("Ours w/o L_rec", "no_rec", paper=_paper(67.3, 89.5, 94.5, 97.7, 64.2)),
        Row("Ours w/o L_adv", "baseline_hrlr", paper=_paper(65.9, 92.1, 97.4, 98.9, 62.3)),
    ), paper_dataset="MLR-CUHK03"),
    Table("table4", "Table 4: LR rates of the training images (HR r = 1 always), tested on r in {2,3,4}", (
        Row("LR r = 2", "rates_2", paper=_paper(70.9, 67.7, keys=RANK1_AND_MAP)),
        Row("LR r = 3", "rates_3", paper=_paper(72.3, 68.8, keys=RANK1_AND_MAP)),
        Row("LR r = 4", "rates_4", paper=_paper(77.2, 74.8, keys=RANK1_AND_MAP)),
        Row("LR r in {2,3,4}", "multi_level", paper=_paper(78.9, 75.9, keys=RANK1_AND_MAP)),
    ), metrics=RANK1_AND_MAP, paper_dataset="MLR-CUHK03"),
    Table("figure5", "Figure 5: semi-supervised, rank 1 against the labelled fraction", (
        *(Row(f"{f:.0%} labelled", f"labels_{f:.1f}") for f in (0.0, 0.2, 0.4, 0.6, 0.8)),
        Row("100% labelled", "multi_level"),
        Row("Baseline (train on HR), 100% labelled", "baseline_hr"),
        Row("Baseline (train on HR & LR), 100% labelled", "baseline_hrlr"),
    ), metrics=RANK1_AND_MAP, paper_dataset="MLR-CUHK03"),
    # Not the paper's: the weight of L_adv chosen on held-out training identities. Its rows read the validation
    # split (query set "val"); the report adds the chosen weight's test figures (tasks/grid_report.py).
    Table("adv_sweep", "Does L_adv help, and when: LR rank 1 on the validation split by the weight of L_adv", tuple(
        Row(f"w_adv = {w:g}" + (" (the HR & LR baseline)" if w == 0 else ""), sweep_config(w), "val")
        for w in ADV_SWEEP), metrics=("rank1",)),
)


# Not the paper's: settings chosen on the validation split (the runs of a choice never read the test split).
# Each candidate group names the configurations it compares; tasks/grid_report.py picks the best mean validation LR
# rank-1 of each group and says so.
CHOICE_GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    *((what, tuple((f"x{f:g}", lr_choice(base, f)) for f in sorted((*LR_FACTORS, 1.0)))) for what, base in (
        ("objective.lr (the paper's recipe)", "multi_level"),
        ("objective.lr (with the strong-baseline options)", STRONG_PREFIX + "multi_level"))),
    ("objective.adv_levels", (("sum", "multi_level"), ("mean", "adv_mean"))),
    *((what, (("as is", base), *((spelled(D_PACE[name]), choice_name(base, name)) for name in D_PACE)))
      for what, base in (("D's pace (the paper's recipe)", "multi_level"),
                         ("D's pace (with the strong-baseline options)", STRONG_PREFIX + "multi_level"))),
)
TABLES += (Table("choices", "The choice runs: validation LR rank 1 per candidate", tuple(
    Row(f"{what}: {label}", config, "val") for what, group in CHOICE_GROUPS for label, config in group),
    metrics=("rank1",)),)

FIGURE5_PAPER = {0.0: 3.3, 0.2: 66.3, 0.4: 76.1, 1.0: 78.9}  # the points the paper's text gives


def tables(keys: tuple[str, ...] | None = None) -> tuple[Table, ...]:
    if keys is None:
        return TABLES
    known = {t.key: t for t in TABLES}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ParamsError(f"unknown table(s) {unknown}: choose from {list(known)}")
    return tuple(known[k] for k in keys)


def configs_of(selected: tuple[Table, ...]) -> list[str]:
    """The distinct configurations the tables read, in grid order (each trained once per seed)."""
    wanted = {row.config for t in selected for row in t.rows}
    return [name for name in CONFIGS if name in wanted]
