"""The Prefect flow `rain`: the DVC stages of dvc.yaml, one Prefect task each, in order.

DVC alone decides what is up to date (`dvc repro --single-item <stage>` skips a stage whose deps and
params did not change); Prefect adds retries on the download, logs, the UI, artifacts, deployments.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from flows.links import (
    experiment_url,
    label_flow_run,
    mlflow_ui,
    model_version_url,
    picture_links,
    pipeline_label,
    pipeline_run_name,
    run_url,
    settings_markdown,
)
from tasks.config import Params, load_params
from tasks.download import TRANSIENT_MARKER
from tasks.infra import reaper
from tasks.infra.logs import ERROR_MARKER, new_run_folder

STAGES = ("fingerprint", "download", "manifest", "synthesize", "decode", "train", "evaluate", "register")


class StageFailed(RuntimeError):
    """A stage exited non-zero. The message is its one-line error and where its whole output is kept."""

    def __init__(self, stage: str, returncode: int, tail: str, log: Path | None = None) -> None:
        where = f" (full log: {log})" if log is not None else ""
        returncode = stage_exit_code(tail, returncode)
        super().__init__(f"stage {stage!r} failed (exit {returncode}): {error_line(tail)}{where}")
        self.stage, self.returncode, self.tail, self.log = stage, returncode, tail, log


_DVC_CMD_FAILED = re.compile(r"failed to run: .*, exited with (-?\d+)\s*$")


def stage_exit_code(output: str, returncode: int) -> int:
    """The stage command's own exit code, which DVC's last ERROR line gives ("failed to run: <cmd>, exited with 1"),
    while DVC itself exits 255 for any failed stage; else `returncode` (the command was run without DVC)."""
    codes = [m.group(1) for line in output.splitlines() if (m := _DVC_CMD_FAILED.search(line))]
    return int(codes[-1]) if codes else returncode


def error_line(output: str) -> str:
    """The stage's own one-line error (tasks/infra/logs.py prints it last), else DVC's last ERROR line."""
    lines = output.splitlines()
    for prefix in (ERROR_MARKER, "ERROR:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix(ERROR_MARKER).strip()
    return lines[-1].strip() if lines else "no output"


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | up to date | restored from run cache
    seconds: float


def stage_env() -> dict[str, str]:
    """The stages' `python` is this interpreter; DVC sends no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log file shows each line as it is written
    return env


# Loaded here, not in a forked child: only the prctl call itself runs between fork and exec.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """DVC dies at once with the flow's process; the watchdog (tasks/infra/reaper.py) ends the rest."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# DVC's advice after every stage, addressed to someone running `dvc` by hand: not news in a flow's log.
_DVC_HINTS = re.compile(r"^(To track the changes with git, run:|\s+git add |To enable auto staging, run:"
                        r"|\s+dvc config core\.autostage|Use `dvc push` to send your updates|\s*$)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\)\s?")  # Ray's prefix on a worker's or actor's line
# Ray's driver-side notices (its logger's format: a tab after the time). INFO ones ("View the dashboard at ...": dead
# once the stage's embedded cluster stops) and the token-auth notice (a loopback cluster that Ray secures, nothing to
# act on; tasks/infra/raycluster.py quiets that logger so that Ray no longer prints it) stay in the stage's log file.
_RAY_NOTICE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(INFO|DEBUG) \S+\.py:\d+ -- "
                         r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+WARNING authentication_token_setup\.py:\d+ -- "
                         r"Token authentication is enabled")
# MLflow's own notices at INFO ("Creating initial MLflow database tables...", "Updating database tables", "Inferring
# model signature from input example"; its logger's format) and its schema migrations' (alembic's): the log file's.
_MLFLOW_NOTICE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|DEBUG) (mlflow|alembic)[\w.]*: "
                            r"|^(INFO|DEBUG) {1,2}\[alembic[\w.]*\] ")
