"""Rank a gallery folder for query images with a registered model; write an HTML page and a contact sheet.

The model is any version of the registered pyfunc (tasks/registry/pyfunc_model.py), loaded by URI
(``models:/rain-reid@champion``); an alias is resolved to its version first, so the whole search uses
one version even if the alias moves meanwhile. Every image goes through the model's own ``predict``,
so a search ranks exactly as the served model would, with the runtime it is asked for (``runtime``:
``torch`` or ``onnx``, the version's ONNX export through onnxruntime).

Gallery embeddings are cached by content: ``<cache_dir>/<model key>/<sha256 of the file's bytes>.npy``,
where the model key is the sha256 of the model's weights and settings, and of its ONNX file with the
``onnx`` runtime (``RainEmbedder.fingerprint``).
A second search over the same gallery with the same model embeds nothing; a renamed or copied file is
not embedded again; a different model (even under the same alias) never reads another model's vectors.
Cache files are written whole (temporary file + rename), so concurrent searches can share the folder.

What cannot be searched is skipped and listed on the page with the reason, and the search goes on: a file
that cannot be read (a link to ``/proc/1/environ``), what is no regular file (a FIFO, a device, a link to a
folder), a file larger than any image the model accepts (``serve.max_pixels`` uncompressed: refused from its
size, never read), a file the model refuses. Files are hashed in blocks and read at most to that size.

Ranking: embeddings are unit-norm, so the Euclidean distance is ``sqrt(2 - 2 q.g)`` and the order is
the cosine order; ties keep the gallery's path order. With ``id_pattern`` (a regular expression whose
first group is the identity in a file name, e.g. ``^(\\d+)_`` for ``0042_c1_00.png``) matches are
marked right or wrong and the rank-1 rate is reported, over queries whose identity is in the gallery.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")
TILE = (64, 128)  # contact-sheet tile (width, height): a pedestrian crop's 1:2 aspect
HASH_BLOCK = 1 << 20  # bytes read at a time: hashing a file costs one block of memory, whatever its size

Progress = Callable[[int, int], None]  # (images embedded so far, images to embed)


class SearchError(ValueError):
    """The search cannot run (no gallery images, an unreadable query, a bad pattern); says why."""


@dataclass(frozen=True)
class SearchConfig:
    model_uri: str
    gallery_dir: Path
    queries: tuple[Path, ...]
    out_html: Path
    top_k: int = 10
    cache_dir: Path = Path(".cache/embeddings")
    batch_size: int = 32
    id_pattern: str | None = None
    embed_images: bool = False  # thumbnails inside the page (data: URIs), so it can be moved or mailed alone
    runtime: str = "torch"  # what embeds: the weights through PyTorch, or the ONNX export (tasks/registry/runtime.py)

    def __post_init__(self) -> None:
        from tasks.registry.runtime import UnknownRuntime, check_runtime

        try:
            check_runtime(self.runtime)
        except UnknownRuntime as exc:
            raise SearchError(str(exc)) from exc
        if self.top_k < 1:
            raise SearchError(f"top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise SearchError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.queries:
            raise SearchError("give at least one query image")
        if self.id_pattern is not None:
            try:
                if re.compile(self.id_pattern).groups < 1:
                    raise SearchError(f"id_pattern {self.id_pattern!r} needs a group: the identity")
            except re.error as exc:
                raise SearchError(f"id_pattern {self.id_pattern!r} is not a regular expression: {exc}") from exc


@dataclass(frozen=True)
class Match:
    path: Path
    distance: float
    correct: bool | None  # None: identities unknown (no id_pattern)


@dataclass(frozen=True)
class QueryResult:
    query: Path
    matches: tuple[Match, ...]


@dataclass(frozen=True)
class SearchResult:
    html: Path
    sheet: Path
    model_uri: str  # with the alias resolved to a version
    model_key: str
    gallery_images: int
    embedded: int  # distinct gallery images (by content) embedded by this search
    cached: int  # distinct gallery images whose embedding came from the cache
    skipped: tuple[tuple[Path, str], ...]  # gallery files not searched (not an image), with the reason
    results: tuple[QueryResult, ...]
    rank1: float | None  # with id_pattern: share of queries (with a true match) right at rank 1


class EmbeddingCache:
    """One .npy per (model, image content): no index to corrupt, safe to share between processes."""

    def __init__(self, root: Path, model_key: str) -> None:
        self.dir = root / model_key

    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def get(self, sha: str) -> np.ndarray | None:
        path = self._path(sha)
        if not path.exists():
            return None
        try:
            return np.asarray(np.load(path, allow_pickle=False))
        except (OSError, ValueError):  # a damaged entry is recomputed, not trusted
            return None

    def put(self, sha: str, vector: np.ndarray) -> None:
        path = self._path(sha)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
                np.save(fh, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(fh.name, path)
        except OSError as exc:  # full, read-only, or a file where a folder belongs
            raise SearchError(f"embedding cache {self.dir}: cannot write {path.name} ({_why(exc)})") from exc


@dataclass(frozen=True)
class Folder:
    images: list[Path]  # regular files (or links to one) with an image suffix, in path order
    skipped: list[tuple[Path, str]]  # everything else under the folder but its subfolders, with the reason


def scan(folder: Path) -> Folder:
    """Image files under `folder` (recursively, by suffix; links to folders are not followed) and what is left
    out, with the reason: other suffixes, what is no regular file (a FIFO, a device, a dangling link: reading one
    could block or never end), a subfolder that cannot be listed."""
    if not folder.is_dir():
        raise SearchError(f"gallery {folder} is not a folder")
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    pending = [folder]
    while pending:
        here = pending.pop()
        try:
            with os.scandir(here) as found:
                entries = list(found)
        except OSError as exc:
            skipped.append((here, f"not searched: the folder cannot be listed ({_why(exc)})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                    continue
                mode = path.stat().st_mode  # through a link: what it points at
            except OSError as exc:
                skipped.append((path, f"not searched: {_why(exc)}"))
                continue
            if stat.S_ISDIR(mode):
                skipped.append((path, "not searched: a link to a folder (not followed)"))
            elif not stat.S_ISREG(mode):
                skipped.append((path, "not searched: not a regular file"))
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((path, f"not searched: {path.suffix or 'no'} suffix is not one of "
                                      f"{', '.join(IMAGE_SUFFIXES)}"))
            else:
                images.append(path)
    return Folder(sorted(images), sorted(skipped))


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, by suffix), in path order."""
    return scan(folder).images


