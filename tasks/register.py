"""Stage `register`: the trained model as an MLflow model version of `rain-reid`, alias `candidate`.

The model is the pyfunc of tasks/registry/pyfunc_model.py (images in, unit-norm embeddings out), logged from
code with safetensors weights: nothing in it is pickled. The version carries its lineage as tags, so
a person browsing the registry can tell where it came from and how good it is, and `rain promote` can
tell whether two versions were measured the same way:

- where it came from: `git_commit` (with `git_dirty`: uncommitted changes to tracked files),
  `mlflow_run_id`, `weights_sha256`, `settings_sha256` (the model's settings, `model_settings`),
  `mlr_manifest_sha256`, `params_yaml_sha256`, `pretrained_sha256` (the file `model.pretrained_path` that
  initialised training, or `none`), and from dvc.lock (when the stage runs
  under DVC) the hashes DVC recorded: `dvc_data_md5` (the raw dataset folder), `dvc_mlr_manifest_md5`,
  `dvc_models_md5` and `dvc_params_sha256`;
- how it was measured: `dataset`, `protocol` (MLR split and evaluation settings as one string) and
  `eval_set` (sha256 of the HR and MLR manifests: the exact images and splits it was scored on);
- how good it is: `lr_rank1`, `lr_rank1_std`, `lr_rank5`, `lr_rank10`, `lr_rank20`, `lr_mAP` (the LR queries'
  figures in percent, as tag `figures_unit` says: metrics.json's `lr` row, the training run's `eval/lr_*` metrics).
  Versions registered before these names (`rank1`, ..., `mAP`) or in fractions (no `figures_unit`) are still read
  by `rain promote` (tasks/registry/promote.py).

The lineage hashes, each under one name wherever it appears (the training run carries the first and last):

- `mlr_manifest_sha256`: sha256 of the MLR manifest file (data/manifests/<dataset>-mlr.parquet), the data the
  model was trained and scored on;
- `params_yaml_sha256`: sha256 of the params.yaml file as it was on disk, comments and layout included;
- `dvc_params_sha256`: sha256 of the parameter values dvc.lock recorded for the upstream stages (the keys each
  stage lists in dvc.yaml, canonical JSON): what DVC says the model's stages ran with;
- `params_values_sha256` (the training run's tag): sha256 of every parameter value the run trained with
  (tasks/config.py `param_values`, canonical JSON, initial weights resolved to their file), all sections, so
  it differs from `dvc_params_sha256`, and it ignores comments and layout, so it differs from
  `params_yaml_sha256`.

The logged model (MLflow 3's LoggedModel, the version's source) shows the training run's final figures as its
metrics (`model_figures`), not those of the run's first step.

The model carries its embedding network as ONNX too (tasks/registry/onnx_model.py): exported, checked against
PyTorch (max abs difference of v within `register.onnx_atol` on example batches) and saved in MLflow's onnx flavor
with its signature as the pyfunc's artifact `onnx` (``artifacts/onnx/model.onnx`` of the version's model), so
`rain search` and `rain serve-model` can run it with `--runtime onnx`. The export comes before anything is logged: a
failed export or parity check fails the stage with one line and leaves the registry and the training run as they
were. The version's tags `onnx_max_abs_diff` and `onnx_opset` say how close it came and which opset it uses.

The model is self-contained: its settings (`model_settings`) never name a file outside it, so it loads on
any machine, and they carry the `serve` request limits, which it enforces wherever it is served.

Idempotent: a run that finds a version already registered for the same weights (`weights_sha256`) and settings
(`settings_sha256`: sha256 of `model_settings`, the model's config artifact) from the same MLflow run reuses it (its
tags brought up to date, the alias set) instead of registering the model again, so a register stage killed after
MLflow created the version, then run again, leaves one version. Other settings (serve limits, flip) with the same
weights are another model: a new version.

Writes reports/<dataset>/registration.json.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import re
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from rain_model.config import ModelConfig
from rain_model.metrics import METRIC_KEYS
from tasks.config import PROMOTED_ALIASES, Params, is_promoted_alias, load_params
from tasks.infra.logs import setup_logging
from tasks.infra.tracking import (
    CMC,
    EVAL,
    EVAL_STD,
    FIGURES_UNIT,
    HEADLINE_ROW,
    NOTE_TAG,
    PERCENT,
    figure_name,
    file_hash,
    git_commit,
    log_metrics,
    shown,
    tracking_uri,
)

log = logging.getLogger(__name__)

MODEL_DESCRIPTION = (
    "RAIN (AAAI 2019) cross-resolution person re-ID: maps a person crop of any resolution to a unit-length "
    "embedding; nearer embeddings are more likely the same person. Input: a table with a column `image` of "
    "encoded images as base64 text; output: one embedding per row. Versions come from `dvc repro` / `rain run` "
    "with alias `candidate`; only `rain promote` (its gate) moves `champion`.")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "safetensors", "pyyaml",
                "pyarrow", "onnxruntime")
# Stages whose parameters shaped the model and its figures (register's own do not).
UPSTREAM_STAGES = ("download", "manifest", "synthesize", "decode", "train", "evaluate")
# Run metrics whose latest value is no figure of the model: a CMC curve's last point is its rank 20, and system/ is
# MLflow's record of the machine that trained it.
NOT_MODEL_FIGURES = (CMC, "system/")
# The figures a version is tagged with (figure_name(HEADLINE_ROW, ...)): the LR queries' CMC and mAP, and the
# spread of its rank-1 (`rain promote --list` shows rank-1 ± std).
VERSION_FIGURES = (*METRIC_KEYS, "rank1_std")
ONNX_ARTIFACT = "onnx"  # the pyfunc's artifact holding the ONNX export: artifacts/onnx/ in the logged model
ONNX_TAGS = ("onnx_max_abs_diff", "onnx_opset")


def figure_tags(lr: dict[str, Any]) -> dict[str, str]:
    """The version's figure tags (VERSION_FIGURES of the headline row of metrics.json, fractions) in percent, and the
    tag saying so."""
    tags = {(tag := figure_name(HEADLINE_ROW, k)): f"{shown(tag, lr[k]):.4f}" for k in VERSION_FIGURES}
    return tags | {FIGURES_UNIT: PERCENT}


def _example_image(params: Params) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (params.train.width, params.train.height), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def git_dirty() -> str:
    """"true" when tracked files differ from the commit: then `git_commit` alone does not pin the code."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "true" if out.stdout.strip() else "false"


