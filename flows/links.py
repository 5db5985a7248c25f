"""What a flow run says about itself in the Prefect UI: a name and tags from the settings that decide its
result, and links to the MLflow run and model version it produced.

MLflow's UI address is the tracking URI when that is a server (http or https); with the project's own
sqlite store it is where `mlflow ui` listens (README: `--host 127.0.0.1`, port 5000), or $RAIN_MLFLOW_UI.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from tasks.config import Params, load_params
from tasks.infra.tracking import ui_route

DEFAULT_UI = "http://127.0.0.1:5000"


def _training_tags(params: Params) -> dict[str, str]:
    """Settings that change every figure of a run without showing in its name: F's width and the learning rate."""
    return {"width": str(params.model.base_channels), "lr": f"{params.objective.lr:g}"}


def pipeline_label(params: Params) -> tuple[str, list[str]]:
    """(flow run name, tags) of a pipeline run: dataset, variant, backbone, epochs and trials (tags: also width
    and learning rate)."""
    trials = ",".join(map(str, params.train.trials))
    settings = {"dataset": params.dataset.name, "variant": params.objective.variant,
                "backbone": params.model.backbone, "epochs": str(params.train.epochs), "trials": trials}
    name = f"{settings['dataset']}-{settings['variant']}-{settings['backbone']}-{settings['epochs']}ep-t{trials}"
    return name, [f"{k}:{v}" for k, v in {**settings, **_training_tags(params)}.items()]


def grid_label(params: Params, seeds: tuple[int, ...]) -> tuple[str, list[str]]:
    """(flow run name, tags) of a grid run: dataset, backbone, epochs per run and seeds (tags: also width and
    learning rate)."""
    joined = ",".join(map(str, seeds))
    settings = {"dataset": params.dataset.name, "backbone": params.model.backbone,
                "epochs": str(params.experiments.epochs), "seeds": joined}
    return f"experiments-{settings['dataset']}-{settings['epochs']}ep-seeds{joined}", [
        f"{k}:{v}" for k, v in {**settings, **_training_tags(params)}.items()]


def _run_params() -> Params | None:
    """params.yaml of the project the current flow run was given (`project_dir`); None when it cannot be read (the
    flow then refuses it with its one-line error)."""
    from prefect.runtime import flow_run

    try:
        return load_params(Path(str(flow_run.parameters.get("project_dir", "."))).resolve() / "params.yaml")
    except Exception:  # any reason: the flow's own load_params reports it
        return None


def pipeline_run_name() -> str:
    """The `rain` flow's run name (flow_run_name: Prefect sets it before its "Beginning flow run" line, so the
    terminal and the UI show one name); the name Prefect drew when params.yaml cannot be read."""
    from prefect.runtime import flow_run

    params = _run_params()
    return str(flow_run.name) if params is None else pipeline_label(params)[0]


def grid_run_name() -> str:
    """The `rain-grid` flow's run name, as pipeline_run_name (its seeds: the run's `seeds`, else params.yaml's)."""
    from prefect.runtime import flow_run

    params = _run_params()
    if params is None:
        return str(flow_run.name)
    seeds = flow_run.parameters.get("seeds")
    return grid_label(params, tuple(seeds) if seeds else params.experiments.seeds)[0]


# Sections of params.yaml whose values decide a pipeline run's figures (paths, sources, worker counts do not), and
# the keys of a section that do not.
RESULT_SECTIONS = ("protocol", "model", "objective", "train", "evaluate", "ray")
NOT_DECIDING = ("protocol.workers", "train.checkpoint_every_seconds", "train.checkpoint_every_epochs",
                "train.loader_workers", "evaluate.batch_size", "evaluate.tsne_identities", "evaluate.sheet_queries",
                "ray.address", "ray.cpus_per_worker", "ray.max_failures", "ray.keep_checkpoints", "ray.keep_runs")


# Characters of settings per table row: Prefect's artifact page does not wrap a table cell, and cut a whole section's
# settings on one line at the window's edge (Chromium, 1600 px, Prefect 3.9).
SETTINGS_LINE = 90


def settings_markdown(params: Params) -> str:
    """The settings that decide a pipeline run's result, as a Markdown table of each params.yaml section's `key value`
    pairs, a section on as many rows as SETTINGS_LINE needs: the flow's own parameter is only the project folder, so
    its results artifact shows them."""
    from tasks.config import param_values

    values = param_values(params)
    sections = {"dataset": {k: v for k, v in values.items()
                            if k == "dataset.name" or k.startswith(f"{params.dataset.name}.")}}
    for section in RESULT_SECTIONS:
        sections[section] = {k: v for k, v in values.items() if k.startswith(f"{section}.") and k not in NOT_DECIDING}

    def shown(value: object) -> str:
        return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)

    rows = []
    for section, chosen in sections.items():
        lines = _packed([f"{k.partition('.')[2]} {shown(v)}" for k, v in chosen.items()], SETTINGS_LINE)
        rows += [f"| {section if i == 0 else ''} | {line} |" for i, line in enumerate(lines)]
    return "\n".join(["| params.yaml | settings |", "|:---|:---|", *rows])


def _packed(items: list[str], width: int) -> list[str]:
    """`items` joined by ", " into lines of at most `width` characters (an item longer than that alone on its line)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    return lines


def label_flow_run(name: str, tags: list[str]) -> None:
    """Rename the current flow run and add `tags` (kept: the tags it had); nothing outside a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, name=name, tags=sorted({*current.tags, *tags}))


def mlflow_ui(tracking_uri: str) -> str:
    """Base address of the MLflow UI that shows `tracking_uri`'s runs."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get("RAIN_MLFLOW_UI", DEFAULT_UI).rstrip("/")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/{ui_route(f'experiments/{experiment_id}/runs/{run_id}')}"


def artifact_url(ui: str, experiment_id: str, run_id: str, path: str) -> str:
    """The run's artifact `path` (`evaluation/cmc.png`) on the run's artifacts page."""
    return f"{ui}/{ui_route(f'experiments/{experiment_id}/runs/{run_id}/artifacts/{path}')}"


def model_version_url(ui: str, name: str, version: int) -> str:
    return f"{ui}/{ui_route(f'models/{quote(name)}/versions/{version}')}"


def experiment_url(ui: str, experiment_id: str, query: str = "") -> str:
    """The experiment's training runs (with `query`: results_view_query, the saved view of their figures). MLflow
    3.17's UI opens an experiment on its GenAI overview unless the browser's "Model training" switch is on (it
    ignores the experiment's kind tag); the query sets it, as it does on every link here (tasks/infra/tracking.py
    ui_route)."""
    return f"{ui}/{ui_route(f'experiments/{experiment_id}/runs', query)}"


def picture_links(ui: str, experiment_id: str, run_id: str, report_dir: Path) -> list[str]:
    """Markdown links to the report's pictures where the MLflow UI shows them: run `run_id` holds them under
    its artifacts `evaluation/`. Not file: URLs, which browsers refuse to open from a web page."""
    return [f"[{p.stem.replace('_', ' ')}]({artifact_url(ui, experiment_id, run_id, f'evaluation/{p.name}')})"
            for p in sorted(report_dir.glob("*.png"))]
