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
