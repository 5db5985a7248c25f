"""Builders of tiny archives in each real dataset's layout, and a local HTTP server that serves them.

Imported by the dataset tests (``from dataset_fixtures import ...``); the ``http_server``
fixture is re-exported by each test module that needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tasks.config import DatasetChoice, Params, Paths, ProtocolConfig, SourceConfig

# --- images -----------------------------------------------------------------------------------------

def image_bytes(fmt: str, seed: int, size: tuple[int, int] = (24, 48), mode: str = "RGB") -> bytes:
    """A small image with some structure (so JPEG/PNG do real work), encoded in `fmt`."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = (base[None, None, :] + 40 * np.sin((yy[..., None] + seed) / 3.0) + 3 * xx[..., None]) % 256
    img = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- dataset archives in their real layouts ---------------------------------------------------------

@dataclass
class Built:
    """An archive and what an adapter should find in it."""

    data: bytes
    filename: str
    images: int  # images the adapter's scan() yields
    identities: int
    cameras: set[int]
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def md5(self) -> str:
        return md5(self.data)


def build_viper(persons: int = 6, unpaired: int = 1) -> Built:
    """VIPeR/cam_a/<nnn>_<angle>.bmp and VIPeR/cam_b/<nnn>_<angle>.bmp; `unpaired` extra in cam_a only."""
    files: dict[str, bytes] = {"VIPeR/README.txt": b"VIPeR v1.0\n"}
    for pid in range(persons + unpaired):
        files[f"VIPeR/cam_a/{pid:03d}_{(pid * 45) % 360}.bmp"] = image_bytes("BMP", pid, (48, 128))
        if pid < persons:
            angle = (pid * 45 + 90) % 360
            files[f"VIPeR/cam_b/{pid:03d}_{angle}.bmp"] = image_bytes("BMP", 1000 + pid, (48, 128))
    return Built(zip_bytes(files), "VIPeR.v1.0.zip", images=2 * persons, identities=persons, cameras={0, 1})


def build_caviar(both: int = 4, close_only: int = 2, per_camera: int = 3) -> Built:
    """CAVIAR4REID/CAVIARa/XXXXYYY.jpg: images 1..10 closer camera, 11..20 distant camera."""
    files: dict[str, bytes] = {}
    for person in range(1, both + close_only + 1):
        for k in range(1, per_camera + 1):
            files[f"CAVIARa/{person:04d}{k:03d}.jpg"] = image_bytes("JPEG", person * 100 + k, (40, 80))
            if person <= both:
                files[f"CAVIARa/{person:04d}{10 + k:03d}.jpg"] = image_bytes("JPEG", person * 100 + 50 + k,
                                                                             (17, 39))
    return Built(zip_bytes(files), "CAVIAR4REID.zip", images=2 * both * per_camera, identities=both,
                 cameras={0, 1}, extra={"dropped": close_only})


def build_market() -> Built:
    """Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query,gt_bbox}/, junk and distractors."""
    root = "Market-1501-v15.09.15"
    files: dict[str, bytes] = {f"{root}/readme.txt": b"Market-1501\n"}
    kept = 0
    cameras: set[int] = set()
    plan = {  # folder -> (pid, camera) list
        "bounding_box_train": [(2, 1), (2, 2), (7, 3), (7, 4), (7, 6)],
        "bounding_box_test": [(11, 5), (11, 6), (-1, 1), (0, 2), (0, 3), (15, 1), (15, 2)],
        "query": [(11, 1), (15, 4)],
        "gt_bbox": [(11, 1), (11, 2)],  # ignored by the adapter
    }
    seed = 0
    for folder, items in plan.items():
        for pid, cam in items:
            seed += 1
            pid_text = "-1" if pid == -1 else f"{pid:04d}"
            name = f"{root}/{folder}/{pid_text}_c{cam}s1_{seed * 25:06d}_0{seed % 3}.jpg"
            files[name] = image_bytes("JPEG", seed, (32, 64))
            if folder != "gt_bbox" and pid > 0:
                kept += 1
                cameras.add(cam - 1)
        files[f"{root}/{folder}/Thumbs.db"] = b"\x00windows thumbnail cache"
    return Built(zip_bytes(files), "Market-1501-v15.09.15.zip", images=kept, identities=4, cameras=cameras)