def protocol_tag(params: Params) -> str:
    """The measurement protocol as one canonical string: two versions are comparable only if equal."""
    p, e = params.protocol, params.evaluate
    return (f"MLR train_rates={list(p.train_rates)} unseen={list(p.unseen_rates)} "
            f"test_identities={p.test_identities} trials={p.trials} seed={p.seed}; "
            f"evaluated trials={list(params.train.trials)} gallery_draws={e.gallery_repeats} "
            f"distance={e.distance}")


def eval_set_hash(manifest_path: Path, mlr_path: Path) -> str:
    """sha256 over the HR manifest (every image's content hash) and the MLR manifest (splits, rates)."""
    digest = hashlib.sha256()
    for path in (manifest_path, mlr_path):
        digest.update(file_hash(path).encode())
    return digest.hexdigest()


def dvc_lineage(lock_file: Path, params: Params) -> dict[str, str]:
    """Hashes DVC recorded for the data, manifest, weights and params this model came from.

    A file hash in dvc.lock is checked against the file on disk: a lock older than the file (the stage
    was run by hand after a change) is tagged `stale:<md5>` instead of passing for the truth.
    """
    keys = ("dvc_data_md5", "dvc_mlr_manifest_md5", "dvc_models_md5", "dvc_params_sha256")
    if not lock_file.exists():
        return dict.fromkeys(keys, "none")
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})

    def out_md5(stage: str, path: Path) -> str:
        for out in stages.get(stage, {}).get("outs", []):
            if Path(out["path"]) == path:
                return str(out.get("md5", "none"))
        return "none"

    mlr = params.mlr_manifest_path()
    mlr_md5 = out_md5("synthesize", mlr)
    if mlr_md5 != "none" and (lock_file.parent / mlr).exists():
        on_disk = hashlib.md5((lock_file.parent / mlr).read_bytes(), usedforsecurity=False).hexdigest()
        mlr_md5 = mlr_md5 if on_disk == mlr_md5 else f"stale:{mlr_md5}"
    recorded = {s: stages[s].get("params", {}) for s in UPSTREAM_STAGES if s in stages}
    return {
        "dvc_data_md5": out_md5("download", params.raw_dir()),
        "dvc_mlr_manifest_md5": mlr_md5,
        "dvc_models_md5": out_md5("train", params.model_dir()),
        "dvc_params_sha256": hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()
        if recorded else "none",
    }


