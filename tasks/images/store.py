"""The decoded-image store: every image of an MLR manifest decoded once, at the model's input size.

Pillow decodes ~1,500 images/s per core; a GPU trains on thousands a second and RAIN reads an HR and an
LR image per identity image, so decoding every image every epoch would set the pace. The `decode` stage
decodes each distinct image of the manifest once, through the same `load_tensor` that evaluation and
serving use, into one memory-mapped uint8 array; training and evaluation then read slices of it (a
batch is one fancy-index read) and convert to float on the device.

Layout of a store folder:
  pixels.npy   (N, 3, H, W) uint8, row i = image `paths[i]` resized to (H, W) like `to_tensor` does
  index.json   {"height": H, "width": W, "paths": [...], "sha256": ...}: the manifest's path strings, in
               row order, and the digest of pixels.npy (what a grid run's key hashes: no re-read of the pixels)
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from tasks.config import Params
from tasks.images.loaders import load_tensor
from tasks.infra.parallel import map_chunks, worker_count
from tasks.infra.tracking import file_hash

log = logging.getLogger(__name__)

PIXELS = "pixels.npy"
INDEX = "index.json"


def manifest_images(rows: Iterable[dict]) -> list[str]:
    """Every distinct image an MLR manifest feeds to the model (`path`, `hr_path`, `lr_path`), sorted."""
    return sorted({r[key] for r in rows for key in ("path", "hr_path", "lr_path") if r[key]})


def _decode_chunk(chunk: Sequence[tuple[int, str]], pixels: str, size: tuple[int, int]) -> list[int]:
    out = np.load(pixels, mmap_mode="r+")  # each process writes its own rows of the shared file
    for row, path in chunk:
        out[row] = load_tensor(path, size).numpy()
    out.flush()
    return [len(chunk)]


def build(paths: Sequence[str], size: tuple[int, int], folder: Path, workers: int) -> int:
    """Decode `paths` (readable from the current folder) into a store in `folder`; returns the count."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = folder / PIXELS
    out = np.lib.format.open_memmap(pixels, mode="w+", dtype=np.uint8, shape=(len(paths), 3, *size))
    del out  # header and size written; the workers fill the rows
    jobs = list(enumerate(paths))
    map_chunks(functools.partial(_decode_chunk, pixels=str(pixels), size=size), jobs, workers, chunk_size=256)
    index = {"height": size[0], "width": size[1], "paths": list(paths), "sha256": file_hash(pixels)}
    (folder / INDEX).write_text(json.dumps(index))
    return len(paths)


def decode_manifest(params: Params, mlr_path: Path, store_dir: Path) -> dict[str, int]:
    """Rebuild `store_dir` (a DVC output: whole) from every image of the MLR manifest at the input size."""
    paths = manifest_images(pq.read_table(mlr_path, columns=["path", "hr_path", "lr_path"]).to_pylist())
    if store_dir.exists():
        shutil.rmtree(store_dir)
    started = time.perf_counter()
    size = (params.train.height, params.train.width)
    count = build(paths, size, store_dir, worker_count(params.protocol.workers))
    log.info("decode: %d images at %dx%d into %s in %.1f s", count, *size, store_dir, time.perf_counter() - started)
    return {"images": count}


class ImageStore:
    """A store folder opened for reading. Pickles as its folder name (DataLoader and Ray workers reopen
    the memory map in their own process instead of copying pixels)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        try:
            meta = json.loads((self.folder / INDEX).read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.folder}: no decoded-image store here (run the decode stage)") from exc
        if "sha256" not in meta:
            raise ValueError(f"{self.folder}: a store from an older version (no digest): run the decode stage again")
        self.size: tuple[int, int] = (int(meta["height"]), int(meta["width"]))
        self.digest: str = meta["sha256"]  # of pixels.npy
        self.row_of = {p: i for i, p in enumerate(meta["paths"])}
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])  # type: ignore[misc]

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.folder / PIXELS, mmap_mode="r")  # (N, 3, H, W) uint8
        return self._pixels

    def rows(self, paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
        """Store rows of `paths` (as the manifest writes them); refuses a store of another size."""
        if size != self.size:
            raise ValueError(f"{self.folder}: images stored at {self.size[0]}x{self.size[1]}, the model needs "
                             f"{size[0]}x{size[1]} (run the decode stage again)")
        missing = [p for p in paths if p not in self.row_of]
        if missing:
            raise KeyError(f"{self.folder}: {len(missing)} image(s) not in the store, e.g. {missing[0]!r} "
                           "(the store is older than the manifest: run the decode stage again)")
        return np.fromiter((self.row_of[p] for p in paths), dtype=np.int64, count=len(paths))

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) uint8 for store rows `rows`: one read, in sorted order, put back in `rows` order."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.pixels.shape[1:]), dtype=np.uint8)
        out[order] = self.pixels[rows[order]]
        return torch.from_numpy(out)


class StorePairs(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Training rows from a store: a batch of HR images, their LR copies and labels (-1: unlabelled).

    Indexed by whole batches (`__getitems__`, which DataLoader calls with a batch sampler), so a batch
    costs two reads of the memory map, not 2B image decodes; use `collate_fn=as_batch`."""

    def __init__(self, store: ImageStore, rows: Sequence[dict], size: tuple[int, int], labels: Sequence[int]) -> None:
        self.store = store
        self.hr = store.rows([r["hr_path"] for r in rows], size)  # (N,)
        self.lr = store.rows([r["lr_path"] for r in rows], size)  # (N,)
        self.labels = torch.tensor(list(labels), dtype=torch.long)  # (N,)

    def __len__(self) -> int:
        return len(self.hr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_hr, x_lr, y = self.__getitems__([i])
        return x_hr[0], x_lr[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.store.read(self.hr[idx]), self.store.read(self.lr[idx]), self.labels[idx]


def as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DataLoader collate function for StorePairs: `__getitems__` already assembled the batch
    (typed Any: DataLoader's stub assumes a list of samples)."""
    return typing.cast(tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch)
