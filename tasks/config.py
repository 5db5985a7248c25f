"""Typed, frozen pipeline parameters, parsed once from params.yaml.

Every section of params.yaml maps to a frozen dataclass. Parsing is strict: an unknown or mistyped
key is refused with its dotted name (and the nearest known key), a value of the wrong type is refused
with its dotted name, so a bad params.yaml fails before any stage runs. Every field's default is the value
params.yaml gives it (tests/test_config.py keeps the two equal); values are checked with rain_model's
``require``, the one validation check, which names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rain_model.config import InvalidValue, ModelConfig, ObjectiveConfig, require

PARAMS_FILE = "params.yaml"
T = TypeVar("T")
# dataset.name values: the keys of tasks/datasets ADAPTERS (tests/test_params_validation.py keeps them equal). Not
# imported from there: tasks.datasets imports this module, and every stage would then depend on every adapter.
DATASETS = ("synthetic", "viper", "cuhk03", "cuhk03-detected", "caviar", "market1501", "custom")
# The `sources` entry of a dataset whose archive is another dataset's: its adapter's `source_name` (tests/
# test_params_validation.py keeps the two equal; not imported from there, for the reason above). Any other dataset
# reads the entry of its own name.
SHARED_SOURCES = {"cuhk03-detected": "cuhk03"}
# Seeds feed numpy (no negatives) and torch.manual_seed (below 2**64); int64 holds every seed both take.
SEED_LIMIT = 2**63
MAX_SEEDS = 100  # experiments.seeds: each seed is a run of every configuration of the grid


# The most each size and count in params.yaml may be, checked at load (Params), each stated beside its key in
# params.yaml. Far above what runs on the machines this project targets (a laptop to a node of GPUs), low enough that
# a slip (an extra digit, a number pasted into the wrong key) is refused in milliseconds instead of forking hundreds of
# processes or allocating terabytes in a stage: `protocol.workers: 200` forked 201 processes for 240 images, and
# `synthetic.identities: 1e12`, `ray.cpus_per_worker: 1e20`, `train.loader_workers: 100000` were accepted. A list's
# bound holds for each entry. Seeds are bounded by SEED_LIMIT instead.
UPPER_BOUNDS: dict[str, int] = {
    "synthetic.identities": 100_000, "synthetic.test_identities": 100_000, "synthetic.cameras": 16,
    "synthetic.images_per_camera": 100, "synthetic.height": 1024, "synthetic.width": 1024,
    "protocol.train_rates": 32, "protocol.unseen_rates": 32,  # r = 32 leaves a 128-pixel person 4 pixels high
    "protocol.trials": 100, "protocol.test_identities": 100_000, "protocol.val_identities": 100_000,
    "model.base_channels": 256, "model.levels": 5, "model.decoder_channels": 1024, "model.disc_channels": 4096,
    "objective.adv_ramp_epochs": 10_000, "objective.d_steps": 100,
    "train.trials": 100, "train.height": 2048, "train.width": 2048, "train.epochs": 10_000, "train.p": 4096,
    "train.k": 256, "train.checkpoint_every_epochs": 10_000, "train.lr_decay_epochs": 10_000,
    "train.loader_workers": 64, "train.micro_batches": 1024, "train.val_every_epochs": 10_000,
    "train.augment_pad": 2048, "train.warmup_epochs": 10_000,
    "ray.num_workers": 1024, "ray.cpus_per_worker": 1024, "ray.max_failures": 1000, "ray.keep_checkpoints": 100,
    "ray.keep_runs": 100,
    "evaluate.gallery_repeats": 1000, "evaluate.batch_size": 4096, "evaluate.tsne_identities": 1000,
    "evaluate.sheet_queries": 100,
    "serve.max_pixels": 89_478_485,  # Pillow's MAX_IMAGE_PIXELS: it refuses a larger image as a decompression bomb
    "serve.max_images": 1024,
    "experiments.epochs": 10_000, "experiments.cpus_per_run": 1024, "experiments.val_identities": 100_000,
}
# Bounds that follow the machine that loads params.yaml: synthesis processes run on it.
WORKERS_PER_CORE = 4


def upper_bound(key: str) -> tuple[int, str] | None:
    """(the most `key` may be, why) or None for a key without one."""
    if key == "protocol.workers":
        cores = os.cpu_count() or 1
        return WORKERS_PER_CORE * cores, f"{WORKERS_PER_CORE} per core of this machine, os.cpu_count() = {cores}"
    if key in UPPER_BOUNDS:
        return UPPER_BOUNDS[key], ""
    return None


class ParamsError(ValueError):
    """params.yaml does not describe a valid pipeline; the message names the key."""


class InvalidParam(ParamsError, InvalidValue):
    """A params.yaml value out of range: rain_model's check (``require``), worded with the dotted key."""

    template = "params.yaml: {key} = {value!r} is invalid: {why}"


