"""Move the `champion` alias to a model version, only if it is at least as good as the current champion.

The gate: a version may become champion when it was measured on the same dataset, with the same
protocol and on the same evaluation images (tags `dataset`, `protocol`, `eval_set`, written by the
register stage) as the current champion, and its LR rank-1 (tag `lr_rank1`) is at least the champion's. With no
champion yet, any version that carries those tags and a rank-1 may become champion. A version registered
before the figures were named for the LR queries carries `rank1` (`mAP`, ...) instead, the same figure: the
gate and the listing read it under the new name (`LEGACY_FIGURES`), so an older champion is still compared. The
figures are in percent (tag `figures_unit`); a version registered without that tag holds fractions, read x 100.
`force_reason` overrides the gate; the reason is recorded on the version (tag `promotion_force_reason`, with the gate
verdict it overrode in `promotion_gate_verdict`), until the version is promoted again through the gate.

Races. MLflow has no compare-and-set on aliases: two promoters that both read "champion = v1", then
both set it, leave the alias wherever the slower one put it, whatever the gate said. So the whole
read-check-write runs under two locks, taken in this order:

1. a host lock: an OS advisory lock (``fcntl.flock``) on a file next to the sqlite database
   (``mlflow.db.promote.lock``), or under the project's ``.cache/`` for a remote tracking server. The
   kernel releases it when its holder exits, however it exits.
2. a registry lock: a registered model named ``<model>.promotion-lock``, created to acquire and deleted
   to release. Creating a registered model whose name exists fails (a unique key in the tracking
   server's database), so among promoters on different machines sharing one tracking server exactly
   one create succeeds: that is the compare-and-set the alias API lacks.

Limits (remote tracking servers): the registry lock is only as strong as the server's uniqueness check
(true of the SQL stores; a registry that allows duplicate names would not exclude). If a holder dies
without releasing it (killed, machine lost), the lock stays: promoters on its own host remove it once
its process is gone (safe, since they hold the host lock); promoters elsewhere wait `lock_timeout_s`,
then fail naming the holder, and `rain promote --break-lock` removes it by hand (only when you know the
holder is gone). Anyone who sets the alias without this module (the MLflow UI, another script) bypasses
both locks and the gate. The host lock needs a local file system with working ``flock`` (not NFS
without lock support; POSIX only).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.config import CHAMPION, PROMOTED_ALIASES
from tasks.infra.tracking import FIGURES_UNIT, HEADLINE_ROW, PERCENT, figure_name, shown

log = logging.getLogger(__name__)

GATE_TAGS = ("dataset", "protocol", "eval_set")
# The LR queries' figures the gate compares (rank-1) and the listing shows, as the register stage tags them.
RANK1, RANK1_STD, MAP = (figure_name(HEADLINE_ROW, m) for m in ("rank1", "rank1_std", "mAP"))
LOCK_SUFFIX = ".promotion-lock"
# What a forced promotion records on the version (its reason, and the gate's verdict it overrode).
FORCE_TAGS = ("promotion_force_reason", "promotion_gate_verdict")
LIST_TAGS = (RANK1, RANK1_STD, MAP, "dataset", "protocol", "eval_set", "promotion_force_reason")
# The register stage's figure tags before they were named for the LR queries (a registry written then holds
# them): a fixed record of those names, not derived from today's metric list. Read as the new names when absent.
LEGACY_FIGURES = {figure_name(HEADLINE_ROW, old): old for old in ("rank1", "rank1_std", "rank5", "rank10",
                                                                  "rank20", "mAP")}


class PromotionError(RuntimeError):
    """The promotion could not be attempted (unknown version, lock not acquired); the message says why."""


class LockTimeout(PromotionError):
    """Another promotion holds the lock and did not release it in time."""


class InvalidRequest(PromotionError, ValueError):
    """A request no registry could answer (a model name with '/', a version that is no number)."""


def check_model_name(name: str) -> None:
    """A registered model's name as the register stage allows it (register.model_name): MLflow takes a '/' for a
    path and fails with a traceback."""
    if not name.strip() or "/" in name:
        raise InvalidRequest(f"model name {name!r}: expected a registered model name, non-empty and without '/'")


def check_version(version: str) -> None:
    """A model version is a number (an empty one once promoted the `candidate`)."""
    if not version.isdecimal() or not version.isascii():
        raise InvalidRequest(f"version {version!r}: expected a model version number, such as 3 (or none for the "
                             f"version with alias `candidate`)")


@dataclass(frozen=True)
class PromoteRequest:
    model_name: str = "rain-reid"
    version: str | None = None  # None: the version alias `from_alias` points at
    from_alias: str = "candidate"
    alias: str = CHAMPION
    force_reason: str | None = None  # set: promote even if the gate refuses, recording why
    lock_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_model_name(self.model_name)
        if self.version is not None:
            check_version(self.version)
        if self.alias not in PROMOTED_ALIASES:  # the set RegisterConfig refuses: one list of gated aliases
            raise InvalidRequest(f"alias {self.alias!r}: `rain promote` moves only {', '.join(PROMOTED_ALIASES)}")
        if self.force_reason is not None and not self.force_reason.strip():
            raise InvalidRequest("a forced promotion needs a non-empty reason")
        if not (0 <= self.lock_timeout_s < math.inf):
            raise InvalidRequest(f"lock timeout {self.lock_timeout_s}: expected seconds >= 0")


@dataclass(frozen=True)
class Decision:
    accepted: bool
    version: str
    previous: str | None  # the champion before this call (None: there was none)
    reason: str  # the gate's verdict, in words
    forced: bool = False


def version_tags(tags: dict[str, str]) -> dict[str, str]:
    """A version's tags with each figure under its current name, also where an older register stage wrote it
    under its legacy one (LEGACY_FIGURES; a tag under the current name wins), and in percent, also where an older
    register stage wrote fractions (no FIGURES_UNIT tag)."""
    named = {new: tags[old] for new, old in LEGACY_FIGURES.items() if old in tags} | tags
    if named.get(FIGURES_UNIT) == PERCENT:
        return named
    in_percent = {k: f"{shown(k, float(named[k])):.4f}" for k in LEGACY_FIGURES if _number(named.get(k))}
    return named | in_percent | {FIGURES_UNIT: PERCENT}


def _number(text: str | None) -> bool:
    """Whether a tag's value reads as a number (a tag edited by hand in the UI may not: it is left as it is)."""
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def gate(candidate: dict[str, str], champion: dict[str, str] | None) -> tuple[bool, str]:
    """(passes, why) for tags of a candidate version against the current champion's (None: no champion)."""
    candidate = version_tags(candidate)
    champion = None if champion is None else version_tags(champion)
    missing = [k for k in (*GATE_TAGS, RANK1) if k not in candidate]
    if missing:
        return False, f"the version lacks the tags {missing} (not registered by the register stage?)"
    rank1 = float(candidate[RANK1])
    if champion is None:
        return True, f"no champion yet; rank-1 {rank1:.2f}%"
    differ = [k for k in GATE_TAGS if champion.get(k) != candidate[k]]
    if differ:
        details = "; ".join(f"{k}: {candidate[k]!r} vs champion's {champion.get(k)!r}" for k in differ)
        return False, f"not comparable with the champion, measured differently ({details})"
    if RANK1 not in champion:
        return False, (f"the champion lacks the tag {RANK1!r} (nor the older {LEGACY_FIGURES[RANK1]!r}), so there is "
                       f"no rank-1 to beat; promote with --force and a reason")
    best = float(champion[RANK1])
    if rank1 >= best:
        return True, f"rank-1 {rank1:.2f}% >= champion's {best:.2f}%"
    return False, f"rank-1 {rank1:.2f}% < champion's {best:.2f}%"


