"""Joining a Ray cluster: a real one (RAY_ADDRESS / ray.address) or an embedded local one on loopback."""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None) -> None:
    """`ray.init` once per process. With no address, start an embedded cluster bound to 127.0.0.1 only.

    Ray resolves 127.0.0.1 to the machine's routable IP and then listens on it; its single-machine
    mode (the env flag below, read when `ray` is imported) keeps every Ray server on loopback, which is
    what a laptop run wants. A multi-node run passes the head's address instead.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Every ray.train.report waits for the controller's next poll (2 s by default): per epoch that
        # is pure overhead on short epochs. The embedded cluster's processes inherit this environment.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        log.info("ray: joining the cluster at %s", address)
        ray.init(address=address)
    else:
        # "local": a cluster of this process's own. With no address, ray.init joins the last cluster that `ray start`
        # (or ray.cluster_utils) started on the machine, whoever's it is and however long it lives. The dashboard
        # (Train's state API needs it) stays on loopback too.
        # Ray turns token authentication on for a new local cluster and says so at WARNING ("... Set
        # RAY_AUTH_MODE=disabled to opt out"): wanted here, nothing to act on. Setting RAY_AUTH_MODE=token ourselves
        # would silence it too, but only before `ray` is first imported: a process that imported it earlier keeps
        # 'disabled' in Ray's cached config while its cluster's GCS wants the token, and refuses its own driver.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def disconnect() -> None:
    """`ray.shutdown()`, after freeing the object references nothing holds any more: a reference freed
    after shutdown (at the next collection, or in the interpreter's teardown) calls into the core worker
    that shutdown destroyed (ray-project/ray#31145, and the segfault at exit that CI saw once)."""
    import ray

    gc.collect()
    ray.shutdown()


class NotEnoughResources(RuntimeError):
    """The Ray cluster cannot ever place what was asked for (Ray would wait for it forever)."""


def require_resources(workers: int, cpus: float, gpus: float, asked_by: str) -> None:
    """Fail at once unless the connected cluster can run `workers` tasks of `cpus` CPUs and `gpus` GPUs at the
    same time, each on one node. `asked_by` names the settings that asked. Measured on the cluster as it is
    now: an autoscaling cluster must be scaled up first."""
    import ray

    nodes: list[dict[str, float]] = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpus, total_gpus = (sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU"))
    fits_a_node = any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes)
    if workers * cpus > total_cpus or workers * gpus > total_gpus or not fits_a_node:
        largest: dict[str, float] = max(nodes, key=lambda n: n.get("CPU", 0.0), default={})
        raise NotEnoughResources(
            f"{asked_by}: {workers} x ({cpus:g} CPU, {gpus:g} GPU) requested, but the Ray cluster has "
            f"{total_cpus:g} CPUs and {total_gpus:g} GPUs on {len(nodes)} node(s) (largest node: "
            f"{largest.get('CPU', 0.0):g} CPUs, {largest.get('GPU', 0.0):g} GPUs)")