# The `paths` whose folders hold a DVC output per dataset (<root>/<dataset>/, or files named for it): two sharing one
# folder would make DVC refuse overlapping outputs, or one stage's clean-up delete another's output.
OUTPUT_ROOTS = ("raw", "lr", "store", "models", "reports", "experiments")


@dataclass(frozen=True)
class Paths:
    raw: str = "data/raw"
    downloads: str = "data/downloads"
    manifests: str = "data/manifests"
    lr: str = "data/lr"
    store: str = "data/store"
    models: str = "models"
    reports: str = "reports"
    runs: str = "runs"
    experiments: str = "experiments"
    logs: str = "logs"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) != "", f"paths.{f.name}", "", "a folder (an empty path would template "
                     "dvc.yaml's outputs to /<dataset>)")
        # As written (`./models/` is `models`); load_params checks them again resolved (check_folders).
        self._check_folders(lambda spelt: Path(os.path.normpath(spelt)))

    def check_folders(self, project: Path) -> None:
        """Every folder resolved as the stages will reach it (relative to `project`, symlinks followed, `..`,
        `./` and trailing slashes gone), so another spelling of a folder cannot pass for another folder."""
        self._check_folders(lambda spelt: Path(os.path.realpath(project / spelt)))

    def _check_folders(self, where: Callable[[str], Path]) -> None:
        """An output root may neither be another one nor lie inside one (a stage empties `<root>/<dataset>` before
        it runs: with `paths.lr` spelt as the absolute path of `paths.raw`, synthesize emptied the raw data), and no
        other folder (downloads, manifests, runs, logs) may be or lie in an output root."""
        folder = {f.name: where(getattr(self, f.name)) for f in dataclasses.fields(self)}
        names = [*OUTPUT_ROOTS, *(f.name for f in dataclasses.fields(self) if f.name not in OUTPUT_ROOTS)]
        for i, name in enumerate(names):
            for root in OUTPUT_ROOTS[:min(i, len(OUTPUT_ROOTS))]:  # each pair once, the later one named
                if folder[name] == folder[root]:
                    self._clash(name, root, folder[name], "the same folder as")
                if folder[root] in folder[name].parents:
                    self._clash(name, root, folder[name], "inside")
                if name in OUTPUT_ROOTS and folder[name] in folder[root].parents:
                    self._clash(root, name, folder[root], "inside")

    def _clash(self, name: str, other: str, resolved: Path, relation: str) -> None:
        spelt = getattr(self, name)
        shown = "" if str(resolved) == os.path.normpath(spelt) else f", resolved to {resolved}"
        raise InvalidParam(f"paths.{name}", spelt, f"expected a folder of its own: it is {relation} paths.{other} = "
                                                   f"{getattr(self, other)!r}{shown}")


