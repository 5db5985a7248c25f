"""ONNX in the registry (issue 29, item 3), against a real sqlite registry of its own (no trained project: a micro
RAIN with its initial weights, registered by the real register stage, which exports it once for the module).

The export is logged on the same model version as the pyfunc, in MLflow's onnx flavor with its signature; it gives
PyTorch's v within 1e-4 (fp32) at batch sizes it was not traced with; `rain search` and `rain serve-model` with
`--runtime onnx` rank and embed as with `--runtime torch`; a bad runtime, a version without an export and an export
that fails are each one line, and the failed export leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.trained_project import tracking

pytestmark = pytest.mark.e2e

TOLERANCE = 1e-4  # the parity: max abs difference of v, fp32
LEGACY_ALIAS = "legacy"  # a version registered without the ONNX export


@dataclass(frozen=True)
class Registry:
    root: Path  # the project folder: its mlflow.db is the registry `rain ... --project root` reads
    params: Any
    name: str
    version: str  # registered by the register stage, with its ONNX export
    legacy: str  # registered without one
    weights: Path
    run_id: str


def _stage_inputs(root: Path, params: Any, run_id: str) -> Path:
    """The files the register stage reads, around a micro RAIN's initial weights; returns the weights."""
    import torch
    from safetensors.torch import save_file

    from rain_model.metrics import METRIC_KEYS
    from rain_model.network import RAIN

    model_dir, report_dir = root / "models", root / "reports"
    model_dir.mkdir()
    report_dir.mkdir()
    torch.manual_seed(0)
    weights = model_dir / "trial-0.safetensors"
    save_file(RAIN(params.model, 4).state_dict(), str(weights))
    (model_dir / "train.json").write_text(json.dumps(
        {"trials": {"0": {"weights": weights.name, "mlflow_run_id": run_id, "num_classes": 4}}}))
    figures = {k: 0.5 for k in METRIC_KEYS} | {"rank1_std": 0.01}
    (report_dir / "metrics.json").write_text(json.dumps({"rows": {"lr": figures}, "trials": 1, "gallery_draws": 1}))
    for file in ("hr.parquet", "mlr.parquet", "params.yaml"):
        (root / file).write_text(file)
    return weights


def _register(params: Any, root: Path) -> dict[str, Any]:
    from tasks import register

    return register.run(params, root / "models", root / "reports", root / "mlr.parquet", root / "params.yaml",
                        manifest_path=root / "hr.parquet", lock_file=root / "dvc.lock")