# The stages' own lines (tasks/infra/logs.py setup_logging: `time LEVEL logger: message`; the stage module run by
# `python -m` logs as __main__): the flow's log shows the message at that level, Prefect's record giving the time
# and level once.
_OWN_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (tasks[\w.]*|__main__): ")
_LEVELS = ((re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|^\w*Error: "), logging.ERROR),
           (re.compile(r"\bWARN(ING)?\b|Warning: "), logging.WARNING))


def flow_log_line(line: str) -> tuple[int, str] | None:
    """(level, text) of a stage's output line in the flow's log, or None when it stays in the stage's log file
    only: DVC's git hints, blank lines, Ray's and MLflow's own notices and Ray's worker and actor output (our
    loggers' lines, named `tasks.*`, and warnings and errors are kept). One prefix per line: a line of our loggers
    loses Ray's `(RayTrainWorker pid=...)` and its own time, level and logger name, which Prefect's record shows.
    Errors and warnings keep their level."""
    text = _ANSI.sub("", line).rstrip()
    if _DVC_HINTS.match(text) or _RAY_NOTICE.match(text) or _MLFLOW_NOTICE.match(text):
        return None
    ray = _RAY_PREFIX.match(text)
    own = _OWN_LINE.match(text[ray.end():] if ray else text)
    if own:
        return logging.getLevelNamesMapping()[own.group(1)], own.string[own.end():]
    level = next((lvl for pattern, lvl in _LEVELS if pattern.search(text)), logging.INFO)
    if text.startswith(ERROR_MARKER):  # the stage's own one-line error
        level = logging.ERROR
    if ray and level == logging.INFO:
        return None
    return level, text


def left_out_note(count: int, log_file: Path) -> str:
    """The last line of a stage in the flow's log when `count` lines were left out of it (flow_log_line)."""
    lines = "1 line" if count == 1 else f"{count} lines"
    return f"({lines} of DVC hints and Ray's and MLflow's own output only in {log_file})"


def stream_command(cmd: list[str], cwd: Path, env: dict[str, str], label: str, log_file: Path) -> list[str]:
    """Run `cmd` in its own process group with its output going to `log_file`, and stream that file to the
    Prefect log as `label | line` (`flow_log_line` says which lines, at what level); returns the lines. The
    command writes to the file, not to a pipe this process reads: if the flow dies, its last words are still
    kept. Raises StageFailed naming the command's one-line error and the log. A cancelled or interrupted task
    ends the whole group."""
    logger = get_run_logger()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with log_file.open("ab") as sink, log_file.open("r", errors="replace") as source:
        source.seek(0, os.SEEK_END)  # a retried stage appends to its log: the earlier try stays readable
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, start_new_session=True)
        reaper.register_group(proc.pid)
        try:
            pending, in_traceback, left_out = "", False, 0
            while True:
                done = proc.poll() is not None  # read once more after the end: nothing is left behind
                pending += source.read()
                *complete, pending = pending.split("\n")
                for line in complete:
                    lines.append(line.rstrip())
                    # A traceback's frames stay in the log file; its exception line is shown.
                    if line.startswith("Traceback (most recent call last):"):
                        in_traceback = True
                        logger.info("%s | (traceback in %s)", label, log_file)
                    elif in_traceback and line.startswith(" "):
                        continue
                    else:
                        in_traceback = False
                        shown = flow_log_line(line)
                        if shown is None:
                            left_out += 1
                        else:
                            logger.log(shown[0], "%s | %s", label, shown[1])
                if done:
                    break
                time.sleep(0.2)
            if pending:
                lines.append(pending.rstrip())
            if left_out:
                logger.info("%s | %s", label, left_out_note(left_out, log_file))
        finally:
            if proc.poll() is None:
                reaper.end_group(proc.pid)
                proc.wait()
    if proc.returncode != 0:
        raise StageFailed(label, proc.returncode, "\n".join(lines[-40:]), log_file)
    return lines