class Unreadable(Exception):
    """A file that cannot be used: it cannot be read, or it is larger than any image the model accepts."""


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _chunks(path: Path, limit: int) -> Iterator[bytes]:
    """The file's bytes in blocks, never more than `limit` in all (a file found larger raises Unreadable before
    its first block is read, a file that grows while read once it passes the limit)."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise Unreadable(f"{size} bytes, larger than any image this model accepts ({limit} bytes: "
                                 f"serve.max_pixels pixels, uncompressed)")
            total = 0
            while block := fh.read(min(HASH_BLOCK, limit + 1 - total)):
                total += len(block)
                if total > limit:
                    raise Unreadable(f"more than {limit} bytes, larger than any image this model accepts")
                yield block
    except OSError as exc:
        raise Unreadable(f"cannot be read: {_why(exc)}") from exc


def sha256_of(path: Path, limit: int) -> str:
    """sha256 of the file, read in blocks (memory stays at one block whatever the file's size)."""
    digest = hashlib.sha256()
    for block in _chunks(path, limit):
        digest.update(block)
    return digest.hexdigest()


def read_image(path: Path, limit: int) -> bytes:
    """The file's bytes, at most `limit` of them."""
    return b"".join(_chunks(path, limit))


def expand_queries(paths: Sequence[Path]) -> tuple[Path, ...]:
    """Query files as given; a folder stands for every image in it."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(image_files(path))
        elif path.is_file():
            out.append(path)
        elif path.exists():
            raise SearchError(f"query {path} is not a regular file")
        else:
            raise SearchError(f"query {path} does not exist")
    return tuple(out)


def resolve_model_uri(model_uri: str) -> str:
    """models:/name@alias -> models:/name/<version> (pins one version for the whole search)."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", model_uri)
    if not m:
        return model_uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(m.group(1), m.group(2)).version
    except MlflowException as exc:
        raise SearchError(f"model {model_uri}: {' '.join(exc.message.split())}") from exc
    return f"models:/{m.group(1)}/{version}"