@dataclass(frozen=True)
class DatasetChoice:
    name: str = "synthetic"

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "dataset.name", self.name, f"one of {', '.join(DATASETS)}")


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded procedural pedestrian dataset (tasks/datasets/synthetic.py)."""

    seed: int = 0
    identities: int = 400
    test_identities: int = 300  # its split: identities kept for testing (0: half); the rest train
    cameras: int = 2
    images_per_camera: int = 2
    height: int = 128
    width: int = 64

    def __post_init__(self) -> None:
        _seed("synthetic.seed", self.seed)
        _require(self.identities >= 4, "synthetic.identities", self.identities, "at least 4")
        _require(0 <= self.test_identities < self.identities, "synthetic.test_identities", self.test_identities,
                 f"between 0 (half) and synthetic.identities - 1 ({self.identities - 1})")
        _require(self.cameras >= 2, "synthetic.cameras", self.cameras, "at least 2")
        _require(self.images_per_camera >= 1, "synthetic.images_per_camera", self.images_per_camera, ">= 1")
        _require(self.height % 32 == 0 and self.height >= 64, "synthetic.height", self.height,
                 "a multiple of 32, at least 64")
        _require(self.width % 32 == 0 and self.width >= 32, "synthetic.width", self.width,
                 "a multiple of 32, at least 32")


@dataclass(frozen=True)
class SourceConfig:
    """Where a dataset archive comes from. An empty url means it cannot be downloaded (sign-up)."""

    url: str = ""
    md5: str = ""
    filename: str = ""

    def __post_init__(self) -> None:
        # rain_model's InvalidValue, not InvalidParam: parse() prefixes the key with the entry's sources.<name>.
        require(self.md5 == "" or re.fullmatch(r"[0-9a-f]{32}", self.md5) is not None, "md5", self.md5,
                "expected 32 lower-case hex digits, or empty (the archive cannot be verified)")
        require(self.filename == "" or (Path(self.filename).name == self.filename and self.filename not in (".", "..")),
                "filename", self.filename, "expected a file name without folders (it is put in paths.downloads)")


@dataclass(frozen=True)
class ProtocolConfig:
    """The MLR protocol (DESIGN.md, Protocol): one camera of each pair is down-sampled."""

    seed: int = 0
    train_rates: tuple[int, ...] = (2, 3, 4)
    unseen_rates: tuple[int, ...] = (8,)
    trials: int = 10
    # Test identities per trial: an int is a count, 0 means half of the identities (VIPeR, CAVIAR).
    test_identities: int = 0  # 0: the dataset adapter's paper split (tasks/datasets), or half
    # Validation identities per trial, taken from the training identities (disjoint from train and test): their
    # view-1 images at the MLR rates are queries against their view-0 images, to choose an epoch or a setting.
    val_identities: int = 0  # 0: none
    workers: int = 0  # synthesis processes; 0 = all cores

    def __post_init__(self) -> None:
        _seed("protocol.seed", self.seed)
        _require(len(self.train_rates) > 0 and all(r >= 1 for r in self.train_rates)
                 and len(set(self.train_rates)) == len(self.train_rates),
                 "protocol.train_rates", self.train_rates, "one or more distinct rates >= 1")
        # Each unseen rate is a query set of its own: a repeated one would be evaluated and reported twice.
        _require(all(r >= 2 for r in self.unseen_rates) and len(set(self.unseen_rates)) == len(self.unseen_rates),
                 "protocol.unseen_rates", self.unseen_rates, "distinct rates >= 2 (or none)")
        _require(self.trials >= 1, "protocol.trials", self.trials, ">= 1")
        _require(self.test_identities >= 0, "protocol.test_identities", self.test_identities, ">= 0")
        _require(self.val_identities >= 0, "protocol.val_identities", self.val_identities, ">= 0 (0: none)")
        _require(self.workers >= 0, "protocol.workers", self.workers, ">= 0 (0: all cores)")


# Train settings that change how training goes (how often it saves, how it loads), never what it produces:
# out of the train stage's DVC params and of every grid run's key, so changing one retrains nothing.
OUTPUT_NEUTRAL = ("train.checkpoint_every_epochs", "train.checkpoint_every_seconds", "train.loader_workers")


@dataclass(frozen=True)
class TrainConfig:
    trials: tuple[int, ...] = (0,)
    height: int = 128
    width: int = 64
    epochs: int = 13
    p: int = 8
    k: int = 4
    seed: int = 0
    label_fraction: float = 1.0
    checkpoint_every_epochs: int = 0  # also checkpoint every N epochs; 0: by time only
    checkpoint_every_seconds: float = 600.0  # checkpoint when this long has passed since the last one
    lr_decay_epochs: tuple[int, ...] = (8, 11)  # multiply both learning rates by lr_decay at these epochs
    lr_decay: float = 0.1
    loader_workers: int = 0  # DataLoader processes per Ray worker (0: load in the training process)
    micro_batches: int = 1  # split each worker's batch, BN per part, gradients averaged (see objective.train_step)
    val_every_epochs: int = 1  # with protocol.val_identities: score the validation split every N epochs (and the
    # last); the weights kept are the best epoch's on it
    # Strong-baseline options (reid-strong-baseline), all off by default: rain_model/augment.py draws each one once
    # per HR/LR pair, so both copies of an image get the same flip, crop and erased rectangle.
    augment_flip: bool = False  # mirror each training pair left-right with probability 1/2
    augment_pad: int = 0  # pad each training pair with this many zero pixels, crop back at a random offset; 0: off
    augment_erase: float = 0.0  # probability of random erasing per training pair; 0: off
    warmup_epochs: int = 0  # learning rates (F/G/C and D) rise linearly from warmup_factor to 1 over these epochs
    warmup_factor: float = 0.01  # the first epoch's share of the learning rates with warmup_epochs > 0

    def __post_init__(self) -> None:
        _require(len(self.trials) > 0 and min(self.trials) >= 0 and len(set(self.trials)) == len(self.trials),
                 "train.trials", self.trials, "one or more distinct protocol trials >= 0")
        _require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        # P identities x K images: the triplet loss needs a positive (K >= 2) and a negative (P >= 2) in each batch.
        _require(self.p >= 2, "train.p", self.p, ">= 2")
        _require(self.k >= 2, "train.k", self.k, ">= 2")
        _seed("train.seed", self.seed)
        _require(0.0 <= self.label_fraction <= 1.0, "train.label_fraction", self.label_fraction, "in [0, 1]")
        # The schedule steps after each epoch, so a milestone < 1 never takes effect. One >= epochs is not refused:
        # the grid trains the same settings for experiments.epochs, which may be longer.
        _require(all(e >= 1 for e in self.lr_decay_epochs)
                 and list(self.lr_decay_epochs) == sorted(set(self.lr_decay_epochs)),
                 "train.lr_decay_epochs", self.lr_decay_epochs, "increasing epochs >= 1 (or none)")
        _require(math.isfinite(self.lr_decay) and self.lr_decay > 0, "train.lr_decay", self.lr_decay, "> 0")
        _require(self.checkpoint_every_epochs >= 0, "train.checkpoint_every_epochs", self.checkpoint_every_epochs,
                 ">= 0")
        _require(self.checkpoint_every_seconds > 0, "train.checkpoint_every_seconds", self.checkpoint_every_seconds,
                 "> 0")
        _require(self.loader_workers >= 0, "train.loader_workers", self.loader_workers, ">= 0")
        _require(self.val_every_epochs >= 1, "train.val_every_epochs", self.val_every_epochs, ">= 1")
        _require(self.micro_batches >= 1 and (self.p * self.k) % self.micro_batches == 0, "train.micro_batches",
                 self.micro_batches, "a divisor of P x K")
        # F down-samples by 32 and G up-samples f5 back by x2 stages to the HR size it is compared with (Eq. 2);
        # 32 (f5 of 1 x 1) is the smallest size a whole training step and the embedding run at (measured).
        for name in ("height", "width"):
            _require(getattr(self, name) >= 32 and getattr(self, name) % 32 == 0, f"train.{name}",
                     getattr(self, name), "a multiple of 32, at least 32")
        _require(isinstance(self.augment_flip, bool), "train.augment_flip", self.augment_flip, "true or false")
        _require(0 <= self.augment_pad < min(self.height, self.width), "train.augment_pad", self.augment_pad,
                 f"in [0, {min(self.height, self.width)}) (0: off; below the input size, train.height x train.width)")
        _require(0.0 <= self.augment_erase <= 1.0, "train.augment_erase", self.augment_erase, "in [0, 1] (0: off)")
        # The schedule steps after each epoch: a warm-up as long as training would never reach the full rate.
        _require(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs,
                 f"in [0, train.epochs = {self.epochs}) (0: no warm-up)")
        _require(0.0 < self.warmup_factor <= 1.0, "train.warmup_factor", self.warmup_factor, "in (0, 1]")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local cluster
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    max_failures: int = 1
    keep_checkpoints: int = 2
    keep_runs: int = 2  # interrupted Ray runs kept under paths.runs for resuming (the current one included)

    def __post_init__(self) -> None:
        _require(self.address != "", "ray.address", self.address, "null (RAY_ADDRESS, else a local cluster) or an "
                 "address")
        _require(self.num_workers >= 1, "ray.num_workers", self.num_workers, ">= 1")
        _require(self.cpus_per_worker >= 1, "ray.cpus_per_worker", self.cpus_per_worker, ">= 1")
        _require(self.max_failures >= 0, "ray.max_failures", self.max_failures, ">= 0 (0: a lost worker fails the run)")
        _require(self.keep_checkpoints >= 1, "ray.keep_checkpoints", self.keep_checkpoints,
                 ">= 1 (the last checkpoint holds the final weights)")
        _require(self.keep_runs >= 1, "ray.keep_runs", self.keep_runs, ">= 1 (the current run)")


@dataclass(frozen=True)
class EvaluateConfig:
    distance: str = "euclidean"  # euclidean | cosine
    flip: bool = False
    gallery_repeats: int = 10
    batch_size: int = 64
    tsne_identities: int = 35
    sheet_queries: int = 6

    def __post_init__(self) -> None:
        _require(self.distance in ("euclidean", "cosine"), "evaluate.distance", self.distance,
                 "euclidean or cosine")
        _require(self.gallery_repeats >= 1, "evaluate.gallery_repeats", self.gallery_repeats, ">= 1")
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, ">= 1")
        # The t-SNE pictures are outputs of the evaluate stage (no "off"); one identity would colour nothing apart.
        _require(self.tsne_identities >= 2, "evaluate.tsne_identities", self.tsne_identities, ">= 2")
        _require(self.sheet_queries >= 1, "evaluate.sheet_queries", self.sheet_queries,
                 ">= 1 (ranked_gallery.png is an output of the evaluate stage)")


@dataclass(frozen=True)
class ExperimentsConfig:
    """The paper's comparison grid (tasks/grid/configs.py): which seeds, how long each run trains, what each run
    asks of the Ray cluster (which then decides how many run at once)."""

    seeds: tuple[int, ...] = (0, 1, 2)  # seed s: train.seed = s on protocol trial s mod protocol.trials
    epochs: int = 13  # every grid run's training length (train.epochs is the pipeline's)
    cpus_per_run: int = 1  # CPUs Ray reserves for each run, and its threads
    use_gpu: bool = False  # true: each run asks Ray for one GPU
    val_identities: int = 20  # the L_adv sweep's validation split (protocol.val_identities of its runs)
    strong_lr: float | None = None  # objective.lr of the strong_* configurations; None: objective.lr's

    def __post_init__(self) -> None:
        _require(0 < len(self.seeds) <= MAX_SEEDS and len(set(self.seeds)) == len(self.seeds)
                 and all(0 <= s < SEED_LIMIT for s in self.seeds),
                 "experiments.seeds", self.seeds, f"one to {MAX_SEEDS} distinct seeds in [0, 2**63)")
        _require(self.epochs >= 1, "experiments.epochs", self.epochs, ">= 1")
        _require(self.cpus_per_run >= 1, "experiments.cpus_per_run", self.cpus_per_run, ">= 1")
        _require(self.val_identities >= 1, "experiments.val_identities", self.val_identities, ">= 1")
        _require(self.strong_lr is None or (math.isfinite(self.strong_lr) and self.strong_lr > 0),
                 "experiments.strong_lr", self.strong_lr, "> 0 (or null: objective.lr's)")


# The aliases only `rain promote` moves (tasks/registry/promote.py imports them from here, so that tasks/config.py
# stays free of MLflow): its gate, locks and promotion tags are what make such an alias mean "beat the last one".
CHAMPION = "champion"
PROMOTED_ALIASES = (CHAMPION,)


def is_promoted_alias(alias: str) -> bool:
    # Without case: a registry on MySQL (case-insensitive collation) would take `Champion` for `champion`.
    return alias.lower() in {a.lower() for a in PROMOTED_ALIASES}


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "rain-reid"
    alias: str = "candidate"
    # The exported ONNX network must give v within this of PyTorch's (max abs, fp32) on an example batch, or the
    # stage fails before anything is logged: a version never carries an ONNX model that ranks differently.
    onnx_atol: float = 1e-4

    def __post_init__(self) -> None:
        _require(bool(self.model_name.strip()) and "/" not in self.model_name, "register.model_name",
                 self.model_name, "a non-empty name without '/'")
        # MLflow's alias rule: letters, digits, '_' and '-'; `latest` and `v<N>` name versions already.
        _require(re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) is not None and self.alias.lower() != "latest"
                 and re.fullmatch(r"[vV]\d+", self.alias) is None, "register.alias", self.alias,
                 "letters, digits, '_' or '-', and not `latest` or v<number>")
        _require(not is_promoted_alias(self.alias), "register.alias", self.alias,
                 f"an alias other than {', '.join(PROMOTED_ALIASES)}: only `rain promote` moves that one, "
                 f"through its gate")
        _require(0 < self.onnx_atol <= 1e-2, "register.onnx_atol", self.onnx_atol,
                 "> 0 and at most 0.01 (embeddings are unit-norm: more would let the ONNX model rank differently)")


@dataclass(frozen=True)
class ServeConfig:
    """What a served model accepts per request (tasks/registry/pyfunc_model.py). Written into the model's
    settings at register, so the limits hold wherever the registered model is served or loaded."""

    max_pixels: int = 2_097_152  # per image, width x height, read from the header before any pixel is decoded
    max_images: int = 32  # per request

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, "serve.max_pixels", self.max_pixels, "> 0")
        _require(self.max_images > 0, "serve.max_images", self.max_images, "> 0")


@dataclass(frozen=True)
class Params:
    paths: Paths = field(default_factory=Paths)
    dataset: DatasetChoice = field(default_factory=DatasetChoice)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)

    def __post_init__(self) -> None:
        for key, value in param_values(self).items():
            bound = upper_bound(key)
            if bound is not None:
                limit, why = bound
                _require(all(v <= limit for v in (value if isinstance(value, tuple) else (value,))), key, value,
                         f"at most {limit}{' each' if isinstance(value, tuple) else ''}" + (f" ({why})" if why else ""))
        # Checks across sections: each of these would otherwise fail only once training has started.
        trials = self.protocol.trials
        _require(all(t < trials for t in self.train.trials), "train.trials", self.train.trials,
                 f"trials of the protocol: 0..{trials - 1} (protocol.trials = {trials})")
        workers = self.ray.num_workers
        _require(self.train.p % workers == 0, "train.p", self.train.p,
                 f"a multiple of ray.num_workers = {workers} (each worker takes P / workers identities of a batch)")
        worker_batch = self.train.p // workers * self.train.k
        _require(worker_batch % self.train.micro_batches == 0, "train.micro_batches", self.train.micro_batches,
                 f"a divisor of each worker's batch, P / ray.num_workers x K = {worker_batch}")

    # Derived paths: written here once so every stage and dvc.yaml agree.
    def downloads_dir(self) -> Path:
        """Archives as downloaded. Not inside the raw folder: the download stage empties that before
        each run, and an archive a user had to fetch by hand (sign-up datasets) must survive it."""
        return Path(self.paths.downloads)

    def raw_dir(self) -> Path:
        return Path(self.paths.raw) / self.dataset.name

    def manifest_path(self) -> Path:
        return Path(self.paths.manifests) / f"{self.dataset.name}.parquet"

    def quarantine_path(self) -> Path:
        return Path(self.paths.manifests) / f"{self.dataset.name}-quarantine.parquet"

    def fingerprint_path(self) -> Path:
        """The content of what the download stage reads from outside the project (tasks/fingerprint.py)."""
        return Path(self.paths.manifests) / f"{self.dataset.name}-fingerprint.json"

    def pretrained_fingerprint_path(self) -> Path:
        """The content of model.pretrained_path, a dep of the train stage (tasks/fingerprint.py)."""
        return Path(self.paths.manifests) / f"{self.dataset.name}-pretrained.json"

    def mlr_manifest_path(self) -> Path:
        return Path(self.paths.manifests) / f"{self.dataset.name}-mlr.parquet"

    def lr_dir(self) -> Path:
        return Path(self.paths.lr) / self.dataset.name

    def store_dir(self) -> Path:
        """The decoded-image store of the MLR manifest (tasks/images/store.py)."""
        return Path(self.paths.store) / self.dataset.name

    def model_dir(self) -> Path:
        return Path(self.paths.models) / self.dataset.name

    def report_dir(self) -> Path:
        return Path(self.paths.reports) / self.dataset.name

    def experiments_dir(self) -> Path:
        """The grid's runs (runs/<config>/seed-<s>/), its training-rate data variants and its tables."""
        return Path(self.paths.experiments) / self.dataset.name

    def source_name(self) -> str:
        """The `sources` entry the dataset in use downloads from (it may have none: synthetic)."""
        return SHARED_SOURCES.get(self.dataset.name, self.dataset.name)


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    require(ok, key, value, f"expected {expected}", InvalidParam)


