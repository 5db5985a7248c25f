"""What oversized requests cost a served model: concurrent requests against the real server on 127.0.0.1.

    .venv/bin/python bench/serve_load.py [--server rain|mlflow] [--requests 8] [--concurrency 4]
                                         [--over-images 20] [--side 9400] [--model-uri URI]

The server is `rain serve-model` (or `mlflow models serve --env-manager local` with --server mlflow), started
as a subprocess on a free loopback port. The model is --model-uri from MLFLOW_TRACKING_URI's registry, or by
default a RAIN model with random weights registered in a temporary sqlite registry with this repository's
params.yaml (its `model` and `serve` sections): serving cost does not depend on what the weights learned.

Each kind of request is sent --requests times, --concurrency at once:
- over: the issue's request, --over-images single-colour --side x --side PNGs (9400 x 9400 = 88 MP each,
  under Pillow's own limit; a few MB of JSON): refused (400) from their headers;
- at-limit: serve.max_images single-colour PNGs of serve.max_pixels pixels each (2048 wide): the most
  expensive request the limits allow, answered (200);
- too-many: serve.max_images + 1 small PNGs: refused (400) before any is decoded;
- deep-json: `{"inputs": [[[...]]]}` nested 100,000 deep: 400 from rain serve-model (500 from mlflow).
Printed per kind: requests/s, the status codes counted, median and slowest latency, and the peak resident
memory of the server (with its children, sampled every 20 ms) during that kind; then the server's memory
before and after everything.
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


def flat_png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
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


def payloads(params: Params, over_images: int, side: int) -> dict[str, bytes]:
    limits = params.serve
    width = 2048
    at_limit = flat_png(width, limits.max_pixels // width)
    small = flat_png(params.train.width, params.train.height)
    over = flat_png(side, side)
    return {
        "over": json.dumps({"dataframe_split": {"columns": ["image"], "data": [[over]] * over_images}}).encode(),
        "at-limit": json.dumps({"inputs": {"image": [at_limit] * limits.max_images}}).encode(),
        "too-many": json.dumps({"inputs": {"image": [small] * (limits.max_images + 1)}}).encode(),
        "deep-json": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }


def load(url: str, pid: int, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    with PeakRss(pid) as peak, ThreadPoolExecutor(concurrency) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda _: post(url, body), range(requests)))
        wall = time.monotonic() - start
    latencies = sorted(t for _, t in results)
    return {"rps": requests / wall, "codes": collections.Counter(s for s, _ in results),
            "p50": latencies[len(latencies) // 2], "max": latencies[-1], "peak_rss": peak.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("rain", "mlflow"), default="rain")
    ap.add_argument("--requests", type=int, default=8, help="requests of each kind")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
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
        bodies = payloads(params, args.over_images, args.side)
        proc, url = start_server(args.server, model_uri, env, Path(tmp) / "server.log")
        try:
            idle = rss(proc.pid)
            print(f"server: {args.server} on {url}, {os.cpu_count()} CPUs; limits serve.max_pixels = "
                  f"{params.serve.max_pixels}, serve.max_images = {params.serve.max_images}")
            print(f"{args.requests} requests of each kind, {args.concurrency} at once; server RSS idle "
                  f"{idle / 2**20:.0f} MiB")
            print(f"{'kind':<10}{'body MB':>9}{'req/s':>9}{'p50 s':>8}{'max s':>8}{'peak RSS MiB':>14}  status codes")
            for kind, body in bodies.items():
                r = load(url, proc.pid, body, args.requests, args.concurrency)
                codes = ", ".join(f"{code}: {n}" for code, n in sorted(r["codes"].items()))
                print(f"{kind:<10}{len(body) / 1e6:>9.1f}{r['rps']:>9.2f}{r['p50']:>8.2f}{r['max']:>8.2f}"
                      f"{r['peak_rss'] / 2**20:>14.0f}  {codes}")
            time.sleep(2)
            print(f"server RSS after all: {rss(proc.pid) / 2**20:.0f} MiB")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
