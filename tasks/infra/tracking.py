"""MLflow location and run lineage shared by the stages that log (train, evaluate, register)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow is slow to import; only the stages that log need it at run time
    from mlflow import MlflowClient

DEFAULT_DB = "mlflow.db"


def tracking_uri(project_dir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set (a team server), else the project's own sqlite registry."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{((project_dir or Path.cwd()) / DEFAULT_DB).resolve()}"


def mlflow_experiment_id(client: MlflowClient, name: str, project_dir: Path | None = None) -> str:
    """Id of experiment `name`, created with its artifacts under <project>/mlartifacts when new."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = ((project_dir or Path.cwd()) / "mlartifacts" / name).resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def git_commit(project_dir: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True,
                             check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
