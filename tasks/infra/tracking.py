"""MLflow location, experiments, metric names and run lineage shared by the stages that log (train, evaluate,
register, the grid).

Metric names are grouped by a prefix ending in `/`: MLflow's UI draws one chart section per prefix, as it
does for its own `system/` metrics, so each kind of figure gets a section of its own (the prefixes below).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mlflow is slow to import; only the stages that log need it at run time
    from mlflow import MlflowClient

DEFAULT_DB = "mlflow.db"

# Metric sections (the UI's chart groups). The losses keep the paper's names after the prefix (train/L_cls).
TRAIN = "train/"  # each loss per training step
EPOCH = "epoch/"  # each loss's mean over an epoch, and images_per_second, stepped by epoch
VALIDATION = "val/"  # the validation split's LR rank-1 and mAP per scored epoch, and the epoch kept (best_epoch)
RANK1_BY_FEATURE = "lr_rank1_"  # val/lr_rank1_v, val/lr_rank1_bnneck: each retrieval feature's, with BNNeck on
GAME = "game/"  # the min-max game's diagnostics (rain_model/diagnostics.py) and w_adv, epoch means
COLLAPSE = "collapse"  # why a run's features collapsed: its run tag, and the key in epoch reports and run summaries
EVAL = "eval/"  # evaluation figures, <row>_<metric> (figure_name): eval/lr_rank1, eval/r8_mAP, ...
EVAL_STD = "eval_std/"  # the std of each figure, same name: apart, so a std is not a chart among the figures
CMC = "cmc/"  # each row's CMC curve, stepped by rank (1 to 20)
TIME = "time/"  # seconds a stage spent: time/train_seconds (and a grid run's time/eval_seconds)
STD_SUFFIX = "_std"  # how metrics.json and the grid's tables name a figure's spread (rank1_std)
# One unit for every rate a person reads in MLflow (a rank-k, mAP, a CMC point, an accuracy; their spreads): percent,
# as the paper's tables, the run and version descriptions and the terminal give them. The files the stages write
# (metrics.json, a grid run's result.json) keep the fractions retrieval computes: a figure becomes percent here, where
# it becomes a metric or a version tag (shown), and nowhere else.
PERCENT = "percent"
FIGURES_UNIT = "figures_unit"  # the model version tag naming the unit of its figure tags (PERCENT)
RATE_NAME = re.compile(r"(^|[/_])(rank\d+|mAP|accuracy)(_|$)")  # eval/lr_rank1, val/lr_rank1_v, game/D4_accuracy_HR
# The evaluation row the paper reports and the promotion gate compares: LR queries, each at its drawn rate.
HEADLINE_ROW = "lr"

# Experiment tags MLflow's UI reads. experimentKind says what the experiment holds (custom_model_development:
# training runs; the value MLflow's front end and onboarding skill use, with no constant in mlflow_tags). The
# MLflow 3.17 UI does not open on it: an experiment opens on the GenAI overview until the browser's "Model
# training" switch is on (checked in Chromium, 2026-11-27), so every link to the UI carries ML_VIEW (ui_route).
# The note is the description the experiment page shows, the same tag MLflow uses for a run's description.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
# The query that puts the MLflow UI in its training views on any page (run, artifact, model version): its
# front end reads `workflowType` from the address before the switch it keeps in the browser (GenAI by default),
# and the sidebar lists the model registry only in these views (MLflow 3.17's bundled main.js).
ML_VIEW = "workflowType=machine_learning"


# A saved view of an experiment's runs list, as MLflow 3.17's UI keeps one ("Views" > "Save as new view", 3.15+): an
# experiment tag `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state}, the state being the JSON
# of the list's search facets and columns (the UI's own keys and column names, read from its bundled
# 5439.*.chunk.js and 6475.*.chunk.js). The runs list shows no metric until a user picks one; this view shows the
# evaluation figures, the best run first, and the address `...#/experiments/<id>/runs?viewStateShareKey=<id>`
# opens it (results_view_query).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RESULTS_VIEW = "rain-results"
RESULTS_COLUMNS = ("lr_rank1", "lr_rank5", "lr_mAP", "r8_rank1", "hr_rank1")  # after EVAL: the figures shown


def results_view(now_ms: int | None = None) -> dict[str, str]:
    """The experiment tag of the saved view RESULTS_VIEW: the runs list with each run's LR rank-1 (and its std),
    rank-5, mAP, unseen-rate and HR rank-1 as columns, sorted by LR rank-1, best first."""
    import json
    import time

    columns = [f"metrics.`{c}`" for c in (EVAL + RESULTS_COLUMNS[0], EVAL_STD + RESULTS_COLUMNS[0],
                                          *(EVAL + c for c in RESULTS_COLUMNS[1:]))]
    name, models, dataset = "attributes.`Run Name`", "attributes.`Models`", "attributes.`Dataset`"
    # The figures right after the run's name, which is wide enough to read whole; the (empty) Dataset column, which
    # the list always shows, last: at its default width it pushed the figures out of a 1600 px window. The UI
    # applied the order and widths only with every column it shows in the order (Chromium, MLflow 3.17.2).
    order = [name, *columns, "attributes.`Created`", "attributes.`Duration`", models, dataset]
    state = {"orderByKey": f"metrics.`{EVAL}{RESULTS_COLUMNS[0]}`", "orderByAsc": False,
             "selectedColumns": [*columns, models], "columnOrder": order, "columnWidths": {name: 260, dataset: 90}}
    now = int(time.time() * 1000) if now_ms is None else now_ms
    envelope = {"name": "Results: LR rank-1, rank-5, mAP (%)", "createdAt": now, "updatedAt": now,
                "state": json.dumps(state)}
    return {VIEW_TAG_PREFIX + RESULTS_VIEW: json.dumps(envelope)}


def results_view_query(experiment_tags: dict[str, str]) -> str:
    """`viewStateShareKey=rain-results` where the experiment holds the view, else "" (MLflow's UI answers an address
    naming a view the experiment lacks with an error)."""
    return f"viewStateShareKey={RESULTS_VIEW}" if VIEW_TAG_PREFIX + RESULTS_VIEW in experiment_tags else ""


def ui_route(path: str, query: str = "") -> str:
    """`#/<path>?workflowType=machine_learning`: the MLflow UI's page `path` (its routes follow `#`) in the
    training views, with `query` too. Alone it is a link relative to the UI's own address (a run description's)."""
    return f"#/{path.strip('/')}?{'&'.join(q for q in (query, ML_VIEW) if q)}"


def figure_name(row: str, metric: str) -> str:
    """`lr_rank1`: figure `metric` (rank1, ..., mAP) of evaluation row `row`, as a model version tag and, after
    the EVAL prefix, as a metric."""
    return f"{row}_{metric}"


def eval_metric(row: str, metric: str) -> str:
    """MLflow metric name of a row's figure (`eval/lr_rank1`) or of its spread (`rank1_std`: `eval_std/lr_rank1`)."""
    if metric.endswith(STD_SUFFIX):
        return EVAL_STD + figure_name(row, metric.removesuffix(STD_SUFFIX))
    return EVAL + figure_name(row, metric)


