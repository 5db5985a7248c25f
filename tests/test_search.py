"""`rain search` with the champion of a trained micro project, on its synthetic test split.

The gallery folder holds the HR gallery images of trial 0 (one per test identity, from the other
camera) and the queries are that trial's LR (MLR) queries: the very set evaluate scored. The trained
project evaluates with the cosine distance and one gallery draw, which is the ranking unit-norm
embeddings give, so the rank-1 read off the HTML must equal evaluate's LR rank-1. Tolerance: one query
(1/12 here), for a near-tie that float noise between the two code paths could flip; the test also
checks that every query whose top two gallery images are clearly apart has the same rank-1 image in
both. A second search embeds no gallery image.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.trained_project import MODEL

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(champion_project: Path) -> Path:
    return champion_project


@pytest.fixture(scope="module")
def split(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Trial 0's gallery copied into a folder, its LR queries, and every file's identity."""
    from tasks.images.loaders import read_rows

    mlr = str(project / "data/manifests/synthetic-mlr.parquet")
    gallery_rows = read_rows(mlr, 0, ["gallery"])
    query_rows = [r for r in read_rows(mlr, 0, ["query"]) if r["query_set"] == "mlr"]
    folder = tmp_path_factory.mktemp("gallery")
    for r in gallery_rows:
        shutil.copy(project / r["path"], folder / Path(r["path"]).name)
    identity = {Path(r["path"]).name: r["person_id"] for r in gallery_rows + query_rows}
    return {"gallery": folder, "queries": tuple(project / r["path"] for r in query_rows), "identity": identity,
            "gallery_paths": [str(project / r["path"]) for r in gallery_rows]}


def _rank1_paths(page: Path) -> dict[str, str]:
    """Query file name -> the file name the page shows at rank 1."""
    text = page.read_text()
    out = {}
    for section in re.findall(r'<section class="query-result" data-query="([^"]+)">(.*?)</section>', text, re.S):
        query, body = section
        first = re.search(r'data-rank="1" data-path="([^"]+)"', body)
        assert first, body
        out[Path(query).name] = Path(first.group(1)).name
    return out