def _seed(key: str, value: int) -> None:
    _require(0 <= value < SEED_LIMIT, key, value, "a seed in [0, 2**63)")


def parse(cls: type[T], data: object, where: str) -> T:
    """Build dataclass `cls` from a YAML mapping, refusing unknown keys and wrong types by dotted name."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"params.yaml: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {_dotted(where, near[0])!r}?)" if near else ""
            raise ParamsError(f"params.yaml: unknown key {_dotted(where, str(key))!r}{hint}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], data[name], _dotted(where, name)) for name in fields if name in data}
    try:
        return cls(**values)
    except ParamsError:
        raise
    except InvalidValue as exc:  # a rain_model config's check: name the field by its dotted key
        raise InvalidParam(_dotted(where, exc.key), exc.value, exc.why) from exc
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: {where}: {exc}") from exc


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: object, key: str) -> object:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse(typing.cast(type, hint), value, key)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"params.yaml: {key} = {value!r} must be a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ParamsError(f"params.yaml: {key} must be a mapping")
        return {str(k): _convert(args[1], v, _dotted(key, str(k))) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not
                                                 (hint is int and isinstance(value, bool))):
        raise ParamsError(f"params.yaml: {key} = {value!r} must be of type {hint.__name__}")
    return value


# What params.yaml may be before YAML builds anything from it (the repository's is ~15 KB and nests 3 levels): a
# bigger, deeper or aliased file is refused in milliseconds. A "billion laughs" file (aliases of aliases) expands to
# gigabytes in any YAML loader (`dvc status` held 3.4 GB after 120 s), a 3,000-deep list exhausts the recursion of
# PyYAML's composer; params.yaml needs neither (write a repeated value out).
PARAMS_MAX_BYTES = 1 << 20
PARAMS_MAX_DEPTH = 16


def read_params_text(path: Path) -> str:
    """The text of params.yaml, checked before any YAML is built from it: at most PARAMS_MAX_BYTES, UTF-8, YAML
    whose collections nest at most PARAMS_MAX_DEPTH deep, without aliases. Raises ParamsError, one line naming the
    file and where in it."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(PARAMS_MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: not found (run from the project folder)") from exc
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    if len(raw) > PARAMS_MAX_BYTES:
        raise ParamsError(f"{path}: larger than {PARAMS_MAX_BYTES} bytes, the most params.yaml may be (the "
                          f"repository's is ~15 KB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 (params.yaml is UTF-8 "
                          f"text)") from exc
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is built yet
            if isinstance(event, yaml.AliasEvent):
                raise ParamsError(f"{path}: line {_line(event)}: alias *{event.anchor}: params.yaml "
                                  f"takes no aliases (write the value out)")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > PARAMS_MAX_DEPTH:
                    raise ParamsError(f"{path}: line {_line(event)}: nested deeper than "
                                      f"{PARAMS_MAX_DEPTH} levels (params.yaml nests 3)")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    return text