def promote(client: Any, request: PromoteRequest, host_lock: Path) -> Decision:
    """Gate and move `request.alias` under both locks (module docstring). Raises PromotionError."""
    from mlflow.exceptions import MlflowException

    with file_lock(host_lock, request.lock_timeout_s), \
            registry_lock(client, request.model_name, request.lock_timeout_s):
        try:
            aliases = dict(client.get_registered_model(request.model_name).aliases)
        except MlflowException as exc:
            raise PromotionError(f"no registered model {request.model_name!r}: {exc.message}") from exc
        version = request.version or _alias_version(aliases, request.from_alias, request.model_name)
        try:
            candidate = client.get_model_version(request.model_name, version)
        except MlflowException as exc:
            raise PromotionError(f"{request.model_name} has no version {version!r}") from exc
        previous = str(aliases[request.alias]) if request.alias in aliases else None
        if previous == str(candidate.version):
            return Decision(True, previous, previous, f"version {previous} is already {request.alias}")
        champion_tags = dict(client.get_model_version(request.model_name, previous).tags) if previous else None
        passes, why = gate(dict(candidate.tags), champion_tags)
        forced = not passes and request.force_reason is not None
        if not passes and not forced:
            return Decision(False, str(candidate.version), previous, why)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        tags = {"promoted_at": stamp, "promoted_over": previous or "none"}
        if forced:
            assert request.force_reason is not None
            tags |= {"promotion_force_reason": request.force_reason, "promotion_gate_verdict": why}
        for key, value in tags.items():
            client.set_model_version_tag(request.model_name, candidate.version, key, value)
        if not forced:  # through the gate now: a reason left by an earlier forced promotion no longer holds
            for key in FORCE_TAGS:
                if key in candidate.tags:
                    client.delete_model_version_tag(request.model_name, candidate.version, key)
        client.set_registered_model_alias(request.model_name, request.alias, candidate.version)
        # Read back: a writer that bypassed the locks (UI, another tool) would show up here.
        now = client.get_registered_model(request.model_name).aliases.get(request.alias)
        if str(now) != str(candidate.version):
            raise PromotionError(f"{request.alias} points at version {now} right after being set to "
                                 f"{candidate.version}: someone moved it without `rain promote`")
        log.info("promote: %s version %s is %s (was %s)%s", request.model_name, candidate.version,
                 request.alias, previous, " [forced]" if forced else "")
        return Decision(True, str(candidate.version), previous, why, forced)


