"""Stage `register`: the trained model as an MLflow model version of `rain-reid`, alias `candidate`.

The version carries its lineage as tags: git commit, hashes of the MLR manifest, params and weights,
dataset and protocol, and the evaluation figures, so a person browsing the registry can tell where it
came from and how good it is. Writes reports/<dataset>/registration.json.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tasks.config import Params, load_params
from tasks.logs import setup_logging
from tasks.tracking import file_hash, git_commit, tracking_uri

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "safetensors", "pyyaml",
                "pyarrow")


def _example_image(params: Params) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (params.train.width, params.train.height), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run(params: Params, model_dir: Path, report_dir: Path, mlr_path: Path, params_file: Path) -> dict[str, Any]:
    import dataclasses

    import mlflow
    import pandas as pd

    from tasks.train import summary_path

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    train_summary = json.loads(summary_path(model_dir).read_text())
    metrics = json.loads((report_dir / "metrics.json").read_text())
    trial = str(params.train.trials[0])
    info = train_summary["trials"][trial]
    weights = model_dir / info["weights"]
    name = params.register.model_name
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.json"
        config.write_text(json.dumps({"model": dataclasses.asdict(params.model), "num_classes": info["num_classes"],
                                      "height": params.train.height, "width": params.train.width,
                                      "flip": params.evaluate.flip}, default=list))
        example = pd.DataFrame({"image": [_example_image(params)]})
        with mlflow.start_run(run_id=info["mlflow_run_id"]):
            logged = mlflow.pyfunc.log_model(
                name="model", python_model=str(PACKAGE_ROOT / "tasks" / "pyfunc_model.py"),
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(PACKAGE_ROOT / "rain_model"), str(PACKAGE_ROOT / "tasks")],
                input_example=example,
                pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS],
            )
    mv = mlflow.register_model(logged.model_uri, name)
    tags = {
        "git_commit": git_commit(), "dataset": params.dataset.name, "trial": trial,
        "protocol": f"MLR train_rates={list(params.protocol.train_rates)} unseen={list(params.protocol.unseen_rates)} "
                    f"trials={params.protocol.trials} seed={params.protocol.seed}",
        "variant": params.objective.variant, "backbone": params.model.backbone,
        "mlr_manifest_sha256": file_hash(mlr_path), "params_sha256": file_hash(params_file),
        "weights_sha256": file_hash(weights), "mlflow_run_id": info["mlflow_run_id"],
        "dvc_lock_sha256": file_hash(Path("dvc.lock")) if Path("dvc.lock").exists() else "none",
    } | {k: f"{metrics[k]:.6f}" for k in ("rank1", "rank5", "rank10", "rank20", "mAP")}
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    client.set_registered_model_alias(name, params.register.alias, mv.version)
    registration = {"model_name": name, "version": int(mv.version), "alias": params.register.alias,
                    "model_uri": f"models:/{name}/{mv.version}", "tags": tags}
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "registration.json").write_text(json.dumps(registration, indent=2, sort_keys=True))
    log.info("register: %s version %s, alias %s", name, mv.version, params.register.alias)
    return registration


def params_digest(params_file: Path) -> str:
    return hashlib.sha256(params_file.read_bytes()).hexdigest()


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.model_dir(), params.report_dir(), params.mlr_manifest_path(), Path("params.yaml"))


if __name__ == "__main__":
    main()
