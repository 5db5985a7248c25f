"""Joining a Ray cluster: a real one (RAY_ADDRESS / ray.address) or an embedded local one on loopback."""

from __future__ import annotations

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
        # The dashboard (Train's state API needs it) stays on loopback too.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
