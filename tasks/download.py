"""Stage `download`: fill data/raw/<dataset>/ from the dataset's source (or generate the synthetic one).

The raw folder is the stage's DVC output, so DVC caches it and restores it instead of downloading again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.config import Params, load_params
from tasks.datasets import get_adapter
from tasks.datasets.acquire import RetriesExhausted
from tasks.infra.logs import setup_logging

log = logging.getLogger(__name__)

# The one failure worth retrying later; the Prefect flow looks for this line in the stage's output
# (DVC does not pass a command's exit code on, so the verdict travels as text).
TRANSIENT_MARKER = "rain-download: transient failure, retry later"


def run(params: Params, raw_dir: Path) -> None:
    adapter = get_adapter(params.dataset.name)
    # A half-filled folder from an interrupted run must not survive into the DVC output.
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    raw_dir.mkdir(parents=True)
    adapter.acquire(raw_dir, params)
    log.info("download: %s ready in %s", params.dataset.name, raw_dir)


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        run(params, params.raw_dir())
    except RetriesExhausted as exc:
        log.error("%s: %s", TRANSIENT_MARKER, exc)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
