"""The paper's comparisons as one grid of named run configurations (the tables that read them are in
tasks/grid/tables.py).

A configuration is a set of parameter overrides on top of params.yaml (plus, for Table 4, the
down-sampling rates of the training LR images). Tables name configurations, so a configuration shared by
several tables (the full RAIN model is Table 1's multi-level row, Table 2's "train r in {1,2,3,4}" rows,
Table 3's "Ours", Table 4's {2, 3, 4} row and Figure 5's 100% point) is trained once per seed. "w/o L_adv"
is the HR & LR baseline itself: both are Eq. 7 without the adversarial term (the paper's rows are identical
too, 65.9 / 92.1 / 97.4 / 98.9).

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

from tasks.config import OUTPUT_NEUTRAL, Params, ParamsError, param_values


@dataclass(frozen=True)
class Configuration:
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted params key -> value
    train_rates: tuple[int, ...] | None = None  # LR rates of the training images; None: protocol.train_rates
    description: str = ""
    # True: experiments.val_identities of the training identities become a validation split, scored every
    # train.val_every_epochs; the run keeps its best epoch there (the L_adv sweep chooses on it)
    validation: bool = False
    # False: a run that chooses a setting, scored on its validation split only (the test split is never read)
    test: bool = True
    scaled: Mapping[str, float] = field(default_factory=dict)  # dotted params key -> factor on params.yaml's value

    def __post_init__(self) -> None:
        if not (self.test or self.validation):
            raise ValueError(f"configuration {self.name}: scored on neither the test nor a validation split")


def _labels(fraction: float) -> Configuration:
    return Configuration(f"labels_{fraction:.1f}", {"train.label_fraction": fraction},
                     description=f"RAIN with {fraction:.0%} of the training identities labelled")


ADV_SWEEP = (0.0, 0.1, 0.3, 1.0)  # the weights of L_adv the sweep compares on the validation split


def sweep_config(w_adv: float) -> str:
    """The name of the sweep's configuration with weight `w_adv`: adv_0.3."""
    return f"adv_{w_adv:.1f}"


def _adversarial_weight(w_adv: float) -> Configuration:
    return Configuration(sweep_config(w_adv), {"objective.w_adv": w_adv}, validation=True,
                         description=f"RAIN with w_adv = {w_adv:g}, best epoch kept on the validation split"
                                     + (" (= the HR & LR baseline)" if w_adv == 0 else ""))


# reid-strong-baseline's options (Luo et al. 2019), applied alike to every configuration that names them. Its
# warm-up (10 of 120 epochs from 0.01) is one epoch from 0.1 here: the schedule steps per epoch, and a grid run
# is a few epochs long. model.retrieval_feature is chosen on the validation split (both are scored there).
STRONG: dict[str, Any] = {
    "model.bnneck": True, "model.retrieval_feature": "bnneck", "objective.label_smoothing": 0.1,
    "train.augment_flip": True, "train.augment_pad": 10, "train.augment_erase": 0.5,
    "train.warmup_epochs": 1, "train.warmup_factor": 0.1}
STRONG_PREFIX = "strong_"  # strong_<configuration>: the same with STRONG on top

TABLE1 = (
    Configuration("baseline_hr", {"objective.variant": "baseline_hr"}, description="L_cls + L_tri on HR images only"),
    Configuration("baseline_hrlr", {"objective.variant": "baseline_hrlr"},
              description="HR and LR images, Eq. 7 without L_adv (also Table 3's w/o L_adv)"),
    Configuration("single_level", {"model.levels": (5,)}, description="RAIN, one discriminator on f5"),
    Configuration("multi_level", {"model.levels": (4, 5)}, description="RAIN, discriminators on f4 and f5"),
)


def strong(cfg: Configuration) -> Configuration:
    """`cfg` with the strong-baseline options (STRONG) on top."""
    return dataclasses.replace(cfg, name=STRONG_PREFIX + cfg.name, overrides={**cfg.overrides, **STRONG},
                               description=cfg.description + ", with the strong-baseline options")


LR_FACTORS = (0.3, 3.0)  # the learning rates the choice tries beside params.yaml's (x1: the configuration itself)


def lr_choice(base: str, factor: float) -> str:
    """The configuration that tries `factor` x the rate of `base` (multi_level or strong_multi_level); x1 is `base`."""
    return base if factor == 1 else choice_name(base, f"lr_x{factor:g}")


def choice_name(base: str, candidate: str) -> str:
    """The name of the candidate `candidate` beside `base` (multi_level or strong_multi_level): strong_ kept."""
    return base.removesuffix("multi_level") + candidate


def _lr_choice(base: Configuration, factor: float) -> Configuration:
    return Configuration(lr_choice(base.name, factor), base.overrides, validation=True,
                         test=False, scaled={"objective.lr": factor},
                         description=f"{base.description}, objective.lr x {factor:g} (chooses the rate on validation)")


