"""The registered model served on 127.0.0.1, by `rain serve-model` (the recommended way) and by `mlflow models
serve -m models:/rain-reid@champion`: embeddings for good requests, a 4xx with a message (never a 500) for bad
ones, and a bounded cost for oversized ones.

The model's own limits (serve.max_images, serve.max_pixels, carried in its settings) hold under both servers
and are checked on image headers, before any pixel is decoded. `rain serve-model` also refuses, before MLflow
parses anything, a body over the size those limits allow (413) and JSON nested too deep (400); under `mlflow
models serve` deep JSON gets a 500 (the gap the README names).

Each server is a subprocess on a free loopback port (`--env-manager local`: no network, this virtualenv),
with pickle refused; the test waits for /ping for a bounded time and kills the server's whole process
group at the end.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from tasks.infra.reaper import end_group
from tests.trained_project import MODEL, tracking
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

RAIN, MLFLOW = "rain serve-model", "mlflow models serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def project(champion_project: Path) -> Path:
    return champion_project


class Server(NamedTuple):
    url: str
    command: str  # RAIN or MLFLOW
    pid: int


def _pings(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _cpu_seconds(pid: int) -> int:
    """CPU clock ticks the server has used: loading torch and the model prints nothing for ~15 s (idle) to minutes."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