def pretrained_provenance(model: ModelConfig) -> dict[str, str | None] | None:
    """Which file initialised training (name and sha256; None: trained from scratch). Provenance only: the
    registered weights hold every parameter, so the file is never read again."""
    from tasks.training.weights import imagenet_file

    if model.pretrained == "imagenet":  # torchvision's file, as the train stage fetched it into the torch cache
        path: str | None = str(imagenet_file(model.backbone))
    else:
        path = model.pretrained_path
    if path is None:
        return None
    try:
        sha: str | None = file_hash(Path(path))
    except FileNotFoundError:
        log.warning("register: pretrained_path %s is gone; its sha256 is not recorded", path)
        sha = None
    return {"file": Path(path).name, "sha256": sha}


def model_settings(params: Params, num_classes: int, pretrained: dict[str, str | None] | None) -> dict[str, Any]:
    """The registered model's settings (its `config` artifact), which RainEmbedder reads at load.

    `model.pretrained_path` is written as None: a path on the training machine would make every load read
    (and need) that file, though the weights artifact already holds what it initialised. `pretrained`
    records the file for provenance and is not read at load. `serve` holds the request limits, so the
    model enforces them wherever it is served.
    """
    return {"model": dataclasses.asdict(dataclasses.replace(params.model, pretrained=None, pretrained_path=None)),
            "num_classes": num_classes, "height": params.train.height, "width": params.train.width,
            "flip": params.evaluate.flip, "pretrained": pretrained, "serve": dataclasses.asdict(params.serve),
            "onnx": onnx_settings(params)}


def onnx_settings(params: Params) -> dict[str, Any]:
    """What the ONNX export is (its settings' entry `onnx`): where it lies in the model, what goes in and out. In the
    settings, so a version registered before the export (same weights, no `onnx`) is never reused for this one. The
    tolerance it was checked with is not: it changes no embedding, so a new one makes no new version."""
    from tasks.registry.onnx_model import INPUT, ONNX_FILE, OUTPUT

    return {"artifact": f"{ONNX_ARTIFACT}/{ONNX_FILE}", "input": INPUT, "output": OUTPUT,
            "input_shape": [-1, 3, params.train.height, params.train.width], "input_range": [0.0, 1.0]}


def checked_onnx_export(params: Params, weights: Path, num_classes: int, folder: Path) -> Any:
    """The ONNX export of `weights` (onnx_model.Exported) in MLflow's onnx flavor under `folder`, checked within
    `register.onnx_atol`; raises OnnxExportError before anything is logged."""
    from tasks.registry.embed import load_model
    from tasks.registry.onnx_model import export_checked

    model = load_model(weights, params.model, num_classes)
    exported = export_checked(model, (params.train.height, params.train.width), params.evaluate.flip,
                              params.register.onnx_atol, folder)
    log.info("register: ONNX export (opset %d) within %.2g of PyTorch's v", exported.opset, exported.max_abs_diff)
    return exported


def model_figures(client: Any, run_id: str) -> tuple[int, list[Any]]:
    """(step, figures) for logging the model of training run `run_id`: figures are the latest entry of each of
    its metrics (what the run page shows) but NOT_MODEL_FIGURES, the evaluation's first; step is one past every metric
    of the run.

    MLflow's log_model links to the new LoggedModel every run metric logged at its `step` (default 0): step 0
    holds the first training step's losses and the first epoch's means, so the model showed those while the run
    shows the last ones. At a step past every metric it links nothing, and the figures are linked instead (the
    same entries with the model's id: the run's history gets no new point)."""
    histories = {key: client.get_metric_history(run_id, key) for key in client.get_run(run_id).data.metrics}
    step = 1 + max((m.step for history in histories.values() for m in history), default=-1)
    figures = [max(history, key=lambda m: (m.step, m.timestamp, m.value)) for key, history in histories.items()
               if history and not key.startswith(NOT_MODEL_FIGURES)]
    # The evaluation figures first: the model page lists its metrics in the order they were linked (MLflow 3.17), and
    # in the run's order they came after some 60 losses and diagnostics.
    return step, sorted(figures, key=lambda m: not m.key.startswith((EVAL, EVAL_STD)))


def link_figures(client: Any, run_id: str, model_id: str, figures: list[Any]) -> None:
    from mlflow.entities import Metric

    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in figures]
    log_metrics(client, run_id, linked)


