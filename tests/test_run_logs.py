"""Each flow run writes its stages' logs into a folder of its own, `<paths.logs>/<start>/`, even when two runs
start in the same second (issue 28, item 8: two `rain run` started together wrote into one folder)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from tests.micro_project import REPO

SAME_SECOND = """
import sys, time
from pathlib import Path
from tasks.infra.logs import new_run_folder

logs, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print(new_run_folder(logs, "20260101-120000"))
"""


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path: Path) -> None:
    logs, go = tmp_path / "logs", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SAME_SECOND, str(logs), str(go)], stdout=subprocess.PIPE,
                              text=True, env={"PYTHONPATH": str(REPO)}) for _ in range(4)]
    go.touch()
    folders = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(folders) == [str(logs / name) for name in ("20260101-120000", "20260101-120000-2",
                                                             "20260101-120000-3", "20260101-120000-4")]
    assert all(Path(f).is_dir() for f in folders)


def test_both_flows_take_their_log_folder_from_new_run_folder() -> None:
    from flows import grid, pipeline

    for flow in (pipeline.rain, grid.experiments):
        source = inspect.getsource(flow.fn)
        assert "new_run_folder(root / params.paths.logs)" in source, flow.name
        assert 'strftime("%Y%m%d-%H%M%S")' not in source, flow.name  # a folder named by the second alone
