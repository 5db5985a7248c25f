"""A bad input to any `rain` command ends with one line on stderr naming it, and a non-zero exit: no traceback
(issue 28, item 6). Each case below was a traceback of 50 to 1,110 lines.

Through typer's CliRunner, as tests/test_cli.py: an exception that escapes the command would show as
`result.exception` (the runner catches it), so each test also asserts that none did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.micro_project import REPO


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command points MLflow at its project (`set_tracking_uri`, which also sets MLFLOW_TRACKING_URI): put
    both back after each test, so no test reads another's registry."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # recorded as absent, restored so after the test
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def one_line_error(result: Any) -> str:
    """The command's one line on stderr, after asserting it failed with nothing else there and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def _params(project: Path, text: str) -> Path:
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
    return project


def _nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


@pytest.mark.parametrize(("case", "edit", "phrase"), [
    ("a byte that is not UTF-8 in a comment",  # 50 lines of UnicodeDecodeError
     lambda text: text.encode() + b"# caf\xe9\n", "byte 0xe9 is not UTF-8"),
    ("train.trials nested 3,000 deep",  # 1,110 lines of RecursionError
     lambda text: text.replace("  trials: [0]", f"  trials: {_nested(3000)}", 1).encode(),
     "nested deeper than 16 levels"),
])
def test_a_params_yaml_yaml_cannot_build_is_one_line(tmp_path: Path, case: str, edit: Any, phrase: str) -> None:
    text = (REPO / "params.yaml").read_text()
    edited = edit(text)
    assert edited != text.encode(), "the edit found nothing to change"
    (tmp_path / "params.yaml").write_bytes(edited)
    line = one_line_error(CliRunner().invoke(app, ["run", "--project", str(tmp_path)]))
    assert line.startswith(f"error: {tmp_path / 'params.yaml'}: line ") and phrase in line, line


def test_a_billion_laughs_params_yaml_is_refused_before_yaml_expands_it(tmp_path: Path) -> None:
    # Issue 28, item 7: `rain run` refused it in 0.3 s, `dvc status` held 3.4 GB after 120 s; every entry point
    # that reads params.yaml (each stage, each flow, `rain preset`) reads it through read_params_text.
    import time

    from tasks.config import ParamsError, load_params
    from tasks.infra.presets import write

    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + "\nlaughs:\n" + "".join(f"  {line}\n" for line in laughs))
    started = time.monotonic()
    with pytest.raises(ParamsError, match=r"params\.yaml: line \d+: alias \*a0: params\.yaml takes no aliases"):
        load_params(path)
    with pytest.raises(ParamsError, match=r"alias \*a0"):
        write(path, "paper")  # a preset is applied to the file's text before load_params reads it
    assert time.monotonic() - started < 5
    line = one_line_error(CliRunner().invoke(app, ["run", "--project", str(tmp_path), "--preset", "paper"]))
    assert "alias *a0" in line, line


def test_experiments_refuses_a_negative_seed_naming_it(tmp_path: Path) -> None:  # 190 lines
    project = _params(tmp_path / "p", (REPO / "params.yaml").read_text())
    line = one_line_error(CliRunner().invoke(app, ["experiments", "--project", str(project), "--seed", "-1"]))
    assert line == "error: --seed -1: expected a seed in [0, 2**63)", line


@pytest.mark.parametrize(("args", "phrase"), [
    (["--model", "a/b"], "model name 'a/b'"),  # 116 lines
    (["--model", "a/b", "--list"], "model name 'a/b'"),
    ([""], "version ''"),  # issue 28, item 8: promoted the `candidate`
    (["three"], "version 'three'"),
])
def test_promote_refuses_a_name_or_version_mlflow_cannot_take(tmp_path: Path, args: list[str], phrase: str) -> None:
    line = one_line_error(CliRunner().invoke(app, ["promote", "--project", str(tmp_path), *args]))
    assert line.startswith("error: ") and phrase in line, line
    assert not (tmp_path / "mlflow.db").exists()  # refused before any registry was opened


def test_promote_list_on_a_corrupt_registry_is_one_line(tmp_path: Path) -> None:  # 261 lines
    (tmp_path / "mlflow.db").write_bytes(b"this is no sqlite database " * 400)
    line = one_line_error(CliRunner().invoke(app, ["promote", "--project", str(tmp_path), "--list"]))
    assert line.startswith(f"error: sqlite:///{tmp_path / 'mlflow.db'}: ") and "not a database" in line, line


def _gallery(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    Image.new("RGB", (32, 64), (10, 20, 30)).save(gallery / "0001_a.png")
    return gallery, gallery / "0001_a.png"


def test_search_with_a_version_that_does_not_exist_is_one_line(tmp_path: Path) -> None:  # 181 lines
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_registered_model("rain-reid")
    gallery, query = _gallery(tmp_path)
    line = one_line_error(CliRunner().invoke(app, [
        "search", "--project", str(tmp_path), "--model", "models:/rain-reid/99", "--gallery", str(gallery),
        "--query", str(query), "--out", str(tmp_path / "page.html")]))
    assert line.startswith("error: model models:/rain-reid/99: ") and "99" in line[30:], line


def test_search_with_a_cache_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:  # 75 lines
    gallery, query = _gallery(tmp_path)
    cache = tmp_path / "cache"
    cache.write_text("a file")
    line = one_line_error(CliRunner().invoke(app, [
        "search", "--project", str(tmp_path), "--model", "models:/rain-reid/1", "--gallery", str(gallery),
        "--query", str(query), "--out", str(tmp_path / "page.html"), "--cache-dir", str(cache)]))
    assert line == f"error: --cache-dir {cache}: a file, not a folder", line
    line = one_line_error(CliRunner().invoke(app, [
        "search", "--project", str(tmp_path), "--model", "models:/rain-reid/1", "--gallery", str(gallery),
        "--query", str(query), "--out", str(tmp_path / "page.html"), "--cache-dir", str(cache / "below")]))
    assert line == f"error: --cache-dir {cache / 'below'}: not a folder that can be made (Not a directory)", line


@pytest.mark.parametrize(("option", "value", "expected"), [("--port", "70000", "1..65535"), ("--port", "0", "1..65535"),
                                                           ("--max-connections", "0", ">= 1")])
def test_serve_model_refuses_a_port_or_limit_out_of_range(tmp_path: Path, option: str, value: str,
                                                          expected: str) -> None:  # 99 lines
    line = one_line_error(CliRunner().invoke(app, ["serve-model", "--project", str(tmp_path), option, value]))
    assert line == f"error: {option} {value}: expected {expected}", line


def test_the_repository_params_pass_the_file_checks() -> None:
    from tasks.config import PARAMS_MAX_BYTES, PARAMS_MAX_DEPTH, read_params_text

    text = read_params_text(REPO / "params.yaml")
    assert len(text.encode()) < PARAMS_MAX_BYTES // 10
    assert yaml.safe_load(text) and PARAMS_MAX_DEPTH > 3