def build_cuhk03_mat(path: Path, persons: tuple[int, ...] = (3, 2, 1, 1, 2), seed: int = 0) -> dict:
    """A MATLAB v7.3 cuhk-03.mat in the real layout (HDF5 references, transposed arrays).

    Each person gets images in some of the 10 cells, the rest empty (MATLAB's empty array: a 2-element
    uint64 with attribute MATLAB_empty). Returns what was stored: {which: {(pair, person, column): hwc}}.
    """
    rng = np.random.default_rng(seed)
    stored: dict[str, dict[tuple[int, int, int], np.ndarray]] = {"labeled": {}, "detected": {}}
    with h5py.File(path, "w", userblock_size=512) as mat:
        refs = mat.create_group("#refs#")
        counter = iter(range(10**6))

        def put(array: np.ndarray, **attrs: object) -> h5py.Reference:
            ds = refs.create_dataset(f"r{next(counter)}", data=array)
            for k, v in attrs.items():
                ds.attrs[k] = v
            return ds.ref

        for which in ("labeled", "detected"):
            pair_refs = []
            for pair, n in enumerate(persons):
                cells = np.empty((10, n), dtype=h5py.ref_dtype)  # MATLAB (persons, 10), stored transposed
                for person in range(n):
                    for column in range(10):
                        # person 0 of each pair has all 10 images; others some cells empty
                        if person == 0 or (column + person) % 3 != 0:
                            h, w = int(rng.integers(20, 40)), int(rng.integers(8, 19))
                            hwc = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                            stored[which][(pair, person, column)] = hwc
                            cells[column, person] = put(np.ascontiguousarray(hwc.T), MATLAB_class=b"uint8")
                        else:
                            cells[column, person] = put(np.zeros(2, dtype=np.uint64), MATLAB_class=b"double",
                                                        MATLAB_empty=1)
                pair_refs.append(put(cells, MATLAB_class=b"cell"))
            top = mat.create_dataset(which, data=np.array([pair_refs], dtype=h5py.ref_dtype))  # (1, 5)
            top.attrs["MATLAB_class"] = b"cell"
    with path.open("r+b") as fh:  # the MATLAB header in the user block
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 "
                 b"HDF5 schema 1.00 .")
    return stored


def build_cuhk03(tmp: Path, persons: tuple[int, ...] = (3, 2, 1, 1, 2)) -> Built:
    mat_path = tmp / "cuhk-03.mat"
    stored = build_cuhk03_mat(mat_path, persons)
    data = zip_bytes({"cuhk03_release/cuhk-03.mat": mat_path.read_bytes(),
                      "cuhk03_release/README.md": b"CUHK03\n"})
    labeled = stored["labeled"]
    ids = {(pair, person) for pair, person, _ in labeled}
    cameras = {2 * pair + (column >= 5) for pair, _, column in labeled}
    return Built(data, "cuhk03_release.zip", images=len(labeled), identities=len(ids), cameras=cameras,
                 extra={"stored": stored})


def build_custom_folder(folder: Path, images: int = 1000, corrupt: int = 10, fmt: str = "JPEG",
                        table: str = "table.csv") -> tuple[Path, list[str]]:
    """`images` images in folder/imgs/ (of which `corrupt` are broken), and a CSV listing them.

    Corrupt files cycle through: truncated JPEG, zero bytes, text named .jpg. Returns (table, corrupt
    relative paths as written in the table).
    """
    (folder / "imgs").mkdir(parents=True)
    step = images // corrupt if corrupt else images + 1
    bad: list[str] = []
    lines = ["path,person_id,camera_id"]
    good = image_bytes(fmt, 1, (16, 32))
    for i in range(images):
        rel = f"imgs/{i:04d}.jpg"
        pid, cam = i // 4, i % 2
        if corrupt and i % step == step // 2 and len(bad) < corrupt:
            kind = len(bad) % 3
            data = good[: len(good) // 2] if kind == 0 else b"" if kind == 1 else b"not an image, just text\n"
            bad.append(rel)
        else:
            data = image_bytes(fmt, i, (16, 32)) if i < 50 else good  # most share bytes: fast to build
        (folder / rel).write_bytes(data)
        lines.append(f"{rel},{pid},{cam}")
    path = folder / table
    path.write_text("\n".join(lines) + "\n")
    return path, bad


# --- params -----------------------------------------------------------------------------------------

def make_params(tmp: Path, name: str, sources: dict[str, SourceConfig] | None = None,
                **protocol: object) -> Params:
    data = tmp / "data"
    proto = {"trials": 2, "workers": 1, **protocol}
    return Params(paths=Paths(raw=str(data / "raw"), downloads=str(data / "downloads"),
                              manifests=str(data / "manifests"), lr=str(data / "lr")),
                  dataset=DatasetChoice(name=name), sources=sources or {},
                  protocol=ProtocolConfig(**proto))  # type: ignore[arg-type]


def listing(root: Path) -> list[str]:
    """Every path under `root` (relative), for before/after comparisons."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --- the local HTTP server --------------------------------------------------------------------------

@dataclass
class Route:
    data: bytes
    fail: list[int] = field(default_factory=list)  # status codes answered first, one per request
    truncate: int = 0  # this many first requests get half the body, then the connection closes
    delay: float = 0.0  # seconds to wait before answering the first request


class LocalServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    route = server.routes.get(self.path)
                    code = route.fail.pop(0) if route and route.fail else None
                    cut = bool(route and route.truncate)
                    if route and route.truncate:
                        route.truncate -= 1
                    delay = route.delay if route else 0.0
                    if route:
                        route.delay = 0.0  # only the first answer is slow
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                if code is not None:
                    self.send_error(code)
                    return
                if delay:
                    time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(route.data)))
                self.end_headers()
                if cut:
                    self.wfile.write(route.data[: len(route.data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client timed out
                    self.wfile.write(route.data)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def serve(self, path: str, data: bytes, **kw: object) -> str:
        self.routes[path] = Route(data, **kw)  # type: ignore[arg-type]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    server = LocalServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
