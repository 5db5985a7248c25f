"""Where the train stage puts its outputs: weights per trial, the summary, the checkpoint state file."""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "state.pt"  # inside each Ray checkpoint folder



def weights_path(model_dir: Path, trial: int) -> Path:
    return model_dir / f"trial-{trial}.safetensors"


def summary_path(model_dir: Path) -> Path:
    return model_dir / "train.json"
