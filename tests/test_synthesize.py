"""The MLR protocol: splits, roles, rates and determinism of the download -> manifest -> synthesize chain."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import download, manifest, synthesize
from tasks.config import Params, ProtocolConfig, SyntheticConfig
from tasks.protocol import mlr


def small_params(workers: int = 1, trials: int = 3) -> Params:
    return Params(synthetic=SyntheticConfig(identities=10, test_identities=0, images_per_camera=2, height=64, width=32),
                  protocol=ProtocolConfig(trials=trials, workers=workers))


def build(root: Path, params: Params, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], dict]:
    monkeypatch.chdir(root)
    download.run(params, params.raw_dir())
    manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())
    summary = synthesize.run(params, params.raw_dir(), params.manifest_path(), params.lr_dir(),
                             params.mlr_manifest_path())
    return pq.read_table(params.mlr_manifest_path()).to_pylist(), summary


def digest_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_roles_rates_and_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = small_params()
    rows, summary = build(tmp_path, params, monkeypatch)
    assert summary["images"] == 10 * 2 * 2 and summary["test_identities"] == 5
    for trial in range(3):
        t = [r for r in rows if r["trial"] == trial]
        train_ids = {r["person_id"] for r in t if r["role"] == "train"}
        test_ids = {r["person_id"] for r in t if r["role"] in ("query", "gallery", "gallery_pool")}
        assert train_ids and test_ids and not train_ids & test_ids
        assert len(train_ids | test_ids) == 10
        gallery = [r for r in t if r["role"] == "gallery"]
        assert sorted(r["person_id"] for r in gallery) == sorted(test_ids)  # one HR image per identity
        assert all(r["rate"] == 1 and r["camera_id"] == 0 for r in gallery)
        queries = [r for r in t if r["role"] == "query"]
        assert {r["query_set"] for r in queries} == {"mlr", "hr", "r8"}
        assert all(r["camera_id"] == 1 for r in queries)  # the down-sampled camera
        assert all(r["rate"] in (2, 3, 4) for r in queries if r["query_set"] == "mlr")
        assert all(r["rate"] == 8 for r in queries if r["query_set"] == "r8")
        labels = sorted({r["label"] for r in t if r["role"] == "train"})
        assert labels == list(range(len(train_ids)))
    # Splits differ between trials (seeded, not fixed).
    splits = {frozenset(r["person_id"] for r in rows if r["trial"] == k and r["role"] == "gallery") for k in range(3)}
    assert len(splits) > 1
    for r in rows:  # every referenced image exists, LR copies at the HR size
        assert Path(r["path"]).exists()
        if r["lr_path"]:
            assert Image.open(r["lr_path"]).size == Image.open(r["hr_path"]).size


def test_same_seed_gives_byte_identical_outputs_whatever_the_worker_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build(tmp_path / "a", small_params(workers=1), monkeypatch)
    build(tmp_path / "b", small_params(workers=2), monkeypatch)
    for rel in ("data/manifests", "data/lr", "data/raw"):
        assert digest_tree(tmp_path / "a" / rel) == digest_tree(tmp_path / "b" / rel), rel


def test_rate_draw_depends_on_seed_and_path_only() -> None:
    cfg = ProtocolConfig(seed=3)
    paths = [f"cam_1/{i:04d}_1_00.png" for i in range(200)]
    forward = [mlr.draw_rate(p, cfg) for p in paths]
    backward = [mlr.draw_rate(p, cfg) for p in reversed(paths)][::-1]
    assert forward == backward
    assert set(forward) == {2, 3, 4}
    assert forward != [mlr.draw_rate(p, ProtocolConfig(seed=4)) for p in paths]


def stripe_contrast(period: int, rate: int) -> float:
    """Largest jump between neighbouring rows of horizontal stripes after degrading (255 = untouched)."""
    rows = ((np.arange(64) // (period // 2)) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(rows[:, None, None], (64, 32, 3)).copy())
    out = np.asarray(mlr.degrade(img, rate), dtype=np.float32)
    assert out.shape == (64, 32, 3)  # back at the original size
    return float(np.abs(np.diff(out[8:-8, 8:-8, 0], axis=0)).max())


@pytest.mark.parametrize(("period", "rate", "survives"), [(2, 4, False), (2, 8, False), (16, 2, True)])
def test_degrade_erases_fine_stripes_and_keeps_coarse_ones(period: int, rate: int, survives: bool) -> None:
    assert (stripe_contrast(period, rate) > 50) == survives  # measured: 0-1 erased, 95 kept


def test_validation_identities_are_training_identities_held_out_and_leave_the_test_split_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """protocol.val_identities: drawn from the training identities (disjoint from train and test), with their
    own LR queries and HR gallery; the test split, its gallery draw and every test row are those without it."""
    import dataclasses

    (tmp_path / "a").mkdir()
    without, _ = build(tmp_path / "a", small_params(), monkeypatch)
    params = small_params()
    params = dataclasses.replace(params, protocol=dataclasses.replace(params.protocol, val_identities=2))
    (tmp_path / "b").mkdir()
    rows, _ = build(tmp_path / "b", params, monkeypatch)
    test_roles = ("query", "gallery", "gallery_pool")
    val_roles = ("val_query", "val_gallery", "val_gallery_pool")
    for trial in range(3):
        t = [r for r in rows if r["trial"] == trial]
        ids = {role: {r["person_id"] for r in t if r["role"] == role} for role in ("train", *test_roles, *val_roles)}
        val = ids["val_query"]
        assert len(val) == 2 and ids["val_gallery"] == val
        assert not val & ids["train"] and not val & ids["query"]
        assert all(r["query_set"] == "mlr" and r["rate"] in (2, 3, 4) and r["camera_id"] == 1
                   for r in t if r["role"] == "val_query")
        assert sorted({r["label"] for r in t if r["role"] == "train"}) == list(range(len(ids["train"])))
        before = [r for r in without if r["trial"] == trial]
        assert ids["train"] | val == {r["person_id"] for r in before if r["role"] == "train"}

        def test_rows(table: list[dict]) -> list[tuple]:
            return sorted((r["role"], r["query_set"], r["person_id"], Path(r["path"]).name) for r in table
                          if r["role"] in test_roles)
        assert test_rows(t) == test_rows(before)
    # Seeded: another trial holds out other identities.
    assert len({frozenset(r["person_id"] for r in rows if r["trial"] == k and r["role"] == "val_gallery")
                for k in range(3)}) > 1


def test_more_validation_identities_than_training_ones_fail_naming_the_key() -> None:
    cfg = ProtocolConfig(val_identities=4)
    with pytest.raises(ValueError, match=r"protocol.val_identities = 4: trial 0 has 5 training identities"):
        mlr.split_validation({1, 2, 3, 4, 5}, 0, cfg)
    train, val = mlr.split_validation({1, 2, 3, 4, 5, 6}, 0, cfg)
    assert len(val) == 4 and train == {1, 2, 3, 4, 5, 6} - val