def logged_model_name(params: Params, trial: str) -> str:
    """The logged model's name in the experiment's Models tab (`rain-reid-synthetic-trial0`): whose model, on
    which data. MLflow refuses / : . % and quotes in it."""
    return re.sub(r"[/:.%\"']", "-", f"{params.register.model_name}-{params.dataset.name}-trial{trial}")


def figures_line(lr: dict[str, Any]) -> str:
    """`LR queries: rank-1 37.7% (std 1.2), rank-5 80.0%, rank-10 92.2%, rank-20 98.0%, mAP 46.6%`: the headline
    row of metrics.json (fractions) in percent, as the results table shows it."""
    parts = [f"{k.replace('rank', 'rank-')} {100 * lr[k]:.1f}%"
             + (f" (std {100 * lr[k + '_std']:.1f})" if k == "rank1" and k + "_std" in lr else "")
             for k in METRIC_KEYS if k in lr]
    return "LR queries: " + ", ".join(parts)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def version_description(params: Params, trial: str, run_id: str, lr: dict[str, Any]) -> str:
    """The model version's description: the LR queries' figures first, then what it is and where it came from."""
    return (f"{figures_line(lr)}. {params.objective.variant} ({params.model.backbone}, levels "
            f"{list(params.model.levels)}) trained on {params.dataset.name} trial {trial}; the tags hold the LR "
            f"queries' figures in percent (`{figure_name(HEADLINE_ROW, 'rank1')}`, ...) and where the model came "
            f"from (git commit, data and params hashes, MLflow run {run_id}).")


def model_description(params: Params, trial: str, run_id: str, metrics: dict[str, Any], table: str) -> str:
    """The logged model's description (its page's first section): the LR queries' figures first, the results
    table of every query set, then what the model is and where it came from."""
    return "\n".join([
        f"**{figures_line(metrics['rows'][HEADLINE_ROW])}** (mean of {_count(metrics['trials'], 'trial')} x "
        f"{_count(metrics['gallery_draws'], 'gallery draw')}; rank-k on a single-shot HR gallery, mAP over every HR "
        "image).",
        "", "```", table.strip(), "```", "",
        f"{params.objective.variant} ({params.model.backbone}, levels {list(params.model.levels)}) trained on "
        f"{params.dataset.name} trial {trial} by MLflow run {run_id}. {MODEL_DESCRIPTION}"])


def log_model(params: Params, weights: Path, settings: dict[str, Any], step: int = 0, name: str = "model",
              onnx: Path | None = None) -> Any:
    """The pyfunc (tasks/registry/pyfunc_model.py, from code) with `weights`, `settings` and the ONNX flavor folder
    `onnx` (checked_onnx_export), logged to the active MLflow run as its output at `step` (model_figures) under `name`
    (logged_model_name); returns MLflow's ModelInfo (its `model_uri` is what gets registered)."""
    import mlflow
    import pandas as pd

    from tasks.registry.runtime import DEFAULT_RUNTIME

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.json"
        config.write_text(json.dumps(settings, default=list))
        # The signature is inferred by running the logged model on the example: a free smoke test.
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(PACKAGE_ROOT / "tasks" / "registry" / "pyfunc_model.py"),
            artifacts={"weights": str(weights), "config": str(config)}
            | ({ONNX_ARTIFACT: str(onnx)} if onnx is not None else {}),
            code_paths=[str(PACKAGE_ROOT / "rain_model"), str(PACKAGE_ROOT / "tasks")],
            input_example=pd.DataFrame({"image": [_example_image(params)]}),
            pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS], step=step,
            # MLflow lets a load choose only the config keys the model was logged with (tasks/registry/runtime.py)
            model_config={"runtime": DEFAULT_RUNTIME},
        )


