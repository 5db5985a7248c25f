"""Settings every entry point (the `rain` CLI, the test suite) needs before Prefect, Ray, DVC or MLflow are
imported: pitfalls measured on this stack, and no telemetry from a laptop run."""

from __future__ import annotations

import os

QUIET_LOCAL = {
    # A fresh temporary Prefect server takes ~19 s to start on 2 cores; the default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",  # the registered model holds no pickle
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars, three log lines per artifact in a flow's log
}


def set_quiet_local_defaults() -> None:
    """Each setting of QUIET_LOCAL unless the user's environment sets it already."""
    for key, value in QUIET_LOCAL.items():
        os.environ.setdefault(key, value)