# `mlflow models serve` (1 min to start and stop) in CI's tier: `rain serve-model` wraps the same scoring server.
@pytest.fixture(scope="module", params=[RAIN, pytest.param(MLFLOW, marks=pytest.mark.heavy)])
def server(project: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
           ) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("serve")
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking(project), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # the server execs `uvicorn` from PATH
    uri = f"models:/{MODEL}@champion"
    if request.param == RAIN:
        command = [str(bin_dir / "rain"), "serve-model", "--model", uri, "--project", str(project)]
    else:
        command = [str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _pings(url), progress=lambda: (log_path.stat().st_size, _cpu_seconds(proc.pid)),
                   what=f"{request.param} starting", poll_s=0.5,
                   failed=lambda: None if proc.poll() is None else f"exited:\n{log_path.read_text()[-3000:]}")
        yield Server(url, request.param, proc.pid)
    finally:
        end_group(proc.pid, grace=30)  # SIGTERM to the server's group, SIGKILL after 30 s
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
                                                                                     server: Server) -> None:
    import torch

    from tasks.config import load_params
    from tasks.images.loaders import read_rows
    from tasks.registry.embed import embed_paths, load_model

    params = load_params(project / "params.yaml")
    rows = read_rows(str(project / "data/manifests/synthetic-mlr.parquet"), 0, ["query", "gallery"])[:5]
    paths = [str(project / r["path"]) for r in rows]
    images = [_b64(Path(p).read_bytes()) for p in paths]
    status, body = _post(server.url, {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
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
    status, records = _post(server.url, {"dataframe_records": [{"image": images[0]}]})
    assert status == 200 and np.allclose(records["predictions"][0], served[0], atol=1e-5)
    from PIL import Image

    jpeg = io.BytesIO()
    Image.open(paths[0]).convert("RGB").resize((100, 200)).save(jpeg, format="JPEG")
    status, body = _post(server.url, {"inputs": {"image": [_b64(jpeg.getvalue())]}})
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
def test_bad_requests_get_a_4xx_with_a_message_never_a_500(server: Server, case: str) -> None:
    body, phrase = BAD_REQUESTS[case]
    status, answer = _post(server.url, body)
    assert 400 <= status < 500, (status, answer)
    assert phrase in answer.get("message", ""), answer


def test_the_server_listens_on_loopback_only(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    ours = [line for line in listening.splitlines() if f":{port} " in line]
    assert ours and all("127.0.0.1:" in line for line in ours), ours


# ----------------------------------------------------------------------------------------------------
# What one request may cost: limits carried by the model, and `rain serve-model`'s guard in front of MLflow.


@pytest.fixture(scope="module")
def limits(project: Path) -> Any:
    from tasks.config import load_params

    return load_params(project / "params.yaml").serve


@functools.lru_cache(maxsize=8)
def _flat_png(width: int, height: int) -> str:
    """A single-colour PNG: kilobytes on the wire, width x height x 3 bytes once decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buf, format="PNG")
    return _b64(buf.getvalue())


def _rss(pid: int) -> int:
    """Resident memory of the server and its children (`mlflow models serve` runs uvicorn as a child)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_images_over_the_pixel_limit_are_refused_from_their_headers(server: Server, limits: Any) -> None:
    # 20 of these (88 MP each, under Pillow's own bomb limit) once took 15 s and 2 GB of the server to decode.
    request = {"dataframe_split": {"columns": ["image"], "data": [[_flat_png(9400, 9400)]] * 20}}
    rss_before = _rss(server.pid)
    start = time.monotonic()
    status, answer = _post(server.url, request)
    elapsed = time.monotonic() - start
    assert status == 400, (status, answer)
    assert (f"row 0: image of 9400x9400 = 88360000 pixels, over this model's limit serve.max_pixels = "
            f"{limits.max_pixels}") in answer["message"]
    assert elapsed < 10, f"{elapsed:.1f} s: the pixels were decoded"  # decoding one takes ~1 s
    assert _rss(server.pid) - rss_before < 200 * 2**20  # decoding one would hold 265 MB

    width = 2048
    at_limit = _flat_png(width, limits.max_pixels // width)
    over = _flat_png(width, limits.max_pixels // width + 1)
    status, body = _post(server.url, {"dataframe_split": {"columns": ["image"], "data": [[at_limit]]}})
    assert status == 200 and np.isfinite(body["predictions"]).all(), body
    status, answer = _post(server.url, {"dataframe_split": {"columns": ["image"], "data": [[at_limit], [over]]}})
    assert status == 400 and "row 1: image of" in answer["message"], answer


def test_more_images_than_the_limit_are_refused_before_any_is_decoded(server: Server, limits: Any) -> None:
    small = _flat_png(32, 64)
    status, answer = _post(server.url, {"inputs": {"image": [small] * (limits.max_images + 1)}})
    assert status == 400, (status, answer)
    assert (f"{limits.max_images + 1} images in one request, over this model's limit serve.max_images = "
            f"{limits.max_images}") in answer["message"]
    status, body = _post(server.url, {"inputs": {"image": [small] * limits.max_images}})
    assert status == 200 and len(body["predictions"]) == limits.max_images


def test_deeply_nested_json_gets_a_400_from_rain_serve_model(server: Server) -> None:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = _post(server.url, deep)
    if server.command == RAIN:
        assert status == 400 and "JSON nested 100001 levels deep, over the limit of 32" in answer["message"], answer
    else:  # json.loads raises RecursionError, which MLflow's scoring server leaves to Starlette: the gap the
        assert status == 500, (status, answer)  # README names; fails (and the README is stale) once MLflow fixes it


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server, limits: Any) -> None:
    import http.client

    from tasks.registry.serve import body_limit

    if server.command != RAIN:
        pytest.skip("`mlflow models serve` reads a body of any size (README: what it does not guard)")
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:  # declares more than the limit and sends nothing: only a server that does not wait for it answers
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(body_limit(limits) + 1))
        conn.endheaders()
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413, answer
    assert f"over the limit of {body_limit(limits)} bytes" in answer["message"]


def test_the_model_checks_headers_before_decoding_any_pixel(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In process: the limits travel with the model (its settings), whatever serves it.
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service import utils

    from tasks.images import imageio

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking(project))
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    decoded: list[str] = []
    real_decode = imageio.decode_rgb

    def counted_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append("x")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(imageio, "decode_rgb", counted_decode)
    small, huge = base64.b64decode(_flat_png(32, 64)), base64.b64decode(_flat_png(9400, 9400))
    with pytest.raises(MlflowException, match=r"row 2: image of 9400x9400 = 88360000 pixels, over .*serve\.max_pixels"):
        model.predict(pd.DataFrame({"image": [small, small, huge]}))
    assert decoded == []  # not even the two good rows before it
    assert model.predict(pd.DataFrame({"image": [small]})).shape[0] == 1 and decoded == ["x"]


def test_serve_model_has_help() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["serve-model", "--help"])
    assert result.exit_code == 0 and "--max-connections" in result.output and "--model" in result.output


def test_serve_model_default_port_is_not_the_mlflow_uis() -> None:
    """A user runs `mlflow ui` (the runs and the registry) and `rain serve-model` side by side."""
    import inspect
    from urllib.parse import urlparse

    from flows.cli import serve_model
    from flows.links import DEFAULT_UI

    assert inspect.signature(serve_model).parameters["port"].default != urlparse(DEFAULT_UI).port


# RequestGuard alone, on a stub app: what it lets through and what it refuses, without a server.


def _through_guard(body_chunks: list[bytes], content_type: bytes = b"application/json", max_body: int = 1000,
                   declared: int | None = None) -> tuple[int, bytes, list[bytes], int]:
    """(status, response body, the body the app read, chunks the guard received) for one POST /invocations."""
    import asyncio

    from tasks.registry.serve import RequestGuard

    received: list[bytes] = []
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        received.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Any:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": body_chunks[pulled - 1], "more_body": pulled < len(body_chunks)}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"content-type", content_type)] + ([(b"content-length", str(declared).encode())] if declared else [])
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(RequestGuard(app, max_body_bytes=max_body)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), received, pulled


def test_request_guard_stops_reading_at_the_body_limit() -> None:
    status, answer, app_saw, pulled = _through_guard([b"x" * 400] * 10)  # streamed, no Content-Length
    assert status == 413 and app_saw == [] and pulled == 3, (status, pulled)  # 1200 > 1000: stops at the 3rd
    status, answer, app_saw, pulled = _through_guard([b"{}"], declared=5000)
    assert status == 413 and pulled == 0 and b"request body of 5000 bytes" in answer


def test_request_guard_refuses_deep_json_and_passes_the_rest_untouched() -> None:
    status, answer, app_saw, _ = _through_guard([b"[" * 40, b"]" * 40])
    assert status == 400 and app_saw == [] and b"nested 40 levels" in answer
    # Brackets inside strings, escaped quotes: not nesting.
    text = json.dumps({"inputs": {"image": ['[[[[\\"' * 20, "]]]"]}}).encode()
    status, answer, app_saw, _ = _through_guard([text[:10], text[10:]])
    assert status == 200 and app_saw == [text]
    # Not JSON: passed to MLflow as it came (CSV has no nesting to exhaust).
    status, _, app_saw, _ = _through_guard([b"[" * 40], content_type=b"text/csv")
    assert status == 200 and app_saw == [b"[" * 40]


def test_json_depth() -> None:
    from tasks.registry.serve import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[["}], "c": "\\\\"}') == 3
    assert json_depth(b'["\\"[[[", [[]]]') == 3
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert json_depth(b'"just a string"') == 0


# MLflow's scoring app itself, in process, on a model that only counts its rows: what the guard must answer before
# MLflow parses anything (no trained project, no server).

ROW_COUNTER = """
import mlflow.models
import pandas as pd
from mlflow.pyfunc import PythonModel


class RowCounter(PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"rows": [len(model_input)]})


mlflow.models.set_model(RowCounter())
"""


@pytest.fixture(scope="module")
def row_counter(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """MLflow's scoring app (FastAPI) for a from-code model that answers {"rows": N}."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    folder = tmp_path_factory.mktemp("row-counter")
    (folder / "model.py").write_text(ROW_COUNTER)
    mlflow.pyfunc.save_model(str(folder / "model"), python_model=str(folder / "model.py"))
    return scoring_server.init(mlflow.pyfunc.load_model(str(folder / "model")))


def _invoke(app: Any, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, str]:
    """(status, response text) of POST /invocations on an ASGI app in process, exactly these headers."""
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/invocations", content=body, headers=headers)
        return resp.status_code, resp.text


DEEP_JSON = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HEADER_CASES = {  # issue 28, item 3: each was a 500 from `rain serve-model`
    "no Content-Type": ([], b'{"inputs": {"image": ["x"]}}', 415, "no Content-Type header"),
    "json then text/plain, 5,000 deep": ([("content-type", "application/json"), ("content-type", "text/plain")],
                                         DEEP_JSON, 400, "2 Content-Type headers ('application/json', 'text/plain')"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_requests_mlflow_answers_with_a_500_get_a_4xx_from_rain_serve_model(row_counter: Any, case: str) -> None:
    from tasks.config import ServeConfig
    from tasks.registry.serve import RequestGuard, body_limit

    headers, body, status, phrase = HEADER_CASES[case]
    assert _invoke(row_counter, body, headers)[0] == 500  # MLflow alone (AttributeError, RecursionError)
    guarded = RequestGuard(row_counter, body_limit(ServeConfig()))
    got, text = _invoke(guarded, body, headers)
    assert got == status and phrase in json.loads(text)["message"], (got, text)


def test_the_guard_passes_a_well_formed_request_to_mlflow(row_counter: Any) -> None:
    from tasks.config import ServeConfig
    from tasks.registry.serve import RequestGuard, body_limit

    guarded = RequestGuard(row_counter, body_limit(ServeConfig()))
    status, text = _invoke(guarded, b'{"dataframe_split": {"columns": ["image"], "data": [["a"], ["b"], ["c"]]}}',
                           [("content-type", "application/json; charset=utf-8")])
    assert status == 200 and json.loads(text)["predictions"] == [{"rows": 3}], text


# Rows per request (issue 28, item 1): memory follows rows, not bytes. A 270 KB Parquet body of 100 M empty rows
# took +2.6 GB of `rain serve-model` and 4 M JSON rows of `[""]` (20 MB) +913 MB, both inside the body limit.


def _counted(app: Any) -> tuple[Any, list[int]]:
    """`app` and a list that gets an entry each time a request reaches it."""
    calls: list[int] = []

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append(1)
        await app(scope, receive, send)

    return counted, calls


def _parquet_rows(rows: int) -> bytes:
    """A table of `rows` empty strings (issue 28's repro: a dictionary of one value cast to strings, zstd): the writer
    stores them dictionary-encoded, a few hundred KB for millions of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int8)), pa.array([""])).cast(pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": column}), buf, compression="zstd")
    return buf.getvalue()


ROW_BOMBS = {  # name: (content type, body builder, phrase of the 400's message)
    "Parquet, 10 M empty rows": ("application/vnd.apache.parquet", lambda: _parquet_rows(10_000_000),
                                 "Parquet table of 10000000 rows, over this model's limit serve.max_images = 32"),
    "JSON, 1 M rows of [\"\"]": ("application/json", lambda: b'{"dataframe_split": {"columns": ["image"], "data": ['
                                + b",".join([b'[""]'] * 1_000_000) + b"]}}",
                                "JSON of 1000001 values, over the limit of 192"),
    "CSV, 1 M lines": ("text/csv", lambda: b"image\n" + b"x\n" * 1_000_000, "CSV of 1000001 lines"),
}


@pytest.mark.parametrize("case", list(ROW_BOMBS))
def test_more_rows_than_serve_max_images_are_refused_before_mlflow_builds_them(row_counter: Any, case: str) -> None:
    from tasks.config import ServeConfig
    from tasks.registry.serve import RequestGuard, body_limit

    content_type, build, phrase = ROW_BOMBS[case]
    body = build()
    limits = ServeConfig()
    assert len(body) < body_limit(limits)  # the byte limit lets it in
    app, calls = _counted(row_counter)
    status, text = _invoke(RequestGuard(app, body_limit(limits), max_rows=limits.max_images), body,
                           [("content-type", content_type)])
    assert status == 400 and phrase in json.loads(text)["message"], (status, text[:300])
    assert calls == [], "MLflow saw the request"


def test_a_request_of_max_images_rows_in_each_layout_reaches_the_model(row_counter: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.config import ServeConfig
    from tasks.registry.serve import RequestGuard, body_limit

    limits = ServeConfig()
    rows = [_png()] * limits.max_images
    parquet = io.BytesIO()
    pq.write_table(pa.table({"image": rows}), parquet)
    bodies = {
        "dataframe_split": ("application/json", json.dumps({"dataframe_split": {
            "columns": ["image", "id"], "data": [[r, i] for i, r in enumerate(rows)]}}).encode()),
        "dataframe_records": ("application/json", json.dumps({"dataframe_records": [
            {"image": r, "id": i} for i, r in enumerate(rows)]}).encode()),
        "csv": ("text/csv", ("image\n" + "\n".join(rows) + "\n").encode()),
        "parquet": ("application/vnd.apache.parquet", parquet.getvalue()),
    }
    guard = RequestGuard(row_counter, body_limit(limits), max_rows=limits.max_images)
    for layout, (content_type, body) in bodies.items():
        status, text = _invoke(guard, body, [("content-type", content_type)])
        assert status == 200 and json.loads(text)["predictions"] == [{"rows": limits.max_images}], (layout, text)


def test_json_values() -> None:
    from tasks.registry.serve import json_values

    assert json_values(b'{"a": [1, 2, {"b": "x,y,z"}], "c": "\\\\\\",,"}') == 4
    assert json_values(b"[" + b",".join([b'[""]'] * 1000) + b"]") == 1000


def test_json_containers() -> None:
    from tasks.registry.serve import json_containers

    assert json_containers(b'{"a": [[], {}], "b": "[{[{"}') == 4


def test_the_guard_works_on_at_most_max_busy_requests_at_once() -> None:
    """The others wait with their body read: memory is that of `max_busy` requests being worked on, not of all those
    in flight."""
    import asyncio

    from tasks.registry.serve import RequestGuard

    busy, most = 0, 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal busy, most
        await receive()
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.05)
        busy -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def one(guard: RequestGuard) -> int:
        sent: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/invocations",
                 "headers": [(b"content-type", b"application/json")]}
        await guard(scope, receive, send)
        return int(sent[0]["status"])

    async def many() -> list[int]:
        guard = RequestGuard(app, max_body_bytes=1000, max_rows=32, max_busy=2)
        return await asyncio.gather(*(one(guard) for _ in range(8)))

    assert asyncio.run(many()) == [200] * 8
    assert most == 2


def _shape_reference(text: bytes) -> tuple[int, int, int]:
    """json_shape one character at a time: a quote after an odd run of backslashes is escaped."""
    run, inside, depth, deepest, commas, containers = 0, False, 0, 0, 0, 0
    for c in text:
        if c == ord('"') and run % 2 == 0:
            inside = not inside
        elif not inside and c in b"[{":
            depth, containers = depth + 1, containers + 1
            deepest = max(deepest, depth)
        elif not inside and c in b"]}":
            depth -= 1
        elif not inside and c == ord(","):
            commas += 1
        run = run + 1 if c == ord("\\") else 0
    return deepest, commas + 1, containers


def test_json_shape_agrees_with_a_scan_one_character_at_a_time_across_block_edges(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from tasks.registry import serve

    rng = random.Random(0)
    texts = [bytes(rng.choice(b'[]{},"\\\\ab') for _ in range(rng.randrange(60))) for _ in range(400)]

    def value(depth: int) -> Any:
        kind = rng.randrange(4) if depth < 6 else 3
        if kind == 0:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if kind == 1:
            return {f'k"\\{i}': value(depth + 1) for i in range(rng.randrange(4))}
        return "".join(rng.choice('[]{},"\\\\ab') for _ in range(rng.randrange(8)))

    texts += [json.dumps(value(0)).encode() for _ in range(200)]
    for block in (1, 2, 3, 7, 1 << 18):
        monkeypatch.setattr(serve, "SCAN_BLOCK", block)
        for text in texts:
            assert serve.json_shape(text) == _shape_reference(text), (block, text)


def test_max_connections_requests_sent_together_are_all_served_and_one_more_gets_a_503() -> None:
    """uvicorn counts the new connection against its limit: `limit_concurrency=16` answered 503 to most of 16
    requests sent together (bench/serve_load.py: 11 of 16)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from tasks.registry.serve import uvicorn_limit

    release = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        while not release.is_set():  # every request stays in flight until all have arrived
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    max_connections = 4
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=uvicorn_limit(max_connections)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, progress=lambda: 0, what="uvicorn starting", poll_s=0.05)
        url = f"http://127.0.0.1:{port}"

        def post(_: int) -> int:
            return _post(url, {"inputs": []})[0]

        with ThreadPoolExecutor(max_connections) as pool:
            first = [pool.submit(post, i) for i in range(max_connections)]
            time.sleep(1.0)  # all connected and waiting in the app
            assert post(-1) == 503  # one more
            release.set()
            assert [f.result(timeout=60) for f in first] == [200] * max_connections
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=30)


def test_a_waiting_request_has_its_body_read_only_when_its_turn_comes() -> None:
    """Memory holds the bodies of the requests being worked on, not of all those in flight: with one at a time, the
    second request's body is not read until the first is answered."""
    import asyncio

    from tasks.registry.serve import RequestGuard

    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        events.append(f"work {message['body'].decode()}")
        await asyncio.sleep(0.05)
        events.append(f"done {message['body'].decode()}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def one(guard: RequestGuard, name: str) -> None:
        async def receive() -> Any:
            events.append(f"read {name}")
            return {"type": "http.request", "body": f'"{name}"'.encode(), "more_body": False}

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/invocations",
                 "headers": [(b"content-type", b"application/json")]}
        await guard(scope, receive, send)

    async def two() -> None:
        guard = RequestGuard(app, max_body_bytes=1000, max_rows=32, max_busy=1)
        await asyncio.gather(one(guard, "a"), one(guard, "b"))

    asyncio.run(two())
    assert events == ['read a', 'work "a"', 'done "a"', 'read b', 'work "b"', 'done "b"'], events