def test_search_reproduces_evaluate_rank1_and_a_second_search_embeds_nothing(
        project: Path, split: dict[str, Any], tmp_path: Path, mlflow_global: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from tasks.registry import search

    embedded: list[int] = []  # images sent to the model, per call
    real_embed = search._embed
    def counting_embed(model: Any, blobs: Any) -> Any:
        embedded.append(len(blobs))
        return real_embed(model, blobs)

    monkeypatch.setattr(search, "_embed", counting_embed)
    cfg = search.SearchConfig(model_uri=f"models:/{MODEL}@champion", gallery_dir=split["gallery"],
                              queries=split["queries"], out_html=tmp_path / "out" / "search.html", top_k=5,
                              cache_dir=tmp_path / "cache", batch_size=4, id_pattern=r"^(\d+)_")
    progress: list[tuple[int, int]] = []
    first = search.run(cfg, progress=lambda done, total: progress.append((done, total)))

    n_gallery, n_queries = len(split["gallery_paths"]), len(split["queries"])
    assert (first.gallery_images, first.embedded, first.cached) == (n_gallery, n_gallery, 0)
    assert sum(embedded) == n_gallery + n_queries and progress[-1] == (n_gallery, n_gallery)
    ranked = _rank1_paths(first.html)
    assert len(ranked) == n_queries
    hits = [split["identity"][g] == split["identity"][q] for q, g in ranked.items()]
    metrics = json.loads((project / "reports/synthetic/metrics.json").read_text())
    assert metrics["evaluations_per_row"] == 1  # one trial, one gallery draw: exactly this set
    assert abs(np.mean(hits) - metrics["rank1"]) <= 1 / n_queries + 1e-9, (np.mean(hits), metrics["rank1"])
    assert first.rank1 == pytest.approx(np.mean(hits))  # --id-pattern agrees with the manifest
    _assert_same_rank1_as_training_features(project, split, ranked)
    with Image.open(first.sheet) as sheet:
        assert sheet.size[0] > 5 * 64 and sheet.size[1] >= n_queries * 128

    # Second search: every gallery vector comes from the cache, only the queries go to the model.
    embedded.clear()
    again = search.run(cfg)
    assert (again.embedded, again.cached) == (0, n_gallery)
    assert sum(embedded) == n_queries
    assert _rank1_paths(again.html) == ranked

    # Same content under a new name is not embedded again; a file that is not an image is skipped.
    shutil.copy(split["gallery"] / sorted(ranked.values())[0], split["gallery"] / "zz_copy.png")
    (split["gallery"] / "zz_broken.png").write_bytes(b"not an image at all")
    embedded.clear()
    third = search.run(cfg)
    assert third.embedded == 0 and [p.name for p, _ in third.skipped] == ["zz_broken.png"]
    assert sum(embedded) == 1 + n_queries  # the broken file was tried once (and refused), nothing else
    assert "zz_broken.png" in third.html.read_text()
    (split["gallery"] / "zz_copy.png").unlink()
    (split["gallery"] / "zz_broken.png").unlink()


def _assert_same_rank1_as_training_features(project: Path, split: dict[str, Any], ranked: dict[str, str]) -> None:
    """The rank-1 image per query from tasks.registry.embed features (the evaluation's code path)."""
    import torch

    from tasks.config import load_params
    from tasks.registry.embed import embed_paths, load_model

    params = load_params(project / "params.yaml")
    info = json.loads((project / "models/synthetic/train.json").read_text())["trials"]["0"]
    model = load_model(project / "models/synthetic" / info["weights"], params.model, info["num_classes"])
    size = (params.train.height, params.train.width)
    flip = params.evaluate.flip
    q = torch.nn.functional.normalize(torch.from_numpy(
        embed_paths(model, [str(p) for p in split["queries"]], size, flip=flip)))
    g = torch.nn.functional.normalize(torch.from_numpy(embed_paths(model, split["gallery_paths"], size, flip=flip)))
    dist = torch.cdist(q, g).numpy()  # (Q, G)
    clear = 0
    for i, query in enumerate(split["queries"]):
        order = np.argsort(dist[i])
        if dist[i, order[1]] - dist[i, order[0]] > 1e-4:
            clear += 1
            assert ranked[query.name] == Path(split["gallery_paths"][order[0]]).name, query.name
    assert clear >= len(split["queries"]) - 1


def test_cli_search_writes_the_page_and_sheet_and_reuses_the_cache(project: Path, split: dict[str, Any],
                                                                   tmp_path: Path, mlflow_global: None) -> None:
    from flows.cli import app

    queries = [str(p) for p in split["queries"][:3]]
    args = ["search", "--project", str(project), "--model", f"models:/{MODEL}@champion",
            "--gallery", str(split["gallery"]), "--query", *queries, "--top-k", "3",
            "--out", str(tmp_path / "page.html"), "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"({len(split['gallery_paths'])} embedded, 0 from the cache" in first.output
    assert "Embedding gallery" in first.output  # the progress bar
    assert (tmp_path / "page.html").exists() and (tmp_path / "page.png").exists()
    assert len(_rank1_paths(tmp_path / "page.html")) == 3
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "(0 embedded," in again.output, again.output


def test_an_embedded_page_stands_alone_with_its_legend_and_skipped_files(project: Path, split: dict[str, Any],
                                                                          tmp_path: Path, mlflow_global: None) -> None:
    from flows.cli import app

    gallery = tmp_path / "gallery"
    shutil.copytree(split["gallery"], gallery)
    (gallery / "notes.txt").write_text("not a picture")
    (gallery / "broken.png").write_bytes(b"not a png either")
    page = tmp_path / "out" / "page.html"
    result = CliRunner().invoke(app, [
        "search", "--project", str(project), "--model", f"models:/{MODEL}@champion", "--gallery", str(gallery),
        "--query", str(split["queries"][0]), "--top-k", "2", "--out", str(page), "--id-pattern", r"^(\d+)_",
        "--cache-dir", str(tmp_path / "cache"), "--embed-images"])
    assert result.exit_code == 0, result.output
    assert "2 skipped" in result.output
    moved = tmp_path / "elsewhere.html"
    page.rename(moved)  # an embedded page needs nothing beside it
    text = moved.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "green frame" in text and "red frame" in text and "<b>d</b> is the Euclidean distance" in text
    skipped = re.search(r'<h2 id="skipped">.*?</ul>', text, re.S)
    assert skipped and "notes.txt" in skipped.group(0) and "broken.png" in skipped.group(0)


def test_search_refuses_an_empty_gallery_and_a_missing_query(project: Path, tmp_path: Path,
                                                             mlflow_global: None) -> None:
    from flows.cli import app

    (tmp_path / "empty").mkdir()
    q = tmp_path / "q.png"
    q.write_bytes(b"x")
    result = CliRunner().invoke(app, ["search", "--project", str(project), "--gallery", str(tmp_path / "empty"),
                                      "--query", str(q)])
    assert result.exit_code == 2 and "no images" in result.output
    result = CliRunner().invoke(app, ["search", "--project", str(project), "--gallery", str(tmp_path),
                                      "--query", str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_search_has_help() -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["search", "--help"])
    assert result.exit_code == 0 and "--gallery" in result.output and "--top-k" in result.output


# ----------------------------------------------------------------------------------------------------
# What cannot be searched (issue 28, item 5), with a stand-in for the registered model: no trained project.


class _StandIn:
    """The registered pyfunc as `search.run` uses it: `predict` on a table of encoded images (the mean colour of
    each as a unit vector), refusing what is not an image as the model does; its fingerprint and limits."""

    fingerprint = "stand-in"

    def __init__(self) -> None:
        from tasks.config import ServeConfig

        self.limits = ServeConfig(max_pixels=64 * 128, max_images=32)

    def unwrap_python_model(self) -> _StandIn:
        return self

    def predict(self, table: Any) -> np.ndarray:
        import io

        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
        from PIL import Image

        out = []
        for row, blob in enumerate(table["image"]):
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
            except OSError as exc:
                raise MlflowException(f"row {row}: not an image", error_code=INVALID_PARAMETER_VALUE) from exc
            v = rgb.mean(axis=(0, 1)) + 1.0
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 64), colour).save(path)
    return path


def _unreadable_link(gallery: Path) -> Path:
    link = gallery / "environ.png"
    link.symlink_to("/proc/1/environ")
    try:
        link.read_bytes()
    except PermissionError:
        return link
    pytest.skip("/proc/1/environ is readable here: no file to refuse this process")


def test_entries_that_cannot_be_read_are_listed_with_the_reason_and_the_search_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import tracemalloc

    import mlflow.pyfunc

    from tasks.registry import search

    gallery = tmp_path / "gallery"
    good = [_png(gallery / "0001_a.png", (200, 30, 30)), _png(gallery / "0002_b.png", (30, 200, 30)),
            _png(gallery / "sub" / "0003_c.png", (30, 30, 200))]
    expected = {  # name: a phrase of the reason it is skipped
        "environ.png": "cannot be read: Permission denied",  # a 74-line PermissionError ended the search
        "sparse.png": "bytes, larger than any image this model accepts",  # read whole to hash it: +3 GB
        "pipe.png": "not a regular file",
        "dangling.png": "not searched: No such file or directory",
        "folder-link.png": "a link to a folder (not followed)",
        "text.png": "not an image",
    }
    _unreadable_link(gallery)
    with (gallery / "sparse.png").open("wb") as fh:
        fh.truncate(3 * 2**30)  # 3 GiB, no blocks on disk
    os.mkfifo(gallery / "pipe.png")  # reading it would wait for a writer forever
    (gallery / "dangling.png").symlink_to(tmp_path / "gone.png")
    (gallery / "folder-link.png").symlink_to(gallery / "sub")
    (gallery / "text.png").write_text("not a picture")
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: _StandIn())
    cfg = search.SearchConfig(model_uri="models:/stand-in/1", gallery_dir=gallery, queries=(good[1],),
                              out_html=tmp_path / "out" / "page.html", top_k=3, cache_dir=tmp_path / "cache")
    search.run(cfg)  # modules imported, the cache filled: what the traced run allocates is its own reading
    tracemalloc.start()
    try:
        result = search.run(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    skipped = {p.name: reason for p, reason in result.skipped}
    assert set(skipped) == set(expected), skipped
    for name, phrase in expected.items():
        assert phrase in skipped[name], (name, skipped[name])
    assert result.results[0].matches[0].path == good[1]  # the query itself, at distance 0
    assert {m.path for m in result.results[0].matches} == set(good)  # every readable image searched
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated at the peak"  # one block is 1 MiB
    page = result.html.read_text()
    assert all(name in page for name in expected)


def test_files_are_hashed_in_blocks_and_read_no_further_than_the_limit(tmp_path: Path) -> None:
    import hashlib

    from tasks.registry.search import HASH_BLOCK, Unreadable, read_image, sha256_of

    data = bytes(range(256)) * (3 * HASH_BLOCK // 256 + 7)  # three blocks and a bit
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert sha256_of(path, len(data)) == hashlib.sha256(data).hexdigest()
    assert read_image(path, len(data)) == data
    with pytest.raises(Unreadable, match=rf"{len(data)} bytes, larger than any image this model accepts "
                                         rf"\({len(data) - 1} bytes"):
        sha256_of(path, len(data) - 1)


def test_an_unreadable_query_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    from flows.cli import app

    gallery = tmp_path / "gallery"
    _png(gallery / "0001_a.png", (200, 30, 30))
    query = _unreadable_link(gallery)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: _StandIn())
    result = CliRunner().invoke(app, ["search", "--project", str(tmp_path), "--model", "models:/stand-in/1",
                                      "--gallery", str(gallery), "--query", str(query),
                                      "--out", str(tmp_path / "page.html")])
    assert result.exit_code == 2, result.output
    assert f"error: query {query}: cannot be read: Permission denied" in result.output
    assert "Traceback" not in result.output
