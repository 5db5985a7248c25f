"""Stage `register`: the trained model as an MLflow model version of `rain-reid`, alias `candidate`.

The model is the pyfunc of tasks/registry/pyfunc_model.py (images in, unit-norm embeddings out), logged from
code with safetensors weights: nothing in it is pickled. The version carries its lineage as tags, so
a person browsing the registry can tell where it came from and how good it is, and `rain promote` can
tell whether two versions were measured the same way:

- where it came from: `git_commit` (with `git_dirty`: uncommitted changes to tracked files),
  `mlflow_run_id`, `weights_sha256`, `params_sha256` (params.yaml), `mlr_manifest_sha256`,
  `pretrained_sha256` (the file `model.pretrained_path` that initialised training, or `none`), and from
  dvc.lock (when the stage runs under DVC) the hashes DVC recorded: `dvc_data_md5` (the raw dataset
  folder), `dvc_mlr_manifest_md5`, `dvc_models_md5` and `dvc_params_sha256` (the parameter values
  every upstream stage ran with, canonical JSON);
- how it was measured: `dataset`, `protocol` (MLR split and evaluation settings as one string) and
  `eval_set` (sha256 of the HR and MLR manifests: the exact images and splits it was scored on);
- how good it is: `rank1`, `rank1_std`, `rank5`, `rank10`, `rank20`, `mAP` (LR queries, fractions).

The model is self-contained: its settings (`model_settings`) never name a file outside it, so it loads on
any machine, and they carry the `serve` request limits, which it enforces wherever it is served.

Writes reports/<dataset>/registration.json.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from rain_model.config import ModelConfig
from rain_model.metrics import METRIC_KEYS
from tasks.config import PROMOTED_ALIASES, Params, is_promoted_alias, load_params
from tasks.infra.logs import setup_logging
from tasks.infra.tracking import file_hash, git_commit, tracking_uri

log = logging.getLogger(__name__)

MODEL_DESCRIPTION = (
    "RAIN (AAAI 2019) cross-resolution person re-ID: maps a person crop of any resolution to a unit-length "
    "embedding; nearer embeddings are more likely the same person. Input: a table with a column `image` of "
    "encoded images as base64 text; output: one embedding per row. Versions come from `dvc repro` / `rain run` "
    "with alias `candidate`; only `rain promote` (its gate) moves `champion`.")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "safetensors", "pyyaml",
                "pyarrow")
# Stages whose parameters shaped the model and its figures (register's own do not).
UPSTREAM_STAGES = ("download", "manifest", "synthesize", "decode", "train", "evaluate")


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
            "flip": params.evaluate.flip, "pretrained": pretrained, "serve": dataclasses.asdict(params.serve)}


def log_model(params: Params, weights: Path, settings: dict[str, Any]) -> Any:
    """The pyfunc (tasks/registry/pyfunc_model.py, from code) with `weights` and `settings`, logged to the
    active MLflow run; returns MLflow's ModelInfo (its `model_uri` is what gets registered)."""
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.json"
        config.write_text(json.dumps(settings, default=list))
        # The signature is inferred by running the logged model on the example: a free smoke test.
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PACKAGE_ROOT / "tasks" / "registry" / "pyfunc_model.py"),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(PACKAGE_ROOT / "rain_model"), str(PACKAGE_ROOT / "tasks")],
            input_example=pd.DataFrame({"image": [_example_image(params)]}),
            pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS],
        )


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
    with mlflow.start_run(run_id=info["mlflow_run_id"]):
        logged = log_model(params, weights, model_settings(params, info["num_classes"], pretrained))
    tags = {
        "git_commit": git_commit(), "git_dirty": git_dirty(), "dataset": params.dataset.name, "trial": trial,
        "protocol": protocol_tag(params), "eval_set": eval_set_hash(manifest_path, mlr_path),
        "variant": params.objective.variant, "backbone": params.model.backbone,
        "mlr_manifest_sha256": file_hash(mlr_path), "params_sha256": file_hash(params_file),
        "weights_sha256": file_hash(weights), "mlflow_run_id": info["mlflow_run_id"],
        "pretrained_sha256": "none" if pretrained is None else pretrained["sha256"] or "unknown",
    } | dvc_lineage(lock_file, params) | {k: f"{metrics[k]:.6f}" for k in METRIC_KEYS}
    if "rank1_std" in metrics.get("rows", {}).get("lr", {}):
        tags["rank1_std"] = f"{metrics['rows']['lr']['rank1_std']:.6f}"
    # Tags go in with the version, so no reader ever sees a version without its lineage and metrics.
    mv = mlflow.register_model(logged.model_uri, name, tags=tags)
    client.update_registered_model(name, description=MODEL_DESCRIPTION)
    lr = metrics["rows"]["lr"]
    client.update_model_version(name, mv.version, description=(
        f"{params.objective.variant} ({params.model.backbone}, levels {list(params.model.levels)}) trained on "
        f"{params.dataset.name} trial {trial}. LR queries: rank-1 {100 * lr['rank1']:.1f}%, mAP "
        f"{100 * lr['mAP']:.1f}%; the tags hold every metric and where the model came from (git commit, data and "
        f"params hashes, MLflow run {info['mlflow_run_id']})."))
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