def dvc_repro(stage: str, project_dir: Path, log_dir: Path) -> StageResult:
    """Run one stage through DVC, streaming its output to the Prefect log and to <log_dir>/<stage>.log."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    lines = stream_command(cmd, project_dir, stage_env(), stage, log_dir / f"{stage.rpartition(':')[2]}.log")
    text = "\n".join(lines)
    if re.search(rf"Stage '{stage}' didn't change, skipping", text):
        status = "up to date"
    elif re.search(rf"Stage '{stage}' is cached - skipping run", text):
        status = "restored from run cache"
    else:
        status = "ran"
    return StageResult(stage, status, round(time.perf_counter() - started, 1))


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry the download only when its own retries ran out on transient errors (the stage says so);
    a checksum mismatch, a 404, a missing sign-up archive or a bad params.yaml fail at once."""
    try:
        state.result()
    except StageFailed as exc:
        return TRANSIENT_MARKER in exc.tail
    except Exception:
        return False
    return False


def _stage_state(stage: str, project_dir: Path, log_dir: Path) -> StageResult | State:
    """The stage's result, or a failed state carrying its StageFailed: a task that raises has Prefect log
    its traceback, and what went wrong is the stage's one line (its own traceback is in its log file)."""
    try:
        return dvc_repro(stage, project_dir, log_dir)
    except StageFailed as exc:
        return Failed(message=str(exc), data=exc)


