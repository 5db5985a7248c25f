"""The `rain` command: run the pipeline flow, or serve it as the Prefect deployment `rain/full`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="RAIN cross-resolution person re-ID pipeline (Prefect + DVC + Ray Train + MLflow).",
                  no_args_is_help=True, add_completion=False)

ProjectOption = Annotated[Path, typer.Option("--project", "-C", help="Project folder (holds params.yaml).")]


def configure_environment(project: Path) -> None:
    """Settings every entry point needs before Prefect, Ray or DVC are imported (measured pitfalls)."""
    os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))
    # A fresh temporary server takes ~19 s to start on 2 cores; the default timeout is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


def print_results(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.evaluate import row_label

    console = Console(width=max(110, Console().width))
    stages = Table(title="Stages")
    for col in ("stage", "status", "seconds"):
        stages.add_column(col)
    for s in result["stages"]:
        stages.add_row(s["stage"], s["status"], f"{s['seconds']:.1f}")
    console.print(stages)
    metrics = Table(title="Cross-resolution re-ID (%), mean ± std over evaluations")
    for col in ("query set", "rank 1", "rank 5", "rank 10", "rank 20", "mAP"):
        metrics.add_column(col, justify="right" if col != "query set" else "left")
    for name, row in result["metrics"]["rows"].items():
        cells = [f"{100 * row[k]:.1f} ± {100 * row[k + '_std']:.1f}"
                 for k in ("rank1", "rank5", "rank10", "rank20", "mAP")]
        metrics.add_row(row_label(name, ()), *cells)
    console.print(metrics)
    reg = result["registration"]
    console.print(f"Registered [bold]{reg['model_uri']}[/bold] with alias [bold]{reg['alias']}[/bold].")


@app.command()
def run(project: ProjectOption = Path(".")) -> None:
    """Run the whole pipeline (flow `rain`) in this process; DVC skips stages that are up to date."""
    project = project.resolve()
    configure_environment(project)
    from flows.pipeline import rain
    from tasks.config import ParamsError, load_params

    try:
        load_params(project / "params.yaml")
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    print_results(rain(project_dir=str(project)))


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@app.command()
def serve(project: ProjectOption = Path("."),
          port: Annotated[int, typer.Option(help="Port of the Prefect server started when none runs.")] = 4200,
          ) -> None:
    """Serve the flow as deployment `rain/full` (then: `prefect deployment run rain/full`)."""
    project = project.resolve()
    configure_environment(project)
    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    server = None
    if not _healthy(api_url):
        if os.environ.get("PREFECT_API_URL"):
            typer.echo(f"error: PREFECT_API_URL={api_url} does not answer", err=True)
            raise typer.Exit(1)
        log_file = (project / ".prefect" / "server.log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        typer.echo(f"Starting a Prefect server on 127.0.0.1:{port} (log: {log_file})")
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=log_file.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not _healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                server.terminate()
                typer.echo(f"error: the Prefect server did not start; see {log_file}", err=True)
                raise typer.Exit(1)
            time.sleep(1)
    os.environ["PREFECT_API_URL"] = api_url
    typer.echo(f"Prefect API: {api_url}. In another terminal:\n"
               f"  export PREFECT_API_URL={api_url}\n  prefect deployment run rain/full")
    from flows.pipeline import rain

    try:
        rain.serve(name="full", parameters={"project_dir": str(project)})
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    app()