def _alias_version(aliases: dict[str, Any], alias: str, name: str) -> str:
    if alias not in aliases:
        raise PromotionError(f"{name} has no version with alias {alias!r}; name a version")
    return str(aliases[alias])


def list_versions(client: Any, model_name: str) -> list[dict[str, str]]:
    """One row per version, newest first: version, aliases, metrics and how they were measured."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = dict(client.get_registered_model(model_name).aliases)
    except MlflowException as exc:
        raise PromotionError(f"no registered model {model_name!r}: {exc.message}") from exc
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    # search_model_versions leaves `aliases` empty on the sqlite store; the registered model has them.
    versions = client.search_model_versions(f"name='{model_name}'")
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        row = {"version": str(mv.version), "aliases": ", ".join(sorted(by_version.get(str(mv.version), []))),
               "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")}
        tags = version_tags(dict(mv.tags))
        rows.append(row | {k: tags.get(k, "") for k in LIST_TAGS})
    return rows


def host_lock_path(tracking_uri: str, project_dir: Path) -> Path:
    """Next to the sqlite database when there is one (every local user of it sees the same file)."""
    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).resolve()
        return db.with_name(db.name + ".promote.lock")
    return project_dir / ".cache" / "promote.lock"


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.1) -> Iterator[None]:
    """Exclusive ``flock`` on `path`, waiting up to `timeout_s`; the kernel drops it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with path.open("a") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"another promotion on this machine holds {path} "
                                      f"(waited {timeout_s:.0f} s)") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def registry_lock(client: Any, model_name: str, timeout_s: float, poll_s: float = 0.2) -> Iterator[str]:
    """Hold the registered model `<model_name>.promotion-lock` (module docstring); yields its token.

    Call it under the host lock: breaking the lock of a dead process on this host is then race-free.
    """
    from mlflow.exceptions import MlflowException

    name = model_name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    holder = {"token": token, "host": socket.gethostname(), "pid": str(os.getpid()),
              "acquired_at": datetime.now(UTC).isoformat(timespec="seconds")}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(name, tags=holder, description=(
                f"Held by `rain promote` on {holder['host']} (pid {holder['pid']}) while it moves an alias "
                f"of {model_name}; deleted when it is done."))
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            # RESOURCE_DOES_NOT_EXIST: the holder released between our create and MLflow's re-read.
        other = _lock_holder(client, name)
        if other and other.get("host") == holder["host"] and not _pid_alive(int(other.get("pid", "0") or 0)):
            log.warning("promote: removing the lock left by dead process %s on this host", other.get("pid"))
            _delete_if_token(client, name, other.get("token"))
            continue
        if time.monotonic() >= deadline:
            raise LockTimeout(f"registered model {name!r} is held by {other or 'someone'}; if that process is "
                              f"gone, run `rain promote --break-lock`")
        time.sleep(poll_s)
    try:
        yield token
    finally:
        _delete_if_token(client, name, token)


def _lock_holder(client: Any, name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).tags)
    except MlflowException:
        return None


def _delete_if_token(client: Any, name: str, token: str | None) -> bool:
    """Delete the lock only if it is still the one with `token` (never a newer holder's)."""
    from mlflow.exceptions import MlflowException

    holder = _lock_holder(client, name)
    if holder is None or holder.get("token") != token:
        return False
    try:
        client.delete_registered_model(name)
    except MlflowException:
        return False
    return True


def break_lock(client: Any, model_name: str) -> dict[str, str] | None:
    """Remove a promotion lock left behind (its holder's tags, or None if there was none)."""
    holder = _lock_holder(client, model_name + LOCK_SUFFIX)
    if holder is not None:
        _delete_if_token(client, model_name + LOCK_SUFFIX, holder.get("token"))
    return holder