def _embed(model: Any, blobs: Sequence[bytes]) -> list[np.ndarray | str]:
    """Embeddings of encoded images; an image the model refuses yields its reason instead."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        return list(np.asarray(model.predict(pd.DataFrame({"image": list(blobs)}))))
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        if len(blobs) == 1:
            return [exc.message]
    # Rare: a bad file in the batch; find it one image at a time rather than failing the search.
    return [item for blob in blobs for item in _embed(model, [blob])]


@dataclass(frozen=True)
class _GalleryVectors:
    kept: list[tuple[Path, str]]  # gallery files the model accepted, in path order, with their content hash
    vectors: dict[str, np.ndarray]  # by content hash
    skipped: tuple[tuple[Path, str], ...]  # gallery files the model refused, with the reason
    embedded: int
    cached: int


def run(cfg: SearchConfig, progress: Progress | None = None) -> SearchResult:
    """Rank the gallery for every query with one pinned model version; write the HTML page and the sheet."""
    from mlflow.exceptions import MlflowException

    from tasks.registry.runtime import NoOnnxModel, load_pyfunc
    from tasks.registry.serve import image_byte_limit, model_limits

    folder = scan(cfg.gallery_dir)
    gallery = folder.images
    if not gallery:
        raise SearchError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {cfg.gallery_dir}")
    if cfg.cache_dir.exists() and not cfg.cache_dir.is_dir():
        raise SearchError(f"--cache-dir {cfg.cache_dir}: a file, not a folder")
    try:  # before any work: a cache that cannot be written would fail the search after its first batch
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"--cache-dir {cfg.cache_dir}: not a folder that can be made ({_why(exc)})") from exc
    uri = resolve_model_uri(cfg.model_uri)
    try:
        model = load_pyfunc(uri, cfg.runtime)
    except NoOnnxModel as exc:
        raise SearchError(f"model {exc.message}") from exc
    except MlflowException as exc:
        raise SearchError(f"model {uri}: {' '.join(exc.message.split())}") from exc
    except OSError as exc:  # a local path that is no model
        raise SearchError(f"model {uri}: {_why(exc)}") from exc
    model_key = _model_key(model, uri)
    limit = image_byte_limit(model_limits(model))
    found = _gallery_vectors(model, gallery, EmbeddingCache(cfg.cache_dir, model_key), cfg, limit, progress)

    q_feat = _query_vectors(model, cfg.queries, limit)  # (Q, d)
    g_feat = np.stack([found.vectors[sha] for _, sha in found.kept]).astype(np.float32)  # (G, d)
    dist = np.sqrt(np.clip(2.0 - 2.0 * (q_feat @ g_feat.T), 0.0, None))  # (Q, G), unit vectors
    results, rank1 = _rank_queries(cfg, [p for p, _ in found.kept], dist)

    sheet = cfg.out_html.with_suffix(".png")
    contact_sheet(results, sheet, cfg.top_k)
    result = SearchResult(cfg.out_html, sheet, uri, model_key, len(gallery), found.embedded, found.cached,
                          (*folder.skipped, *found.skipped), tuple(results), rank1)
    write_html(result, cfg)
    log.info("search: %d queries against %d gallery images (%d embedded, %d cached) -> %s",
             len(cfg.queries), len(gallery), result.embedded, result.cached, cfg.out_html)
    return result


def _model_key(model: Any, uri: str) -> str:
    """The model's fingerprint (weights and settings); a model without one is keyed by where it came from."""
    import mlflow

    return str(getattr(model.unwrap_python_model(), "fingerprint", "")) or \
        hashlib.sha256(f"{mlflow.get_tracking_uri()} {uri}".encode()).hexdigest()


def _gallery_vectors(model: Any, gallery: list[Path], cache: EmbeddingCache, cfg: SearchConfig, limit: int,
                     progress: Progress | None) -> _GalleryVectors:
    """A vector per distinct gallery content: from the cache, else embedded in batches (and cached). A file that
    cannot be read, or is larger than `limit` bytes, is skipped with the reason."""
    unreadable: dict[Path, str] = {}
    hashed: list[tuple[Path, str]] = []
    for path in gallery:
        try:
            hashed.append((path, sha256_of(path, limit)))
        except Unreadable as exc:
            unreadable[path] = str(exc)
    vectors: dict[str, np.ndarray] = {}
    for sha in {sha for _, sha in hashed}:
        if (hit := cache.get(sha)) is not None:
            vectors[sha] = hit
    n_cached = len(vectors)
    todo = sorted({sha: p for p, sha in hashed if sha not in vectors}.items())
    rejected = _embed_into_cache(model, todo, cache, vectors, cfg.batch_size, limit, progress)
    kept = [(p, sha) for p, sha in hashed if sha in vectors]
    if not kept:
        raise SearchError(f"none of the {len(gallery)} files under {cfg.gallery_dir} is a usable image")
    skipped = tuple(sorted([*unreadable.items(), *((p, rejected[sha]) for p, sha in hashed if sha in rejected)]))
    for path, reason in skipped:
        log.warning("search: skipped gallery file %s: %s", path, reason)
    return _GalleryVectors(kept, vectors, skipped, len(todo) - len(rejected), n_cached)