def _register_without_onnx(params: Any, weights: Path, run_id: str, client: Any) -> str:
    """A version as the register stage logged them before the export: the pyfunc alone, taking no runtime."""
    import mlflow

    from tasks import register

    settings = register.model_settings(params, 4, None)
    del settings["onnx"]
    config = weights.parent / "legacy.json"
    config.write_text(json.dumps(settings))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="legacy", python_model=str(register.PACKAGE_ROOT / "tasks" / "registry" / "pyfunc_model.py"),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(register.PACKAGE_ROOT / "rain_model"), str(register.PACKAGE_ROOT / "tasks")])
    version = str(mlflow.register_model(info.model_uri, params.register.model_name).version)
    client.set_registered_model_alias(params.register.model_name, LEGACY_ALIAS, version)
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils

    from tests.micro_project import micro_params

    root = tmp_path_factory.mktemp("onnx")
    params = micro_params({"register": {"model_name": f"onnx-{uuid.uuid4().hex[:8]}"}, "evaluate": {"flip": True}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "_tracking_uri", None)
        mp.setenv("MLFLOW_TRACKING_URI", tracking(root))
        client = MlflowClient(tracking(root))
        run_id = client.create_run(client.create_experiment("onnx")).info.run_id
        client.log_metric(run_id, "epoch/L_tri", 0.3, step=1)
        weights = _stage_inputs(root, params, run_id)
        version = str(_register(params, root)["version"])
        legacy = _register_without_onnx(params, weights, run_id, client)
        yield Registry(root, params, params.register.model_name, version, legacy, weights, run_id)


@pytest.fixture(scope="module")
def model_files(registry: Registry) -> Path:
    """The registered version's model folder, downloaded."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"models:/{registry.name}/{registry.version}"))


def test_the_register_stage_logs_the_onnx_model_on_the_same_model_version(registry: Registry,
                                                                          model_files: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking(registry.root))
    version = client.get_model_version(registry.name, registry.version)
    mlmodel = yaml.safe_load((model_files / "MLmodel").read_text())
    assert "onnx" in mlmodel["flavors"]["python_function"]["artifacts"]  # an artifact of the version's own model
    flavor = yaml.safe_load((model_files / "artifacts/onnx/MLmodel").read_text())
    assert "onnx" in flavor["flavors"] and (model_files / "artifacts/onnx/model.onnx").stat().st_size > 0
    inputs = json.loads(flavor["signature"]["inputs"])
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 64, 32]},
                       "name": "images"}]
    assert json.loads(flavor["signature"]["outputs"])[0]["name"] == "v"
    assert 0 <= float(version.tags["onnx_max_abs_diff"]) <= TOLERANCE
    assert int(version.tags["onnx_opset"]) >= 17
    settings = json.loads((model_files / "artifacts/model.json").read_text())
    assert settings["onnx"]["artifact"] == "onnx/model.onnx" and settings["onnx"]["input"] == "images"
    registration = json.loads((registry.root / "reports/registration.json").read_text())
    assert registration["tags"]["onnx_opset"] == version.tags["onnx_opset"]


def test_the_onnx_model_gives_pytorchs_v_within_1e_4_at_two_batch_sizes(registry: Registry,
                                                                        model_files: Path) -> None:
    import torch

    from tasks.registry.embed import load_model
    from tasks.registry.onnx_model import EmbeddingNet, run_session, session

    sess = session(model_files / "artifacts/onnx/model.onnx")  # exported once, at the register stage
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    net = EmbeddingNet(load_model(registry.weights, registry.params.model, 4), flip=True).eval()
    generator = torch.Generator().manual_seed(1)
    for batch in (3, 8):  # neither is the batch it was traced with (2)
        images = torch.rand(batch, 3, 64, 32, generator=generator)
        with torch.inference_mode():
            v_torch = net(images)
        v_onnx = run_session(sess, images)
        assert v_onnx.shape == v_torch.shape == (batch, 256)
        assert float(v_torch.std(dim=0).max()) > 1e-3  # images that differ get v that differ: a real comparison
        assert float((v_onnx - v_torch).abs().max()) <= TOLERANCE


def _png(path: Path, colours: tuple[tuple[int, int, int], ...], size: tuple[int, int] = (32, 64)) -> None:
    """A person-shaped crop in horizontal bands of `colours` (width, height = `size`)."""
    from PIL import Image

    img = Image.new("RGB", size)
    band = size[1] // len(colours)
    for i, colour in enumerate(colours):
        img.paste(colour, (0, i * band, size[0], size[1] if i == len(colours) - 1 else (i + 1) * band))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _gallery(folder: Path) -> tuple[Path, list[Path]]:
    """Eight identities in the gallery; queries are two of them at a quarter of the resolution."""
    rng = np.random.default_rng(0)
    people = [tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3)) for _ in range(8)]
    for pid, colours in enumerate(people):
        _png(folder / "gallery" / f"{pid:04d}_c1.png", colours)
    queries = []
    for pid in (2, 5):
        queries.append(folder / "queries" / f"{pid:04d}_c2.png")
        _png(queries[-1], people[pid], size=(8, 16))
    return folder / "gallery", queries


def _ranking(page: Path) -> dict[str, list[tuple[str, float]]]:
    """Query file name -> [(gallery file name, distance)] in rank order, as the page shows them."""
    out = {}
    for query, body in re.findall(r'<section class="query-result" data-query="([^"]+)">(.*?)</section>',
                                  page.read_text(), re.S):
        out[Path(query).name] = [(Path(p).name, float(d)) for p, d in
                                 re.findall(r'data-path="([^"]+)" data-distance="([^"]+)"', body)]
    return out


def test_rain_search_with_runtime_onnx_ranks_as_with_torch(registry: Registry, tmp_path: Path) -> None:
    from flows.cli import app

    gallery, queries = _gallery(tmp_path)
    pages = {}
    for runtime in ("torch", "onnx"):
        pages[runtime] = tmp_path / f"{runtime}.html"
        result = CliRunner().invoke(app, [
            "search", "--project", str(registry.root), "--model", f"models:/{registry.name}/{registry.version}",
            "--gallery", str(gallery), "--query", *map(str, queries), "--out", str(pages[runtime]),
            "--top-k", "8", "--runtime", runtime, "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        # One cache folder for both: the ONNX search still embeds every image, never reading torch's vectors.
        assert "8 embedded, 0 from the cache" in result.output, result.output
    torch_ranks, onnx_ranks = _ranking(pages["torch"]), _ranking(pages["onnx"])
    assert set(torch_ranks) == {q.name for q in queries}
    for query, ranked in torch_ranks.items():
        distances = [d for _, d in ranked]
        assert min(np.diff(distances)) > 2 * TOLERANCE  # no near-tie the two runtimes could order either way
        assert [p for p, _ in onnx_ranks[query]] == [p for p, _ in ranked]
        np.testing.assert_allclose([d for _, d in onnx_ranks[query]], distances, atol=TOLERANCE)


def _serve(app: Any, registry: Registry, runtime: str, model: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`rain serve-model --runtime runtime` up to the point it would listen: (its result, the ASGI app)."""
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda asgi, **kwargs: served.append(asgi))
    result = CliRunner().invoke(app, ["serve-model", "--project", str(registry.root), "--model", model,
                                      "--runtime", runtime])
    return result, (served[0] if served else None)


