"""`mlflow models serve -m models:/rain-reid@champion` on 127.0.0.1: embeddings for good requests, a 4xx
with a message (never a 500) for bad ones.

The server is a subprocess on a free loopback port (`--env-manager local`: no network, this
virtualenv), with pickle refused; the test waits for /ping for a bounded time and kills the server's
whole process group at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.trained_project import MODEL, tracking

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 240  # loading torch and the model takes ~15 s on 2 idle cores; much more when busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def project(champion_project: Path) -> Path:
    return champion_project


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("serve")
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking(project), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # the server execs `uvicorn` from PATH
    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                 "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not up in {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _post(url: str, body: Any, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except json.JSONDecodeError:
            return err.code, {"message": raw.decode(errors="replace")}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_good_requests_get_finite_unit_norm_embeddings_equal_to_the_training_features(project: Path,
                                                                                     server: str) -> None:
    import torch

    from tasks.config import load_params
    from tasks.images.loaders import read_rows
    from tasks.registry.embed import embed_paths, load_model

    params = load_params(project / "params.yaml")
    rows = read_rows(str(project / "data/manifests/synthetic-mlr.parquet"), 0, ["query", "gallery"])[:5]
    paths = [str(project / r["path"]) for r in rows]
    images = [_b64(Path(p).read_bytes()) for p in paths]
    status, body = _post(server, {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
    assert status == 200, body
    served = np.asarray(body["predictions"], dtype=np.float32)
    assert served.shape[0] == len(paths) and np.isfinite(served).all()
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

    info = json.loads((project / "models/synthetic/train.json").read_text())["trials"]["0"]
    model = load_model(project / "models/synthetic" / info["weights"], params.model, info["num_classes"])
    expected = torch.nn.functional.normalize(torch.from_numpy(
        embed_paths(model, paths, (params.train.height, params.train.width), flip=params.evaluate.flip)))
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-4)  # JSON floats round-trip

    # The other JSON layouts MLflow accepts give the same answer; a JPEG of another size is resized.
    status, records = _post(server, {"dataframe_records": [{"image": images[0]}]})
    assert status == 200 and np.allclose(records["predictions"][0], served[0], atol=1e-5)
    from PIL import Image

    jpeg = io.BytesIO()
    Image.open(paths[0]).convert("RGB").resize((100, 200)).save(jpeg, format="JPEG")
    status, body = _post(server, {"inputs": {"image": [_b64(jpeg.getvalue())]}})
    assert status == 200 and np.isfinite(body["predictions"]).all()


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 64), (40, 90, 160)).save(buf, format="PNG")
    return _b64(buf.getvalue())


BAD_REQUESTS: dict[str, tuple[Any, str]] = {
    # name: (request body, a phrase the error message must contain)
    "empty batch": ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
    "empty inputs": ({"inputs": {"image": []}}, "empty batch"),
    "wrong column": ({"dataframe_split": {"columns": ["picture"], "data": [[_png()]]}}, "image"),
    "wrong shape: a matrix": ({"inputs": [[1.0, 2.0], [3.0, 4.0]]}, "image"),
    "wrong shape: nested lists": ({"dataframe_split": {"columns": ["image"], "data": [[[1, 2, 3]]]}}, "image"),
    "wrong dtype: int": ({"dataframe_split": {"columns": ["image"], "data": [[123]]}}, "got int"),
    "wrong dtype: float": ({"dataframe_records": [{"image": 0.5}]}, "got float"),
    "wrong dtype: null": ({"dataframe_split": {"columns": ["image"], "data": [[None]]}}, "got NoneType"),
    "not base64": ({"dataframe_split": {"columns": ["image"], "data": [["not base64 at all!"]]}}, "not base64"),
    "bytes that are not an image": ({"dataframe_split": {"columns": ["image"],
                                                         "data": [[_b64(b"GIF? no, just text")]]}}, "not an image"),
    "truncated image": ({"dataframe_split": {"columns": ["image"],
                                             "data": [[_b64(base64.b64decode(_png())[:60])]]}}, "image"),
    "one bad image in a batch": ({"dataframe_split": {"columns": ["image"],
                                                      "data": [[_png()], [_b64(b"junk")]]}}, "row 1"),
    "not JSON": (b"{this is not json", "JSON"),
    "no input key": ({"images": [_png()]}, "dataframe_split"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message_never_a_500(server: str, case: str) -> None:
    body, phrase = BAD_REQUESTS[case]
    status, answer = _post(server, body)
    assert 400 <= status < 500, (status, answer)
    assert phrase in answer.get("message", ""), answer


def test_the_server_listens_on_loopback_only(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    ours = [line for line in listening.splitlines() if f":{port} " in line]
    assert ours and all("127.0.0.1:" in line for line in ours), ours
