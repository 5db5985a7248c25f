"""What oversized requests cost a served model: concurrent requests against the real server on 127.0.0.1.

    .venv/bin/python bench/serve_load.py [--server rain|mlflow] [--requests 8] [--concurrency 4]
                                         [--over-images 20] [--side 9400] [--model-uri URI]

The server is `rain serve-model` (or `mlflow models serve --env-manager local` with --server mlflow), started
as a subprocess on a free loopback port. The model is --model-uri from MLFLOW_TRACKING_URI's registry, or by
default a RAIN model with random weights registered in a temporary sqlite registry with this repository's
params.yaml (its `model` and `serve` sections): serving cost does not depend on what the weights learned.

Each kind of request (--kinds: all by default) is sent --requests times, --concurrency at once (at-limit:
--at-limit-concurrency at once, 16 by default: `rain serve-model`'s --max-connections):
- over: the issue's request, --over-images single-colour --side x --side PNGs (9400 x 9400 = 88 MP each,
  under Pillow's own limit; a few MB of JSON): refused (400) from their headers;
- at-limit: serve.max_images BMPs of serve.max_pixels pixels each (2048 wide, uncompressed: ~270 MB of JSON, the
  largest body `rain serve-model` accepts): the most expensive request the limits allow, answered (200);
- too-many: serve.max_images + 1 small PNGs: refused (400) before any is decoded;
- deep-json: `{"inputs": [[[...]]]}` nested 100,000 deep: 400 from rain serve-model (500 from mlflow);
- parquet-rows: the Parquet row bomb, 100 M empty strings (a dictionary of one value, zstd: ~270 KB): 400 from
  rain serve-model's footer check (it took +2.6 GB of the server before it);
- json-rows: the JSON row bomb, 4 M rows of `[""]` (20 MB): 400 from rain serve-model (+913 MB before).
Printed per kind: requests/s, the status codes counted, median and slowest latency, and the peak resident
memory of the server (with its children, sampled every 20 ms) during that kind; then the server's memory
before and after everything (what it handed back).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "rain-reid-bench"


def register_random_model(params: Params, tracking: str) -> str:
    """A RAIN model with random weights, logged and registered as the register stage does; its URI."""
    import mlflow
    import torch
    from safetensors.torch import save_file

    from rain_model.network import RAIN
    from tasks.register import log_model, model_settings

    mlflow.set_tracking_uri(tracking)
    num_classes = 100
    torch.manual_seed(0)
    model = RAIN(params.model, num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        with mlflow.start_run():
            logged = log_model(params, weights, model_settings(params, num_classes, None))
    version = mlflow.register_model(logged.model_uri, MODEL_NAME).version
    return f"models:/{MODEL_NAME}/{version}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(kind: str, model_uri: str, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if kind == "rain":
        command = [str(BIN / "rain"), "serve-model", "--model", model_uri]
    else:
        command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with log_path.open("w") as log:
        proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    from tasks.infra.reaper import end_group

    if proc.poll() is None:
        end_group(proc.pid, grace=30)  # SIGTERM to the server's group, SIGKILL after 30 s
        proc.wait(timeout=30)


def rss(pid: int) -> int:
    """Resident bytes of the server and its children (`mlflow models serve` runs uvicorn as a child)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


class PeakRss:
    """Samples `rss(pid)` every 20 ms in a thread while in the `with` block; `.peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))


def flat_png(width: int, height: int, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, float]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=180) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    except (urllib.error.URLError, OSError):
        status = 0  # connection refused or reset, or no answer in 180 s
    return status, time.monotonic() - start


def parquet_rows(rows: int) -> bytes:
    """The Parquet row bomb (issue 28's repro): `rows` empty strings (a dictionary of one value cast to strings),
    zstd-compressed: the writer stores them dictionary-encoded, a few hundred KB."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int8)), pa.array([""])).cast(pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": column}), buf, compression="zstd")
    return buf.getvalue()


JSON, PARQUET = "application/json", "application/vnd.apache.parquet"
KINDS = ("over", "at-limit", "too-many", "deep-json", "parquet-rows", "json-rows")