def registered_version(client: Any, name: str, weights_sha256: str, settings_sha256: str, run_id: str) -> Any | None:
    """The version of `name` registered for these weights and settings from MLflow run `run_id` (the oldest, should
    two exist), or None. A version registered before `settings_sha256` was tagged is never taken for this one."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    wanted = {"weights_sha256": weights_sha256, "settings_sha256": settings_sha256, "mlflow_run_id": run_id}
    same = [v for v in versions if all(v.tags.get(k) == value for k, value in wanted.items())]
    return min(same, key=lambda v: int(v.version)) if same else None


def run(params: Params, model_dir: Path, report_dir: Path, mlr_path: Path, params_file: Path,
        manifest_path: Path | None = None, lock_file: Path | None = None) -> dict[str, Any]:
    # RegisterConfig refuses these aliases at load; this catches a config that skipped its check (built by
    # hand, a stand-in object), before anything is logged or registered.
    if is_promoted_alias(params.register.alias):
        raise ValueError(f"register: alias {params.register.alias!r} is not set by the register stage: "
                         f"only `rain promote` moves {', '.join(PROMOTED_ALIASES)}, through its gate")
    import mlflow

    from tasks.training.artifacts import summary_path

    manifest_path = manifest_path or params.manifest_path()
    lock_file = lock_file or Path("dvc.lock")
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    train_summary = json.loads(summary_path(model_dir).read_text())
    metrics = json.loads((report_dir / "metrics.json").read_text())
    trial = str(params.train.trials[0])
    info = train_summary["trials"][trial]
    weights = model_dir / info["weights"]
    name = params.register.model_name
    pretrained = pretrained_provenance(params.model)
    weights_sha256 = file_hash(weights)
    settings = model_settings(params, info["num_classes"], pretrained)
    settings_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()
    # A run killed after MLflow created the version (dvc.lock then stale) runs again: the version it made is this
    # one, not a reason for a second version of the same model.
    existing = registered_version(client, name, weights_sha256, settings_sha256, info["mlflow_run_id"])
    if existing is None:
        with tempfile.TemporaryDirectory() as tmp:
            # Before the run is resumed: a failed export must not even end the training run as FAILED.
            exported = checked_onnx_export(params, weights, info["num_classes"], Path(tmp) / ONNX_ARTIFACT)
            onnx_tags = dict(zip(ONNX_TAGS, (f"{exported.max_abs_diff:.3g}", str(exported.opset)), strict=True))
            step, figures = model_figures(client, info["mlflow_run_id"])
            with mlflow.start_run(run_id=info["mlflow_run_id"]):
                logged = log_model(params, weights, settings, step, name=logged_model_name(params, trial),
                                   onnx=exported.folder)
        link_figures(client, info["mlflow_run_id"], logged.model_id, figures)
        table = (report_dir / "table.md").read_text() if (report_dir / "table.md").exists() else ""
        client.set_logged_model_tags(logged.model_id, {NOTE_TAG: model_description(
            params, trial, info["mlflow_run_id"], metrics, table)})  # the logged model page's description
    else:
        onnx_tags = {k: existing.tags[k] for k in ONNX_TAGS if k in existing.tags}
    lr = metrics["rows"][HEADLINE_ROW]
    tags = {
        "git_commit": git_commit(), "git_dirty": git_dirty(), "dataset": params.dataset.name, "trial": trial,
        "protocol": protocol_tag(params), "eval_set": eval_set_hash(manifest_path, mlr_path),
        "variant": params.objective.variant, "backbone": params.model.backbone,
        "mlr_manifest_sha256": file_hash(mlr_path), "params_yaml_sha256": file_hash(params_file),
        "weights_sha256": weights_sha256, "settings_sha256": settings_sha256, "mlflow_run_id": info["mlflow_run_id"],
        "pretrained_sha256": "none" if pretrained is None else pretrained["sha256"] or "unknown",
    } | dvc_lineage(lock_file, params) | figure_tags(lr) | onnx_tags
    if existing is None:  # tags go in with the version: no reader ever sees one without its lineage and metrics
        mv = mlflow.register_model(logged.model_uri, name, tags=tags)
    else:
        mv = existing
        for key, value in tags.items():  # what changed since (a dvc.lock written meanwhile, a new commit)
            if existing.tags.get(key) != value:
                client.set_model_version_tag(name, mv.version, key, value)
        log.info("register: %s version %s already holds this model (weights sha256 %s, settings sha256 %s) from "
                 "MLflow run %s: reused", name, mv.version, weights_sha256[:12], settings_sha256[:12],
                 info["mlflow_run_id"])
    client.update_registered_model(name, description=MODEL_DESCRIPTION)
    client.update_model_version(name, mv.version,
                                description=version_description(params, trial, info["mlflow_run_id"], lr))
    client.set_registered_model_alias(name, params.register.alias, mv.version)
    registration = {"model_name": name, "version": int(mv.version), "alias": params.register.alias,
                    "model_uri": f"models:/{name}/{mv.version}", "tags": tags}
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "registration.json").write_text(json.dumps(registration, indent=2, sort_keys=True))
    log.info("register: %s version %s, alias %s", name, mv.version, params.register.alias)
    return registration


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.model_dir(), params.report_dir(), params.mlr_manifest_path(), Path("params.yaml"))


if __name__ == "__main__":
    main()