def _embeddings(asgi: Any, images: list[bytes]) -> np.ndarray:
    from starlette.testclient import TestClient

    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}}
    with TestClient(asgi) as client:
        resp = client.post("/invocations", json=body)
    assert resp.status_code == 200, resp.text
    return np.asarray(resp.json()["predictions"], dtype=np.float32)


def test_rain_serve_model_with_runtime_onnx_gives_torchs_embeddings(registry: Registry, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import app

    gallery, queries = _gallery(tmp_path)
    images = [p.read_bytes() for p in [*sorted(gallery.iterdir()), *queries]]
    out = {}
    for runtime in ("torch", "onnx"):
        result, asgi = _serve(app, registry, runtime, f"models:/{registry.name}/{registry.version}", monkeypatch)
        assert result.exit_code == 0 and asgi is not None, result.output
        out[runtime] = _embeddings(asgi, images)
    assert out["onnx"].shape == out["torch"].shape == (len(images), 256)
    np.testing.assert_allclose(np.linalg.norm(out["onnx"], axis=1), 1.0, atol=1e-5)
    assert np.abs(out["torch"] - out["torch"][0]).max() > 1e-2  # the images are told apart: a real comparison
    np.testing.assert_allclose(out["onnx"], out["torch"], atol=TOLERANCE)


def _one_line(result: Any) -> str:
    """The one line a refused command writes to stderr (stdout may hold search's progress bar, not an error)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_bad_runtime_is_one_line_naming_it(tmp_path: Path) -> None:
    from flows.cli import app

    gallery, queries = _gallery(tmp_path)
    search = CliRunner().invoke(app, ["search", "--project", str(tmp_path), "--gallery", str(gallery),
                                      "--query", str(queries[0]), "--runtime", "tensorrt"])
    serve = CliRunner().invoke(app, ["serve-model", "--project", str(tmp_path), "--runtime", "ONNX"])
    assert _one_line(search) == "error: --runtime 'tensorrt': expected one of torch, onnx"
    assert _one_line(serve) == "error: --runtime 'ONNX': expected one of torch, onnx"


def test_a_version_without_an_onnx_model_is_one_line_naming_the_version(registry: Registry, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import app

    by_alias = f"models:/{registry.name}@{LEGACY_ALIAS}"
    gallery, queries = _gallery(tmp_path)
    search = CliRunner().invoke(app, ["search", "--project", str(registry.root), "--model", by_alias, "--gallery",
                                      str(gallery), "--query", str(queries[0]), "--out", str(tmp_path / "p.html"),
                                      "--runtime", "onnx"])
    served, asgi = _serve(app, registry, "onnx", by_alias, monkeypatch)
    wanted = f"models:/{registry.name}/{registry.legacy}: holds no ONNX model"
    assert wanted in _one_line(search) and wanted in _one_line(served) and asgi is None
    result, asgi = _serve(app, registry, "torch", by_alias, monkeypatch)  # the torch runtime serves it as before
    assert result.exit_code == 0 and asgi is not None, result.output


def test_a_failed_export_leaves_no_version_no_logged_model_and_the_run_as_it_was(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from mlflow import MlflowClient

    from tasks.registry import onnx_model

    client = MlflowClient(tracking(registry.root))
    params = dataclasses.replace(registry.params, register=dataclasses.replace(
        registry.params.register, model_name=f"failed-{uuid.uuid4().hex[:8]}"))
    run_before = client.get_run(registry.run_id).info
    models_before = client.search_logged_models(experiment_ids=[run_before.experiment_id])
    registration_before = (registry.root / "reports/registration.json").read_text()

    def unsupported(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Unsupported operator aten::frobnicate\n(a second line of exporter detail)")

    monkeypatch.setattr(onnx_model, "export_onnx", unsupported)
    with pytest.raises(onnx_model.OnnxExportError) as failed:
        _register(params, registry.root)
    assert str(failed.value) == "ONNX export failed: RuntimeError: Unsupported operator aten::frobnicate"
    assert client.search_model_versions(f"name='{params.register.model_name}'") == []
    assert len(client.search_logged_models(experiment_ids=[run_before.experiment_id])) == len(models_before)
    assert client.get_run(registry.run_id).info.status == run_before.status  # not ended as FAILED
    assert (registry.root / "reports/registration.json").read_text() == registration_before


@pytest.mark.parametrize("diff", [0.5, float("nan")])
def test_an_export_off_pytorch_by_more_than_onnx_atol_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 diff: float) -> None:
    from rain_model.network import RAIN
    from tasks.registry import onnx_model
    from tests.micro_project import micro_params

    monkeypatch.setattr(onnx_model, "export_onnx", lambda *args: None)
    monkeypatch.setattr(onnx_model, "session", lambda path: None)
    monkeypatch.setattr(onnx_model, "max_abs_diff", lambda *args: diff)
    with pytest.raises(onnx_model.OnnxExportError, match=r"over register\.onnx_atol = 0\.0001$"):
        onnx_model.export_checked(RAIN(micro_params().model, 4), (64, 32), False, 1e-4, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
