"""The paper's comparisons as one grid: named run configurations and the tables that read them.

A configuration is a set of parameter overrides on top of params.yaml (plus, for Tables 2 and 4, the
down-sampling rates of the training LR images). Tables name configurations, so a configuration shared by
several tables (the full RAIN model is Table 1's multi-level row, Table 3's "Ours", Table 4's {2, 3, 4}
row and Figure 5's 100% point) is trained once per seed. "w/o L_adv" is the HR & LR baseline itself:
both are Eq. 7 without the adversarial term (the paper's rows are identical too, 65.9 / 92.1 / 97.4 / 98.9).

Seed s trains with `train.seed = s` on protocol trial `s mod protocol.trials`, so the spread over seeds
covers both the initialisation and the train/test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.config import Params, ParamsError


@dataclass(frozen=True)
class RunConfig:
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted params key -> value
    train_rates: tuple[int, ...] | None = None  # LR rates of the training images; None: protocol.train_rates
    description: str = ""


def _labels(fraction: float) -> RunConfig:
    return RunConfig(f"labels_{fraction:.1f}", {"train.label_fraction": fraction},
                     description=f"RAIN with {fraction:.0%} of the training identities labelled")


CONFIGS: dict[str, RunConfig] = {c.name: c for c in (
    RunConfig("baseline_hr", {"objective.variant": "baseline_hr"}, description="L_cls + L_tri on HR images only"),
    RunConfig("baseline_hrlr", {"objective.variant": "baseline_hrlr"},
              description="HR and LR images, Eq. 7 without L_adv (also Table 3's w/o L_adv)"),
    RunConfig("single_level", {"model.levels": (5,)}, description="RAIN, one discriminator on f5"),
    RunConfig("multi_level", {"model.levels": (4, 5)}, description="RAIN, discriminators on f4 and f5"),
    RunConfig("rates_1234", {}, (1, 2, 3, 4), "RAIN trained with LR rates {1, 2, 3, 4}"),
    RunConfig("no_cls", {"objective.w_cls": 0.0}, description="RAIN without L_cls"),
    RunConfig("no_tri", {"objective.w_tri": 0.0}, description="RAIN without L_tri"),
    RunConfig("no_rec", {"objective.w_rec": 0.0}, description="RAIN without L_rec"),
    RunConfig("rates_2", {}, (2,), "RAIN trained with LR rate 2 only"),
    RunConfig("rates_3", {}, (3,), "RAIN trained with LR rate 3 only"),
    RunConfig("rates_4", {}, (4,), "RAIN trained with LR rate 4 only"),
    *(_labels(f) for f in (0.0, 0.2, 0.4, 0.6, 0.8)),
)}


@dataclass(frozen=True)
class Row:
    label: str
    config: str
    query_set: str = "lr"  # an evaluate row: lr (MLR queries, rates {2, 3, 4}), r2.., r8 (unseen), hr
    paper: Mapping[str, float] = field(default_factory=dict)  # the paper's figures (%) for this row


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[str, ...] = ("rank1", "rank5", "rank10", "rank20", "mAP")
    paper_dataset: str = ""


def _paper(*values: float, keys: tuple[str, ...] = ("rank1", "rank5", "rank10", "rank20", "mAP")) -> dict[str, float]:
    return dict(zip(keys, values, strict=False))


TABLES: tuple[Table, ...] = (
    Table("table1", "Table 1: cross-resolution re-ID, LR queries (MLR) against the HR gallery", (
        Row("Baseline (train on HR)", "baseline_hr", paper=_paper(60.6, 89.4, 95.0, 98.4)),
        Row("Baseline (train on HR & LR)", "baseline_hrlr", paper=_paper(65.9, 92.1, 97.4, 98.9)),
        Row("Ours (single-level)", "single_level", paper=_paper(77.6, 96.2, 98.5, 99.3)),
        Row("Ours (multi-level)", "multi_level", paper=_paper(78.9, 97.3, 98.7, 99.5)),
    ), paper_dataset="MLR-CUHK03"),
    Table("table2", "Table 2: seen and unseen test rates, rank 1", (
        Row("train r in {1,2,3,4}, test r in {2,3,4}", "rates_1234", "lr", _paper(42.5)),
        Row("train r in {1,2,3,4}, test r = 8 (unseen)", "rates_1234", "r8", _paper(37.5)),
        Row("train r in {2,3,4}, test r in {2,3,4}", "multi_level", "lr"),
        Row("train r in {2,3,4}, test r = 8 (unseen)", "multi_level", "r8"),
    ), metrics=("rank1", "mAP"), paper_dataset="MLR-VIPeR"),
    Table("table3", "Table 3: ablations, each loss off", (
        Row("Ours", "multi_level", paper=_paper(78.9, 97.3, 98.7, 99.5, 74.5)),
        Row("Ours w/o L_cls", "no_cls", paper=_paper(70.8, 95.1, 97.7, 98.9, 68.0)),
        Row("Ours w/o L_tri", "no_tri", paper=_paper(69.1, 92.2, 96.6, 98.7, 64.1)),
        Row("Ours w/o L_rec", "no_rec", paper=_paper(67.3, 89.5, 94.5, 97.7, 64.2)),
        Row("Ours w/o L_adv", "baseline_hrlr", paper=_paper(65.9, 92.1, 97.4, 98.9, 62.3)),
    ), paper_dataset="MLR-CUHK03"),
    Table("table4", "Table 4: LR rates of the training images (HR r = 1 always), tested on r in {2,3,4}", (
        Row("LR r = 2", "rates_2", paper=_paper(70.9, 67.7, keys=("rank1", "mAP"))),
        Row("LR r = 3", "rates_3", paper=_paper(72.3, 68.8, keys=("rank1", "mAP"))),
        Row("LR r = 4", "rates_4", paper=_paper(77.2, 74.8, keys=("rank1", "mAP"))),
        Row("LR r in {2,3,4}", "multi_level", paper=_paper(78.9, 75.9, keys=("rank1", "mAP"))),
    ), metrics=("rank1", "mAP"), paper_dataset="MLR-CUHK03"),
    Table("figure5", "Figure 5: semi-supervised, rank 1 against the labelled fraction", (
        *(Row(f"{f:.0%} labelled", f"labels_{f:.1f}") for f in (0.0, 0.2, 0.4, 0.6, 0.8)),
        Row("100% labelled", "multi_level"),
        Row("Baseline (train on HR), 100% labelled", "baseline_hr"),
        Row("Baseline (train on HR & LR), 100% labelled", "baseline_hrlr"),
    ), metrics=("rank1", "mAP"), paper_dataset="MLR-CUHK03"),
)

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


def rate_variants(params: Params, names: list[str] | None = None) -> list[tuple[int, ...]]:
    """Training-rate sets that need their own LR images (the pipeline's protocol.train_rates has them)."""
    rates = {CONFIGS[n].train_rates for n in (names or list(CONFIGS))}
    return sorted(r for r in rates if r is not None and r != tuple(params.protocol.train_rates))


def rates_key(rates: tuple[int, ...]) -> str:
    return "rates-" + "-".join(str(r) for r in rates)


def trial_of(params: Params, seed: int) -> int:
    return seed % params.protocol.trials


def configure(params: Params, name: str, seed: int) -> Params:
    """params.yaml with configuration `name` and `seed` applied: what that grid run trains and tests."""
    if name not in CONFIGS:
        raise ParamsError(f"unknown experiment configuration {name!r}: choose from {list(CONFIGS)}")
    cfg = CONFIGS[name]
    overrides: dict[str, Any] = {
        "train.epochs": params.experiments.epochs, "train.seed": seed, "train.trials": (trial_of(params, seed),),
        **cfg.overrides}
    if cfg.train_rates is not None:
        overrides["protocol.train_rates"] = cfg.train_rates
    out = params
    for dotted, value in overrides.items():
        out = _replace(out, dotted.split("."), value)
    return out


def _replace(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    new = _replace(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: new})


def run_key(params: Params, name: str, seed: int, inputs: Mapping[str, str]) -> str:
    """What a finished run was computed from: its configured params and its input hashes. A result whose
    key differs (params.yaml, the data or the code changed) does not count as done."""
    from tasks.train import flat_params

    flat = flat_params(configure(params, name, seed))
    for volatile in ("experiments.seeds", "experiments.cpus_per_run", "experiments.use_gpu",
                     "register.model_name", "register.alias", "ray.address", "ray.max_failures",
                     "ray.keep_checkpoints", "evaluate.tsne_identities", "evaluate.sheet_queries",
                     "evaluate.batch_size", "train.checkpoint_every_epochs", "train.checkpoint_every_seconds",
                     "train.loader_workers"):
        flat.pop(volatile, None)
    flat = {k: v for k, v in flat.items() if not k.startswith(("paths.", "sources.", "ray."))}
    text = json.dumps({"config": name, "seed": seed, "params": flat, "inputs": dict(inputs)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