def _embed_into_cache(model: Any, todo: list[tuple[str, Path]], cache: EmbeddingCache,
                      vectors: dict[str, np.ndarray], batch_size: int, limit: int,
                      progress: Progress | None) -> dict[str, str]:
    """Embed `todo` (content hash, file) in batches into `vectors` and the cache; returns the refused
    hashes with the reason (the model's, or why the file could not be read again)."""
    rejected: dict[str, str] = {}
    if progress:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        chunk = []
        for sha, path in todo[start:start + batch_size]:
            try:
                blob = read_image(path, limit)
            except Unreadable as exc:  # gone or changed since it was hashed
                rejected[sha] = str(exc)
                continue
            if hashlib.sha256(blob).hexdigest() != sha:  # never cache a vector under another content's hash
                rejected[sha] = "changed while the search read it"
                continue
            chunk.append((sha, blob))
        for (sha, _), out in zip(chunk, _embed(model, [blob for _, blob in chunk]) if chunk else [], strict=True):
            if isinstance(out, str):
                rejected[sha] = out
            else:
                cache.put(sha, out)
                vectors[sha] = out
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return rejected


def _query_vectors(model: Any, queries: Sequence[Path], limit: int) -> np.ndarray:
    """(Q, d) query embeddings, computed every time (a few images); an unreadable query is an error."""
    blobs = []
    for path in queries:
        try:
            blobs.append(read_image(path, limit))
        except Unreadable as exc:
            raise SearchError(f"query {path}: {exc}") from exc
    q_out = _embed(model, blobs)
    for path, out in zip(queries, q_out, strict=True):
        if isinstance(out, str):
            raise SearchError(f"query {path}: {out}")
    return np.stack([np.asarray(v, dtype=np.float32) for v in q_out])


def _rank_queries(cfg: SearchConfig, gallery: list[Path], dist: np.ndarray) -> tuple[list[QueryResult], float | None]:
    """Each query's top-k gallery files by distance (ties in path order), marked right or wrong when
    `id_pattern` gives identities; with the rank-1 rate over queries whose identity is in the gallery."""
    identity = _identity_fn(cfg.id_pattern)
    results = []
    hits = []
    g_ids = [identity(p) for p in gallery]
    for qi, query in enumerate(cfg.queries):
        order = np.argsort(dist[qi], kind="stable")[: cfg.top_k]
        q_id = identity(query)
        matches = tuple(Match(gallery[j], float(dist[qi, j]),
                              None if q_id is None else g_ids[j] == q_id) for j in order)
        results.append(QueryResult(query, matches))
        if q_id is not None and q_id in g_ids:
            hits.append(bool(matches[0].correct))
    return results, float(np.mean(hits)) if hits else None


def _identity_fn(pattern: str | None) -> Callable[[Path], str | None]:
    if pattern is None:
        return lambda _: None
    compiled = re.compile(pattern)

    def identity(path: Path) -> str | None:
        m = compiled.search(path.name)
        return m.group(1) if m else None

    return identity


_GREY, _GREEN, _RED, _LIGHT = (128, 128, 128), (0, 170, 0), (210, 0, 0), (200, 200, 200)


