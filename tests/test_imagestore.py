"""The decoded-image store (stage `decode`): the same pixels and features as decoding each file with
Pillow, batches assembled from slices, refusals that name what is wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from rain_model.config import ModelConfig
from rain_model.network import RAIN
from rain_model.sampler import IdentityBalancedSampler
from tasks import decode
from tasks.config import Params
from tasks.images.loaders import load_tensor, read_rows
from tasks.images.store import ImageStore, StorePairs, as_batch, manifest_images
from tasks.infra.tracking import file_hash
from tasks.registry.embed import embed_paths, embed_store
from tests.micro_project import prepared

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    return prepared(tmp_path_factory, "store", {"protocol": {"workers": 2}})


@pytest.fixture()
def store(project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    root, params = project
    monkeypatch.chdir(root)
    return ImageStore(params.store_dir())


def test_store_holds_every_manifest_image_once_with_pillows_pixels(project: tuple[Path, Params],
                                                                  store: ImageStore) -> None:
    _, params = project
    rows = pq.read_table(params.mlr_manifest_path()).to_pylist()
    paths = manifest_images(rows)
    assert len(store.row_of) == len(paths) == len(set(paths))
    assert {r["lr_path"] for r in rows if r["role"] == "train"} <= set(store.row_of)
    size = (params.train.height, params.train.width)
    assert store.pixels.shape == (len(paths), 3, *size) and store.pixels.dtype == np.uint8
    for path in paths:  # written by two processes: every row is its own image, none left at zero
        assert torch.equal(store.read(store.rows([path], size))[0], load_tensor(path, size))


def test_features_from_the_store_equal_the_pillow_path(project: tuple[Path, Params], store: ImageStore) -> None:
    _, params = project
    torch.manual_seed(0)
    model = RAIN(ModelConfig(backbone="resnet18"), 4).eval()
    paths = [r["path"] for r in read_rows(str(params.mlr_manifest_path()), 0, ["query", "gallery"])]
    size = (params.train.height, params.train.width)
    from_store = embed_store(model, store, paths, size, batch_size=5, flip=True)
    from_files = embed_paths(model, paths, size, batch_size=5, flip=True)
    assert from_store.shape == (len(paths), model.generator.backbone.channels[4])
    np.testing.assert_array_equal(from_store, from_files)


def test_a_loader_batch_is_the_sampled_rows_hr_and_lr_images(project: tuple[Path, Params],
                                                             store: ImageStore) -> None:
    _, params = project
    rows = read_rows(str(params.mlr_manifest_path()), 0, ["train"])
    labels = [r["label"] for r in rows]
    size = (params.train.height, params.train.width)
    dataset = StorePairs(pickle.loads(pickle.dumps(store)), rows, size, labels)  # as a worker process gets it
    indices = next(iter(IdentityBalancedSampler(labels, params.train.p, params.train.k, seed=0)))
    sampler = IdentityBalancedSampler(labels, params.train.p, params.train.k, seed=0)  # the same first batch
    x_hr, x_lr, y = next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=as_batch)))
    assert x_hr.shape == x_lr.shape == (len(indices), 3, *size) and x_hr.dtype == torch.uint8
    for j, i in enumerate(indices):
        assert torch.equal(x_hr[j], load_tensor(rows[i]["hr_path"], size))
        assert torch.equal(x_lr[j], load_tensor(rows[i]["lr_path"], size))
        assert int(y[j]) == labels[i]


def test_store_refuses_a_missing_image_another_size_or_an_old_index_naming_it(store: ImageStore,
                                                                           tmp_path: Path) -> None:
    size = store.size
    with pytest.raises(KeyError, match=r"not/in/manifest\.png"):
        store.rows(["not/in/manifest.png"], size)
    with pytest.raises(ValueError, match=f"stored at {size[0]}x{size[1]}, the model needs 256x128"):
        store.rows(list(store.row_of)[:1], (256, 128))
    with pytest.raises(FileNotFoundError, match="run the decode stage"):
        ImageStore(Path(store.folder).parent / "nothing-here")
    old = json.loads((store.folder / "index.json").read_text())
    del old["sha256"]
    (tmp_path / "index.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=f"{tmp_path}: a store from an older version"):
        ImageStore(tmp_path)


def test_decode_rebuilds_the_store_whole(project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    root, params = project
    monkeypatch.chdir(root)
    out = tmp_path / "store"
    out.mkdir()
    (out / "stale.npy").write_bytes(b"left from an older run")
    summary = decode.run(params, params.mlr_manifest_path(), out)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "pixels.npy"]
    assert summary["images"] == len(ImageStore(out).row_of)
    np.testing.assert_array_equal(ImageStore(out).pixels, ImageStore(params.store_dir()).pixels)
    assert ImageStore(out).digest == file_hash(out / "pixels.npy") == ImageStore(params.store_dir()).digest