def _line(event: yaml.Event) -> str:
    return "?" if event.start_mark is None else str(event.start_mark.line + 1)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml. Raises ParamsError naming the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_params_text(path))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    params = parse(Params, data, "")  # first: a misspelt key is reported with its suggestion, not as missing
    params.paths.check_folders(path.resolve().parent)  # the stages run in the folder of params.yaml
    missing = missing_keys(Params, data, "")
    if missing:
        sections = [k for k in missing if "." not in k]
        keys = [k for k in missing if "." in k]
        parts = ([f"missing section(s) {', '.join(sections)}"] if sections else []) + \
                ([f"missing key(s) {', '.join(keys)}"] if keys else [])
        raise ParamsError(f"{path}: {'; '.join(parts)} (every parameter is written in params.yaml: the repository's "
                          f"params.yaml has each one with its default)")
    return params


def missing_keys(cls: type, data: object, where: str) -> list[str]:
    """The dotted keys of dataclass `cls` that the YAML mapping `data` lacks; a missing section is named once.

    params.yaml holds every parameter: dvc.yaml templates its paths and DVC tracks the values it reads there, so a
    value left to the code's default would be neither templated nor tracked (changing the default in code would
    re-run nothing). The entries of a mapping such as `sources` are the user's; only the mapping must be there.
    """
    data = data if isinstance(data, Mapping) else {}
    hints = typing.get_type_hints(cls)
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        key = _dotted(where, f.name)
        if f.name not in data:
            missing.append(key)
        elif dataclasses.is_dataclass(hints[f.name]):
            missing += missing_keys(hints[f.name], data[f.name], key)
    return missing