@task(name="download", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def download(project_dir: Path, log_dir: Path) -> StageResult | State:
    return _stage_state("download", project_dir, log_dir)


@task(name="stage")
def stage_task(stage: str, project_dir: Path, log_dir: Path) -> StageResult | State:
    return _stage_state(stage, project_dir, log_dir)


def run_stages(stages: tuple[str, ...], project_dir: Path, log_dir: Path) -> list[StageResult] | State:
    """One Prefect task per stage, in order; the first failed stage's state ends it (the flow returns that
    state, so it ends Failed with the stage's one-line message rather than a traceback of its own)."""
    results = []
    for stage in stages:  # download is the task with retries
        state = (download(project_dir, log_dir, return_state=True) if stage == "download" else
                 stage_task.with_options(name=stage.rpartition(":")[2])(stage, project_dir, log_dir,
                                                                        return_state=True))
        if state.is_failed():  # the flow's state message is the stage's, and calling it raises its StageFailed
            return Failed(message=state.message, data=state.result(raise_on_failure=False))
        results.append(cast(StageResult, state.result()))
    return results


ALWAYS_RUNS = "fingerprint"  # re-hashes the data's sources on every repro (dvc.yaml: always_changed): no news


def outcome(results: list[StageResult]) -> tuple[str, list[str]]:
    """(what the run did in a few words, its tags): `outcome:trained` when the train stage trained a model,
    `outcome:reused` when it kept the one it had (up to date or restored from DVC's run cache) but a later stage
    ran, `outcome:up-to-date` when no stage had anything to do; and `ran:<stage>` for each stage that ran."""
    ran = [r.stage for r in results if r.status == "ran" and r.stage != ALWAYS_RUNS]
    train = next((r for r in results if r.stage == "train"), None)
    if train is not None and train.status == "ran":
        said, kind = f"trained a model (train ran {train.seconds:.0f} s)", "trained"
    elif ran:
        kept = train.status if train is not None else "no train stage"
        said, kind = f"reused the trained model ({kept}); ran {', '.join(ran)}", "reused"
    else:
        said, kind = "had nothing to do: every stage was up to date", "up-to-date"
    return said, [f"outcome:{kind}", *(f"ran:{stage}" for stage in ran)]


def results_markdown(params: Params, results: list[StageResult], table: str, links: list[tuple[str, str]],
                     pictures: list[str], registration: dict[str, Any]) -> str:
    """The flow run's results artifact: what it did (each stage ran or was up to date), the results table, links
    to MLflow, and every setting that decided the result."""
    said, _ = outcome(results)
    stages = "\n".join(["| stage | status | seconds |", "|:---|:---|---:|",
                        *(f"| {r.stage} | {r.status} | {r.seconds:.1f} |" for r in results)])
    return (f"# {params.dataset.name}\n\n**This flow run {said}.**\n\n{table}\n\n"
            + "".join(f"- [{text}]({url})\n" for text, url in links)
            + f"\nModel `{registration['model_uri']}` (alias `{registration['alias']}`). The pictures, in the first "
            "trial's MLflow run:\n\n" + "".join(f"- {link}\n" for link in pictures)
            + f"\n## What each stage did\n\n{stages}\n\n## The settings that decide the result\n\n"
            f"{settings_markdown(params)}\n")


@flow(name="rain", flow_run_name=pipeline_run_name, log_prints=True)
def rain(project_dir: str = ".") -> dict[str, Any] | State:
    """fingerprint -> download -> manifest -> synthesize -> decode -> train -> evaluate -> register, as DVC
    decides.

    Args:
        project_dir: The rain project folder (params.yaml, dvc.yaml); relative to where the flow runs. Every
            setting is in its params.yaml; the run's results artifact lists those that decide the result.
    """
    reaper.guard()  # nothing this flow starts outlives it (a killed flow run included)
    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")  # refuses a bad params.yaml before any stage runs
    name, tags = pipeline_label(params)
    label_flow_run(name, tags)
    log_dir = new_run_folder(root / params.paths.logs)  # this run's stage logs, a folder of its own
    results = run_stages(STAGES, root, log_dir)
    if isinstance(results, State):  # a stage failed: calling the flow raises its StageFailed
        return results
    said, outcome_tags = outcome(results)
    label_flow_run(name, outcome_tags)  # the runs list tells a training run from a no-op
    get_run_logger().info("This flow run %s.", said)
    report_dir = root / params.report_dir()
    metrics = json.loads((report_dir / "metrics.json").read_text())
    registration = json.loads((report_dir / "registration.json").read_text())
    create_table_artifact(key="rain-stages", table=[r.__dict__ for r in results],
                          description="What DVC ran or skipped in this flow run")
    table = (report_dir / "table.md").read_text() if (report_dir / "table.md").exists() else ""
    links, pictures = _mlflow_links(root, params, registration, report_dir)
    for text, url in links:
        get_run_logger().info("%s: %s", text, url)
    create_markdown_artifact(
        key=f"rain-results-{re.sub(r'[^a-z0-9-]', '-', params.dataset.name.lower())}",
        markdown=results_markdown(params, results, table, links, pictures, registration),
        description=f"What the pipeline measured on {params.dataset.name}, with links to MLflow")
    return {"stages": [r.__dict__ for r in results], "metrics": metrics, "registration": registration}


RUN_LINK = "MLflow run"  # how a trial's run link starts (text of the log line and of the artifact's link)


def _mlflow_links(root: Path, params: Params, registration: dict[str, Any], report_dir: Path
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """(text, URL) of the experiment, each trial's MLflow run and the registered model version in the MLflow UI,
    and Markdown links to the pictures in the first trial's run (each in the UI's training views)."""
    from mlflow import MlflowClient

    from tasks.infra.tracking import results_view_query, tracking_uri

    uri = tracking_uri(root)
    client, ui = MlflowClient(uri), mlflow_ui(uri)
    trials = trials_of(root, params)
    first_run = next(iter(trials.values()))["mlflow_run_id"]
    experiment_id = client.get_run(first_run).info.experiment_id
    view = results_view_query(client.get_experiment(experiment_id).tags)
    links = [(f"{RUN_LINK}, trial {trial}", run_url(ui, experiment_id, info["mlflow_run_id"]))
             for trial, info in trials.items()]
    name, version = registration["model_name"], registration["version"]
    return [(f"MLflow experiment rain-{params.dataset.name}, its training runs",
             experiment_url(ui, experiment_id, view)),
            *links, (f"Model {name} version {version}", model_version_url(ui, name, version))], picture_links(
        ui, experiment_id, first_run, report_dir)


def trials_of(root: Path, params: Params) -> dict[str, Any]:
    """The train stage's summary of each trained trial (weights, MLflow run id, ...), by trial."""
    from tasks.training.artifacts import summary_path

    trials: dict[str, Any] = json.loads(summary_path(root / params.model_dir()).read_text())["trials"]
    return trials