# D's pace against F's: at d_steps 1 and lr_d_ratio 0.5, D ended every RAIN run on the CUHK03 crops at a coin flip
# while a probe still told HR from LR features (RESULTS.md). Two ways to let D keep up with a moving F, each a
# candidate beside the configuration itself (label: the overrides it adds).
D_PACE: dict[str, dict[str, Any]] = {"d_steps3": {"objective.d_steps": 3},
                                     "lr_d_x4": {"objective.lr_d_ratio": 2.0}}


def _d_pace(base: Configuration, name: str) -> Configuration:
    settings = D_PACE[name]
    return Configuration(choice_name(base.name, name), {**base.overrides, **settings},
                         validation=True, test=False,
                         description=f"{base.description}, {spelled(settings)} (chooses D's pace on validation)")


def spelled(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in settings.items())


MULTI_LEVEL = TABLE1[-1]
CHOICES = (
    *(_lr_choice(base, f) for base in (MULTI_LEVEL, strong(MULTI_LEVEL)) for f in LR_FACTORS),
    Configuration("adv_mean", {**MULTI_LEVEL.overrides, "objective.adv_levels": "mean"}, validation=True, test=False,
                  description="RAIN multi-level with L_adv averaged over the levels (chooses objective.adv_levels)"),
    *(_d_pace(base, name) for base in (MULTI_LEVEL, strong(MULTI_LEVEL)) for name in D_PACE),
)

CONFIGS: dict[str, Configuration] = {c.name: c for c in (
    *TABLE1,
    *(strong(c) for c in TABLE1),
    *CHOICES,
    Configuration("no_cls", {"objective.w_cls": 0.0}, description="RAIN without L_cls"),
    Configuration("no_tri", {"objective.w_tri": 0.0}, description="RAIN without L_tri"),
    Configuration("no_rec", {"objective.w_rec": 0.0}, description="RAIN without L_rec"),
    Configuration("rates_2", {}, (2,), "RAIN trained with LR rate 2 only"),
    Configuration("rates_3", {}, (3,), "RAIN trained with LR rate 3 only"),
    Configuration("rates_4", {}, (4,), "RAIN trained with LR rate 4 only"),
    *(_labels(f) for f in (0.0, 0.2, 0.4, 0.6, 0.8)),
    *(_adversarial_weight(w) for w in ADV_SWEEP),
)}


def data_protocol(params: Params, name: str) -> tuple[tuple[int, ...], int]:
    """(LR rates of the training images, validation identities) of configuration `name`'s training data."""
    cfg = CONFIGS[name]
    rates = cfg.train_rates if cfg.train_rates is not None else tuple(params.protocol.train_rates)
    return rates, params.experiments.val_identities if cfg.validation else params.protocol.val_identities


def data_variants(params: Params, names: list[str] | None = None) -> list[tuple[tuple[int, ...], int]]:
    """The training data the configurations need beyond the pipeline's MLR manifest: (rates, validation
    identities) of each, synthesized by the grid_data stage."""
    pipeline = (tuple(params.protocol.train_rates), params.protocol.val_identities)
    return sorted({data_protocol(params, n) for n in (names or list(CONFIGS))} - {pipeline})


def data_key(rates: tuple[int, ...], val_identities: int) -> str:
    return "rates-" + "-".join(str(r) for r in rates) + (f"-val{val_identities}" if val_identities else "")


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
    if "train.warmup_epochs" in overrides:  # a warm-up shorter than the run (a micro grid may have 1 epoch)
        overrides["train.warmup_epochs"] = min(overrides["train.warmup_epochs"], params.experiments.epochs - 1)
    if cfg.name.startswith(STRONG_PREFIX) and params.experiments.strong_lr is not None:
        overrides["objective.lr"] = params.experiments.strong_lr  # the strong recipe's own rate
    for dotted, factor in cfg.scaled.items():
        overrides[dotted] = overrides.get(dotted, _get(params, dotted.split("."))) * factor
    if cfg.train_rates is not None:
        overrides["protocol.train_rates"] = cfg.train_rates
    if cfg.validation:
        overrides["protocol.val_identities"] = params.experiments.val_identities
    out = params
    for dotted, value in overrides.items():
        out = _replace(out, dotted.split("."), value)
    return out


def _get(obj: Any, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _replace(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    new = _replace(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: new})


def run_key(params: Params, name: str, seed: int, inputs: Mapping[str, str]) -> str:
    """What a finished run was computed from: its configured params and its input hashes. A result whose
    key differs (params.yaml, the data or the code changed) does not count as done."""
    flat = param_values(configure(params, name, seed))
    # experiments.strong_lr acts through objective.lr, which the key holds: a plain run's key does not depend on it.
    for volatile in ("experiments.seeds", "experiments.cpus_per_run", "experiments.use_gpu", "experiments.strong_lr",
                     "register.model_name", "register.alias", "evaluate.tsne_identities", "evaluate.sheet_queries",
                     "evaluate.batch_size", *OUTPUT_NEUTRAL):
        flat.pop(volatile, None)
    flat = {k: v for k, v in flat.items() if not k.startswith(("paths.", "sources.", "ray.", "serve."))}
    text = json.dumps({"config": name, "seed": seed, "params": flat, "inputs": dict(inputs)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