def param_values(params: Params) -> dict[str, Any]:
    """Every parameter by its dotted key (as DVC names them), with its typed value: what run keys and
    `params_values_sha256` hash (as JSON, where None, a string "none" and a list stay apart)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = value

    walk("", params)
    return out


def flat_params(params: Params) -> dict[str, str]:
    """Params as a person reads them in MLflow (a run's params): dotted keys, lists in JSON as params.yaml
    writes them (`[2, 3, 4]`, `[]`), booleans as `true`/`false`, None as `none`, and of `sources` only the
    entry of the dataset in use (the others' URLs and md5s say nothing about this run)."""
    used = f"sources.{params.source_name()}."
    return {key: _readable(value) for key, value in param_values(params).items()
            if not key.startswith("sources.") or key.startswith(used)}


def _readable(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool | tuple | list):
        return json.dumps(value)
    return str(value)


# How the validation split is scored: with protocol.val_identities these decide which epoch's weights are kept.
VALIDATION_SCORING = ("evaluate.distance", "evaluate.flip", "evaluate.gallery_repeats")


def train_stage_params() -> tuple[str, ...]:
    """What the train stage's weights depend on, as dvc.yaml lists its params (tests/test_stage_deps.py):
    the network, the objective, every train setting but the output-neutral ones, how the validation split is
    scored, and the DDP layout."""
    train = (f"train.{f.name}" for f in dataclasses.fields(TrainConfig))
    return ("model", "objective", *(k for k in train if k not in OUTPUT_NEUTRAL), *VALIDATION_SCORING,
            "ray.num_workers", "ray.use_gpu")


def params_values_sha256(params: Params) -> str:
    """sha256 of every parameter value (`param_values` as canonical JSON): equal for two params.yaml files that
    differ only in comments, layout or key order, unlike the sha256 of the file."""
    return hashlib.sha256(json.dumps(param_values(params), sort_keys=True).encode()).hexdigest()