def is_rate(key: str) -> bool:
    """Whether metric or tag `key` holds a rate (a CMC point, rank-k, mAP, an accuracy, or the spread of one)."""
    return key.startswith(CMC) or RATE_NAME.search(key) is not None


def shown(key: str, value: float) -> float:
    """The value MLflow shows under `key`: a rate (is_rate), a fraction here, in percent; anything else as it is.

    Four decimals of a percent are the six of a fraction that metrics.json keeps, without the float noise of the
    product (100 * 0.608565 = 60.856500000000004, which the runs list showed as "60.85650...")."""
    return round(100.0 * float(value), 4) if is_rate(key) else float(value)


def eval_metrics(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every figure and std of evaluation rows (metrics.json's `rows`, a grid result's: fractions) by its metric
    name, in percent (shown)."""
    return {(key := eval_metric(row, k)): shown(key, v) for row, values in rows.items() for k, v in values.items()
            if k not in ("row", "label")}


# MLflow's limits per log_batch call.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
PARAM_VALUE_CHARS = 6000  # the longest param value MLflow stores


def log_metrics(client: MlflowClient, run_id: str, metrics: list[Any]) -> None:
    """Every `mlflow.entities.Metric` of `metrics` to run `run_id`, in as few calls as MLflow allows."""
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """`params` (name: value) to run `run_id` in as few calls as MLflow allows, each value cut to its limit."""
    from mlflow.entities import Param

    logged = [Param(key, value[:PARAM_VALUE_CHARS]) for key, value in params.items()]
    for start in range(0, len(logged), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=logged[start:start + PARAMS_PER_BATCH])


ARTIFACTS_DIR = "mlartifacts"  # <project>/mlartifacts/<experiment>: the artifacts of the project's own store
# Where the project's sqlite store records a location (MLflow 3.17's schema): experiments, runs, logged models and
# model versions each keep an absolute file: URI, written when they were created.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                    ("model_versions", "source"))


def tracking_uri(project_dir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set (a team server), else the project's own sqlite registry, its artifact
    locations made the project's own first (relocate_artifacts: a copied or moved project)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    project = (project_dir or Path.cwd()).resolve()
    create_store(project / DEFAULT_DB, project / ".cache" / f"{DEFAULT_DB}.lock")
    relocate_artifacts(project / DEFAULT_DB, project / ARTIFACTS_DIR)
    return f"sqlite:///{project / DEFAULT_DB}"


CREATE_TIMEOUT_S = 600.0  # MLflow's ~50 migrations of a new store: seconds, a minute or more on 2 busy cores


def create_store(db: Path, lock: Path) -> bool:
    """Create MLflow's tables in the sqlite store `db` if it has none, one process at a time (an flock on `lock`);
    returns whether this call created them. Two processes opening a fresh store at once each ran MLflow's
    migrations on it, and one died (`duplicate column name: step`): now the first creates it while the others wait
    for it, then find it made. A store with tables is left as it is (MLflow checks its version on opening)."""
    import fcntl
    import time

    from tasks.infra.logs import quieted

    # Checked under the lock only: alembic writes its version after each migration, so a store half-way through its
    # creation already has one.
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    with lock.open("a") as fh:
        while True:  # non-blocking tries: a process stuck behind a dead holder still ends, at the deadline
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock}: another process has been creating {db} for "
                                       f"{CREATE_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        try:
            if _has_tables(db):
                return False
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            # The tracking store's migrations create the registry's tables too (one schema, one alembic history).
            with quieted("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
                SqlAlchemyStore(f"sqlite:///{db}", (db.parent / ARTIFACTS_DIR).resolve().as_uri())
            return True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _has_tables(db: Path) -> bool:
    """Whether `db` holds MLflow's tables (an alembic version): called under create_store's lock, where no one is
    half-way through creating them."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error:
        return True  # not a store this can read: MLflow, opening it next, says so in its own one-line error
    try:
        return bool(con.execute("SELECT version_num FROM alembic_version").fetchall())
    except sqlite3.OperationalError as exc:
        return "no such table" not in str(exc)  # anything else (not a database): left to MLflow's error
    except sqlite3.DatabaseError:
        return True
    finally:
        con.close()


# How long the entry points wait for a tracking server, a tracking database or a Prefect server before saying it does
# not answer (MLflow's client alone retries a dead server for minutes, with a traceback at the end).
SERVICE_TIMEOUT_S = 10.0
SERVER_SCHEMES = ("http://", "https://")
DATABASE_SCHEMES = ("postgresql", "mysql")


class ServiceUnreachable(Exception):
    """A tracking server, tracking database or Prefect server that is down or refuses us: one line naming it."""


def redact(uri: str) -> str:
    """`uri` with its password, if it holds one, written as ***: safe to print."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    except ValueError:
        return uri


def is_shared(uri: str) -> bool:
    """A tracking store other machines reach (a server or a database), not the project's own sqlite file."""
    return uri.startswith(SERVER_SCHEMES) or uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


def _http_check(url: str, what: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            raise ServiceUnreachable(f"{what} answers HTTP {resp.status} at {url}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ServiceUnreachable(f"{what} refuses the credentials (HTTP {exc.code})") from exc
        raise ServiceUnreachable(f"{what} answers HTTP {exc.code} at {url}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ServiceUnreachable(f"{what} gave no answer within {timeout:g} s") from exc
        raise ServiceUnreachable(f"{what} does not answer ({getattr(reason, 'strerror', None) or reason})") from exc
    except TimeoutError as exc:
        raise ServiceUnreachable(f"{what} gave no answer within {timeout:g} s") from exc
    except (OSError, ValueError) as exc:
        raise ServiceUnreachable(f"{what} does not answer ({exc})") from exc


def check_tracking(uri: str, timeout: float = SERVICE_TIMEOUT_S) -> None:
    """Raise ServiceUnreachable, naming `uri` (its password hidden), when the tracking server or database at `uri`
    is down, does not answer within `timeout` seconds or refuses the credentials; the project's own sqlite store
    is not checked (MLflow creates it)."""
    named = f"MLFLOW_TRACKING_URI={redact(uri)}"
    if uri.startswith(SERVER_SCHEMES):
        _http_check(uri.rstrip("/") + "/health", f"{named}: the tracking server", timeout)
    elif is_shared(uri):
        from sqlalchemy import create_engine
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.pool import NullPool

        try:
            engine = create_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": max(1, int(timeout))})
            with engine.connect():
                pass
        except ImportError as exc:
            raise ServiceUnreachable(f"{named}: no database driver for it is installed ({exc})") from exc
        except (SQLAlchemyError, ValueError) as exc:
            cause = str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["unknown error"]
            raise ServiceUnreachable(f"{named}: the tracking database refuses or does not answer: "
                                     f"{' '.join(cause[0].split())}") from exc


def check_prefect(api_url: str, timeout: float = SERVICE_TIMEOUT_S) -> None:
    """Raise ServiceUnreachable, naming `api_url`, when the Prefect server there is down or refuses us."""
    _http_check(api_url.rstrip("/") + "/health", f"PREFECT_API_URL={redact(api_url)}: the Prefect server", timeout)


def relocate_artifacts(db: Path, artifacts: Path) -> int:
    """Point every location the sqlite store `db` records inside another folder's `mlartifacts/` into
    `artifacts` instead; returns how many were changed (0: none pointed elsewhere, or no store yet).

    MLflow writes absolute file: URIs into its store (a relative location is resolved against the working folder
    when an experiment is created), so a project copied or moved with its `mlflow.db` and `mlartifacts/` read the
    first folder's artifacts, and a training in the copy wrote its pictures and model there. Run on each opening
    of the project's store, this makes the copy's store point at the copy's own files (copied with it) and its
    new runs log there; the original is never touched. Only locations in an `mlartifacts/` folder, where this
    project keeps its experiments' artifacts (mlflow_experiment_id), are moved."""
    import sqlite3

    if not db.is_file():
        return 0
    own = artifacts.resolve().as_uri() + "/"
    marker = f"/{ARTIFACTS_DIR}/"
    con = sqlite3.connect(db, timeout=60)
    try:
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError:
            return 0  # not a store this can read: MLflow, opening it next, says so in its own one-line error
        with con:  # one transaction: a reader sees the old locations or the new ones
            if "experiments" not in tables:  # a store MLflow has not created yet
                return 0
            found = [row[0] for row in con.execute(
                "SELECT artifact_location FROM experiments WHERE artifact_location LIKE 'file:%'") if row[0]]
            elsewhere = {loc[:loc.rfind(marker) + len(marker)] for loc in found if marker in loc} - {own}
            changed = 0
            for old in elsewhere:
                for table, column in LOCATION_COLUMNS:  # names from the tuple above, values as parameters
                    if table in tables:
                        changed += con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                               f"WHERE substr({column}, 1, ?) = ?",
                                               (own, len(old) + 1, len(old), old)).rowcount
    finally:
        con.close()
    return changed


def mlflow_experiment_id(client: MlflowClient, name: str, description: str, project_dir: Path | None = None,
                         views: dict[str, str] | None = None) -> str:
    """Id of experiment `name`, created with its artifacts under <project>/mlartifacts when new (on a shared store,
    the server's artifact root). It carries the experiment kind, `description` (what it holds) and the saved
    runs-list `views` (results_view): set at creation, and added to an existing experiment that lacks them (one made
    by an older version); a description or view someone edited in the UI is kept."""
    from mlflow.exceptions import MlflowException

    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: description, **(views or {})}
    found = client.get_experiment_by_name(name)
    if found is None:
        # A shared store's experiments keep their artifacts where its server does (a team's artifact root), where
        # every clone reads them; a folder of the clone that created the experiment is its own only.
        location = (None if is_shared(client.tracking_uri) else
                    ((project_dir or Path.cwd()) / ARTIFACTS_DIR / name).resolve().as_uri())
        try:
            return str(client.create_experiment(name, artifact_location=location, tags=tags))
        except MlflowException:  # another clone created it since get_experiment_by_name: use theirs
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    for key, value in tags.items():
        if key not in found.tags:
            client.set_experiment_tag(found.experiment_id, key, value)
    return str(found.experiment_id)


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