def contact_sheet(results: Sequence[QueryResult], path: Path, top_k: int) -> Path:
    """One row per query: the query (grey frame), then its top-k, framed green/red when identities are known."""
    from PIL import Image, ImageDraw, ImageOps

    from tasks.images.imageio import load_rgb
    from tasks.images.loaders import LOAD_FORMATS

    pad, label_h = 4, 14
    tile_w, tile_h = TILE
    width = pad + (tile_w + pad) * (1 + top_k) + pad  # an extra gap after the query
    height = pad + (tile_h + label_h + pad) * len(results)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def tile(img_path: Path, x: int, y: int, frame: tuple[int, int, int], label: str) -> None:
        # Decoded as strictly as the model did (every file shown here was accepted by it).
        fitted = ImageOps.pad(load_rgb(img_path, LOAD_FORMATS), (tile_w - 4, tile_h - 4), color=(255, 255, 255))
        sheet.paste(fitted, (x + 2, y + 2))
        draw.rectangle((x, y, x + tile_w - 1, y + tile_h - 1), outline=frame, width=2)
        draw.text((x + 2, y + tile_h + 1), label, fill=(0, 0, 0))

    for row, res in enumerate(results):
        y = pad + row * (tile_h + label_h + pad)
        tile(res.query, pad, y, _GREY, "query")
        for k, match in enumerate(res.matches):
            frame = _LIGHT if match.correct is None else (_GREEN if match.correct else _RED)
            tile(match.path, pad + (tile_w + pad) * (k + 1) + pad, y, frame, f"{k + 1}: {match.distance:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _src(target: Path, page: Path) -> str:
    """A link from the page to a local file, relative so the page and its images can move together."""
    return quote(os.path.relpath(target.resolve(), page.resolve().parent))


def _thumbnail(target: Path, height: int = 2 * TILE[1]) -> str:
    """The image as a data: URI (PNG, at most `height` px high), decoded as strictly as the model did."""
    import base64
    import io

    from tasks.images.imageio import load_rgb
    from tasks.images.loaders import LOAD_FORMATS

    img = load_rgb(target, LOAD_FORMATS)
    img.thumbnail((4 * height, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


LEGEND = ("Each row: the query (grey frame), then the gallery images nearest to it, rank 1 first. "
          "<b>d</b> is the Euclidean distance between the two unit-length embeddings: 0 for the same vector, "
          "&radic;2 for orthogonal ones, 2 at most.")
LEGEND_ID = (" With identities from file names: <span style=\"color:#0a0\">green frame</span> = the same "
             "person as the query, <span style=\"color:#d00\">red frame</span> = another person.")


def write_html(result: SearchResult, cfg: SearchConfig) -> Path:
    page = cfg.out_html
    e = html.escape

    def src(target: Path) -> str:
        return _thumbnail(target) if cfg.embed_images else _src(target, page)

    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>rain search: {len(result.results)} queries</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:4px;"
        "text-align:center;font-size:12px}figure img{height:128px;border:3px solid #ccc}"
        ".query img{border-color:#888}.right img{border-color:#0a0}.wrong img{border-color:#d00}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}</style></head><body>",
        "<h1>Gallery search</h1><table>",
        f"<tr><th>model</th><td>{e(cfg.model_uri)} &rarr; <code>{e(result.model_uri)}</code></td></tr>",
        f"<tr><th>model key</th><td><code>{e(result.model_key[:16])}</code></td></tr>",
        f"<tr><th>gallery</th><td>{e(str(cfg.gallery_dir))}: {result.gallery_images} images, "
        f"{result.embedded} embedded now, {result.cached} from the cache, {len(result.skipped)} skipped</td></tr>",
    ]
    if result.rank1 is not None:
        parts.append(f'<tr><th>rank-1</th><td id="rank1" data-rank1="{result.rank1:.6f}">'
                     f"{100 * result.rank1:.1f}% (identities from <code>{e(cfg.id_pattern or '')}</code>)</td></tr>")
    parts.append("</table>")
    parts.append(f'<p class="legend">{LEGEND}{LEGEND_ID if cfg.id_pattern else ""}</p>')
    if not cfg.embed_images:  # an embedded page stands alone; the sheet is the same picture as a file
        parts.append(f'<p><a href="{_src(result.sheet, page)}">Contact sheet</a> (PNG)</p>')
    if result.skipped:
        parts.append(f'<p><a href="#skipped">{len(result.skipped)} gallery file(s) skipped</a></p>')
    for res in result.results:
        parts.append(f'<section class="query-result" data-query="{e(str(res.query))}">')
        parts.append(f"<h2>{e(res.query.name)}</h2>")
        parts.append(f'<figure class="query"><img src="{src(res.query)}" alt="query">'
                     f"<figcaption>query</figcaption></figure>")
        for rank, m in enumerate(res.matches, start=1):
            cls = "" if m.correct is None else (" right" if m.correct else " wrong")
            parts.append(f'<figure class="match{cls}" data-rank="{rank}" data-path="{e(str(m.path))}" '
                         f'data-distance="{m.distance:.6f}"><img src="{src(m.path)}" alt="rank {rank}">'
                         f"<figcaption>{rank}. {e(m.path.name)}<br>d = {m.distance:.3f}</figcaption></figure>")
        parts.append("</section>")
    if result.skipped:
        parts.append('<h2 id="skipped">Skipped gallery files</h2><ul>')
        parts.extend(f"<li>{e(str(p))}: {e(reason)}</li>" for p, reason in result.skipped)
        parts.append("</ul>")
    parts.append("</body></html>")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(parts) + "\n")
    return page