def payloads(params: Params, over_images: int, side: int, kinds: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """(content type, body) of each kind in `kinds`."""
    limits = params.serve
    width = 2048
    builders = {
        "over": lambda: json.dumps({"dataframe_split": {"columns": ["image"],
                                                        "data": [[flat_png(side, side)]] * over_images}}).encode(),
        "at-limit": lambda: json.dumps({"inputs": {"image": [flat_png(width, limits.max_pixels // width, "BMP")]
                                                   * limits.max_images}}).encode(),
        "too-many": lambda: json.dumps({"inputs": {"image": [flat_png(params.train.width, params.train.height)]
                                                   * (limits.max_images + 1)}}).encode(),
        "deep-json": lambda: b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "parquet-rows": lambda: parquet_rows(100_000_000),
        "json-rows": lambda: b'{"dataframe_split": {"columns": ["image"], "data": [' + b",".join([b'[""]'] * 4_000_000)
        + b"]}}",
    }
    return {kind: (PARQUET if kind == "parquet-rows" else JSON, builders[kind]()) for kind in kinds}


def load(url: str, pid: int, content_type: str, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    with PeakRss(pid) as peak, ThreadPoolExecutor(concurrency) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda _: post(url, body, content_type), range(requests)))
        wall = time.monotonic() - start
    latencies = sorted(t for _, t in results)
    return {"rps": requests / wall, "codes": collections.Counter(s for s, _ in results),
            "p50": latencies[len(latencies) // 2], "max": latencies[-1], "peak_rss": peak.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("rain", "mlflow"), default="rain")
    ap.add_argument("--requests", type=int, default=8, help="requests of each kind")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--at-limit-concurrency", type=int, default=16,
                    help="at-limit requests in flight at once (rain serve-model's --max-connections)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"kinds of request, comma-separated: {', '.join(KINDS)}")
    ap.add_argument("--over-images", type=int, default=20, help="images in an over-the-limit request")
    ap.add_argument("--side", type=int, default=9400, help="width and height of an over-the-limit image")
    ap.add_argument("--model-uri", default=None, help="a registered model (MLFLOW_TRACKING_URI's registry); "
                                                     "default: one with random weights in a temporary registry")
    args = ap.parse_args()

    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # `mlflow models serve` execs uvicorn from PATH
        model_uri = args.model_uri
        if model_uri is None:
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            t = time.monotonic()
            model_uri = register_random_model(params, env["MLFLOW_TRACKING_URI"])
            print(f"registered {model_uri} (random weights) in {time.monotonic() - t:.0f} s")
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise SystemExit(f"unknown kind(s) {unknown}: {', '.join(KINDS)}")
        bodies = payloads(params, args.over_images, args.side, kinds)
        proc, url = start_server(args.server, model_uri, env, Path(tmp) / "server.log")
        try:
            idle = rss(proc.pid)
            print(f"server: {args.server} on {url}, {os.cpu_count()} CPUs; limits serve.max_pixels = "
                  f"{params.serve.max_pixels}, serve.max_images = {params.serve.max_images}")
            print(f"{args.requests} requests of each kind, {args.concurrency} at once (at-limit: "
                  f"{args.at_limit_concurrency}); server RSS idle {idle / 2**20:.0f} MiB")
            print(f"{'kind':<13}{'body MB':>9}{'at once':>8}{'req/s':>9}{'p50 s':>8}{'max s':>8}{'peak RSS MiB':>14}"
                  f"  status codes")
            for kind, (content_type, body) in bodies.items():
                at_once = args.at_limit_concurrency if kind == "at-limit" else args.concurrency
                requests = max(args.requests, at_once)
                r = load(url, proc.pid, content_type, body, requests, at_once)
                codes = ", ".join(f"{code}: {n}" for code, n in sorted(r["codes"].items()))
                print(f"{kind:<13}{len(body) / 1e6:>9.1f}{at_once:>8}{r['rps']:>9.2f}{r['p50']:>8.2f}{r['max']:>8.2f}"
                      f"{r['peak_rss'] / 2**20:>14.0f}  {codes}", flush=True)
            time.sleep(2)
            print(f"server RSS after all: {rss(proc.pid) / 2**20:.0f} MiB")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
