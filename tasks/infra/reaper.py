"""Nothing a flow started outlives it: a watchdog process ends every descendant when the flow's process dies.

A killed flow (SIGKILL included) cannot clean up after itself, and what it started does not die with it: DVC,
the stage DVC runs, the Ray cluster the stage started, the temporary Prefect server. An orphaned training
goes on writing its outputs, and a re-run races it. `guard()` starts a watchdog (this module run as a
program) holding the read end of a pipe whose write end only the guarded process holds, and tags the
process's environment with the watchdog's id (`RAIN_GUARDS`, a list, so nested guards all see every
descendant). Every process started afterwards inherits the tag, however it daemonises or re-parents. When
the guarded process ends, in any way, the kernel closes the pipe; the watchdog then sends SIGTERM down the
tagged process trees, each process once its parent has gone (a stage marks its MLflow run KILLED and stops the
Ray cluster it started), then SIGTERM to every tagged process left, and after `GRACE_SECONDS` SIGKILL.

Finding the tagged processes reads `/proc/<pid>/environ` (Linux). Elsewhere, the process groups registered
with `register_group` (each stage's DVC runs in its own) are signalled instead. A process that clears its
environment on exec escapes the tag; none of the stack's processes does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = "RAIN_GUARDS"  # ":"-separated ids of the watchdogs guarding this process
GRACE_SECONDS = 10.0  # SIGTERM to SIGKILL: time for a stage to mark its MLflow run KILLED and stop Ray

HAS_PROC = Path("/proc/self/environ").exists()

_guard: tuple[str, int] | None = None  # (id, write end of the pipe) of this process's watchdog


def guard() -> str:
    """Start this process's watchdog (once) and tag the environment; returns the watchdog's id."""
    global _guard
    if _guard is not None and _guard[0] in os.environ.get(ENV, "").split(":"):
        return _guard[0]
    read_end, write_end = os.pipe()  # non-inheritable: only this process holds the write end
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "tasks.infra.reaper"], stdin=read_end, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,  # a terminal's Ctrl-C must not reach it first
        cwd=Path(__file__).resolve().parents[2])
    os.close(read_end)
    guard_id = f"{os.getpid()}-{watchdog.pid}"
    _guard = (guard_id, write_end)
    os.environ[ENV] = ":".join(filter(None, [os.environ.get(ENV, ""), guard_id]))
    return guard_id


def register_group(pgid: int) -> None:
    """Also end process group `pgid` when this process dies (the sweep where /proc is missing)."""
    if _guard is not None:
        os.write(_guard[1], f"{pgid}\n".encode())


def tagged(guard_id: str) -> list[int]:
    """Live processes (other than this one) whose environment carries `guard_id`; [] without /proc."""
    found = []
    needle = f"{ENV}=".encode()
    for entry in Path("/proc").iterdir() if HAS_PROC else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        for var in environ.split(b"\0"):
            if var.startswith(needle) and guard_id in var[len(needle):].decode(errors="replace").split(":"):
                found.append(int(entry.name))
    return found


def end_group(pgid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM process group `pgid`, then SIGKILL it if anything is left after `grace` seconds."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def sweep(guard_id: str, groups: list[int], grace: float = GRACE_SECONDS) -> None:
    """End everything tagged `guard_id`, and the `groups`: first SIGTERM from the top of the tagged trees down
    (`_cascade`), so that each process shuts down what it started while that is still running, as the train
    stage marks its MLflow run and stops its Ray cluster; then SIGTERM to whatever is left and SIGKILL `grace`
    seconds later. Repeated until nothing is found: a dying process may have started another."""
    for _ in range(5):
        groups = [g for g in groups if group_alive(g)]
        if not tagged(guard_id) and not groups:
            return
        _cascade(guard_id, grace)
        pids = tagged(guard_id)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                _signal(pid, sig)
            for pgid in groups:
                _signal_group(pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (any(map(alive, pids)) or any(map(group_alive, groups))):
                time.sleep(0.1)


def _cascade(guard_id: str, grace: float) -> None:
    """SIGTERM each tagged process once its parent is gone or untagged, until none is left or none has become
    a root for `grace` seconds. A parent that dies without passing the signal on (DVC does, on SIGTERM) makes
    its child a root at the next look, so the train stage still gets its SIGTERM before its Ray workers do;
    signalling every process at once would take Ray down under the stage while it records the kill."""
    signalled: set[int] = set()
    last_new = started = time.monotonic()
    while time.monotonic() - last_new < grace and time.monotonic() - started < 3 * grace:
        pids = set(tagged(guard_id))
        if not pids:
            return
        for pid in sorted(p for p in pids - signalled if _parent(p) not in pids):
            _signal(pid, signal.SIGTERM)
            signalled.add(pid)
            last_new = time.monotonic()
        time.sleep(0.2)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...); [] if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already, or not ours
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"  # a zombie has ended; its parent reaps it


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. `killpg(pgid, 0)` also finds zombies: a group whose leader is
    our own child, ended but not yet reaped, would look alive for the whole grace period (30 s of every server
    stopped by end_group)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":  # state, parent, process group
            return True
    return False


def main() -> None:
    """The watchdog: read group ids until the guarded process's end closes the pipe, then sweep."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard_id = f"{os.getppid()}-{os.getpid()}"
    groups = [int(line) for line in sys.stdin.buffer if line.strip().isdigit()]
    sweep(guard_id, [] if HAS_PROC else groups)  # the tags find every group member, in a better order


if __name__ == "__main__":
    main()
