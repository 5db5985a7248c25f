"""A registered model over HTTP: MLflow's scoring app behind a guard that bounds what one request may cost.

`mlflow models serve` runs MLflow's scoring app (``mlflow.pyfunc.scoring_server.init``) under uvicorn, and
leaves three costs open that the model itself cannot close:

- the whole body is read into memory before anything looks at it, whatever its size;
- JSON is parsed by ``json.loads``, which raises ``RecursionError`` on deep nesting (about 1,000 levels);
  the scoring server turns only ``MlflowException`` into an answer (``_async_catch_mlflow_exception``),
  so Starlette answers 500 to a body such as ``[[[[...]]]]``;
- its timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60 s) answers 504 but cannot stop the thread
  doing the work (``asyncio.to_thread``): that thread keeps its CPU and memory until it is done.

:func:`build_app` builds the same scoring app and wraps it in :class:`RequestGuard`, a plain ASGI
middleware that answers before MLflow parses anything: 413 to a body over ``max_body_bytes`` (the
declared Content-Length, or counted while reading: never buffered past the limit), 400 to JSON nested
deeper than ``MAX_JSON_DEPTH``, 415 to a request without a Content-Type and 400 to one with several (MLflow
fails on the first with a 500 and reads the first of several, so a guard reading another would let deep JSON
through), and 400 to more rows than the model's ``serve.max_images`` in any type MLflow parses (JSON values, CSV
lines, a Parquet footer's row count), since the memory MLflow's parsing takes follows rows, not bytes. Once a
large request is answered, the memory it freed is handed back to the system (``malloc_trim``). The model
refuses more images or pixels than its ``serve`` limits (400, tasks/registry/pyfunc_model.py), checked on image
headers; that holds under `mlflow models serve` too. :func:`serve` runs the guarded app with uvicorn and at most
``max_connections`` requests in flight (503 beyond), of which it reads and works on as many as the machine has
cores at once (the others wait, their body unread): memory is bounded by that many bodies and their work, however
many requests are in flight, and the work behind a 504 by the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

from tasks.config import ServeConfig

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# MLflow's request layouts nest 4 levels ({"dataframe_split": {"data": [[...]]}}); 32 leaves room for
# `params` and stays far below what json.loads can parse without RecursionError.
MAX_JSON_DEPTH = 32
# Room for what an encoded image holds beside its pixels (header, EXIF, ICC profile) and for the JSON
# around the images.
IMAGE_SLACK_BYTES = 64 * 1024
JSON_SLACK_BYTES = 64 * 1024
TRIM_AFTER_BYTES = 1 << 20  # a request body this large or larger: its memory is handed back once answered
BODY_TIMEOUT_S = 120  # to receive a body once its turn has come (270 MB at 2.3 MB/s): a stalled client gets a 408
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

# What MLflow's scoring server parses (mlflow.pyfunc.scoring_server.CONTENT_TYPES).
CONTENT_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")

# Rows per request are the model's serve.max_images, checked on the body before MLflow builds a table from it:
# memory follows rows, not bytes (a 270 KB Parquet body of 100 M empty rows took +2.6 GB, 4 M JSON rows of `[""]`,
# 20 MB, +913 MB). A JSON request holds one value per row and column (and its layout a few): VALUES_PER_ROW leaves
# room for columns sent along with `image`, MAX_COLUMNS bounds a table's width.
VALUES_PER_ROW = 4
LAYOUT_VALUES = 64
MAX_COLUMNS = 16

def image_byte_limit(limits: ServeConfig) -> int:
    """Bytes of the largest encoded image the model's limits allow: `max_pixels` pixels encoded no larger than
    uncompressed 8-bit RGB (3 bytes a pixel), with room for what the file holds beside its pixels."""
    return 3 * limits.max_pixels + IMAGE_SLACK_BYTES


def body_limit(limits: ServeConfig) -> int:
    """Bytes of the largest request the model's limits allow: `max_images` images of `image_byte_limit`, as
    base64 (4 characters per 3 bytes)."""
    per_image = 4 * math.ceil(image_byte_limit(limits) / 3)
    return limits.max_images * per_image + JSON_SLACK_BYTES


def model_limits(model: Any) -> ServeConfig:
    """The limits a loaded pyfunc was registered with (RainEmbedder.limits); a model without them gets the
    defaults."""
    limits = getattr(model.unwrap_python_model(), "limits", None)
    if limits is None:
        return ServeConfig()
    return ServeConfig(max_pixels=int(limits.max_pixels), max_images=int(limits.max_images))


SCAN_BLOCK = 1 << 18  # bytes of a JSON body scanned at a time: the scan holds ~50 bytes per byte of one block


def json_shape(body: bytes) -> tuple[int, int, int]:
    """(how deep its arrays and objects nest, how many values they hold at most (commas + 1), how many arrays and
    objects there are) of JSON text `body`; brackets and commas inside strings do not count.

    Vectorised block by block, since a body may be hundreds of megabytes and hold millions of strings: a character
    is escaped when an odd run of backslashes precedes it; a quote that is not escaped opens or closes a string;
    what the three counts take is the brackets and commas outside strings. What crosses a block's edge (a run of
    backslashes, being inside a string, the depth) is carried to the next. Text that is not JSON gets numbers too,
    and json.loads refuses it.
    """
    data = np.frombuffer(body, dtype=np.uint8)
    run, inside = 0, 0  # backslashes ending the previous block; 1 inside a string at the block's start
    depth = deepest = commas = containers = 0
    for start in range(0, data.size, SCAN_BLOCK):
        x = data[start:start + SCAN_BLOCK]
        at = np.arange(x.size)
        backslash = x == ord("\\")
        last_other = np.maximum.accumulate(np.where(backslash, -1, at))  # the last other character up to here
        runs = np.where(backslash, at - last_other + np.where(last_other < 0, run, 0), 0)  # backslashes ending here
        before = np.concatenate(([run], runs[:-1]))
        quote = (x == ord('"')) & (before % 2 == 0)  # an escaped quote neither opens nor closes a string
        outside = ((np.cumsum(quote) - quote + inside) % 2 == 0) & ~quote
        opens = outside & ((x == ord("[")) | (x == ord("{")))
        running = np.cumsum(opens.astype(np.int64) - (outside & ((x == ord("]")) | (x == ord("}"))))) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        commas += int(np.count_nonzero(outside & (x == ord(","))))
        containers += int(np.count_nonzero(opens))
        inside = (inside + int(np.count_nonzero(quote))) % 2
        run = int(runs[-1])
    return deepest, commas + 1, containers


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of JSON text `body` nest (json_shape)."""
    return json_shape(body)[0]


def json_values(body: bytes) -> int:
    """How many values the arrays and objects of JSON text `body` hold at most: its commas outside strings, plus one."""
    return json_shape(body)[1]


def json_containers(body: bytes) -> int:
    """How many arrays and objects JSON text `body` holds (json_shape)."""
    return json_shape(body)[2]


def json_problem(body: bytes, max_depth: int, max_rows: int | None) -> str | None:
    """Why JSON `body` nests deeper than `max_depth`, or holds more values or arrays and objects than `max_rows`
    rows need (VALUES_PER_ROW each, and LAYOUT_VALUES); None when neither. Counted in the raw body first (base64
    holds no bracket or comma): most bodies need no scan."""
    limit = None if max_rows is None else VALUES_PER_ROW * max_rows + LAYOUT_VALUES
    brackets = body.count(b"[") + body.count(b"{")
    if brackets <= max_depth and (limit is None or (brackets <= limit and body.count(b",") < limit)):
        return None
    depth, values, containers = json_shape(body)
    if depth > max_depth:
        return f"JSON nested {depth} levels deep, over the limit of {max_depth} (a request nests 4)"
    if limit is not None:
        per_row = f"({VALUES_PER_ROW} per row for this model's serve.max_images = {max_rows} rows)"
        if values > limit:
            return f"JSON of {values} values, over the limit of {limit} {per_row}"
        if containers > limit:
            return f"JSON of {containers} arrays and objects, over the limit of {limit} {per_row}"
    return None


def parquet_problem(body: bytes, max_rows: int, max_bytes: int) -> str | None:
    """Why a Parquet body holds more than `max_rows` rows, MAX_COLUMNS columns or `max_bytes` bytes once
    uncompressed, read from its footer alone (nothing is decompressed); None when it does not, or is no Parquet
    (MLflow's parser then answers 400)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(pa.BufferReader(body)).metadata  # the footer: row and byte counts per row group
    except (pa.ArrowException, OSError, ValueError):
        return None
    if meta.num_rows > max_rows or meta.num_row_groups > max_rows:
        return (f"Parquet table of {meta.num_rows} rows, over this model's limit serve.max_images = {max_rows}: "
                f"send them in several requests")
    if meta.num_columns > MAX_COLUMNS:
        return f"Parquet table of {meta.num_columns} columns, over the limit of {MAX_COLUMNS}"
    unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if unpacked > max_bytes:
        return f"Parquet table of {unpacked} bytes uncompressed, over the limit of {max_bytes} bytes"
    return None


def rows_problem(body: bytes, mime: bytes, max_rows: int, max_bytes: int) -> str | None:
    """Why a CSV or Parquet `body` (of type `mime`) holds more rows than `max_rows`, before anything builds them;
    None if it does not (JSON: json_problem). An upper bound per type: CSV's lines, Parquet's footer."""
    if mime == b"text/csv":
        lines = body.count(b"\n")
        if lines > max_rows + 2:  # a header, the rows, and a last line break
            return (f"CSV of {lines} lines, over this model's limit serve.max_images = {max_rows} rows (and a "
                    f"header)")
    elif mime == b"application/vnd.apache.parquet":
        return parquet_problem(body, max_rows, max_bytes)
    return None


def release_memory() -> None:
    """Give freed memory back to the system once a large request is answered: Arrow's pool (MLflow's parsing goes
    through pandas and Arrow; mimalloc kept the 0.5 GB a 270 MB request had used) and glibc's heaps (malloc_trim:
    glibc keeps freed pages for its next allocations). Without it, the server's resident memory stayed near its
    peak."""
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class RequestGuard:
    """ASGI middleware on ``POST /invocations``: 415 without a Content-Type, 400 with more than one, 413 over
    `max_body_bytes`, 400 for JSON deeper than `max_depth`, 400 for more rows than `max_rows` (JSON, CSV or
    Parquet), all before the app sees the request; everything else passes through untouched. After a large
    request, freed memory goes back to the system."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_depth: int = MAX_JSON_DEPTH,
                 max_rows: int | None = None, max_busy: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        self.max_rows = max_rows
        # Requests read and worked on at once (the rest wait, their body unread): parsing, decoding and embedding
        # take memory per request and a core each, so more at once than cores adds memory, not speed.
        self.max_busy = max_busy
        self._busy = asyncio.Semaphore(max_busy) if max_busy is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/invocations":
            await self.app(scope, receive, send)
            return
        headers = {bytes(k).lower(): bytes(v) for k, v in scope.get("headers", [])}
        # MLflow reads the first Content-Type (Starlette's Headers.get) and fails on none (AttributeError: a 500);
        # a check here that read another one than MLflow would check a body MLflow then parses differently.
        content_types = [bytes(v) for k, v in scope.get("headers", []) if bytes(k).lower() == b"content-type"]
        if not content_types:
            await _answer(send, 415, "BAD_REQUEST", f"no Content-Type header: send one of {', '.join(CONTENT_TYPES)}")
            return
        if len(content_types) > 1:
            shown = ", ".join(repr(v.decode("latin-1")) for v in content_types)
            await _answer(send, 400, "BAD_REQUEST", f"{len(content_types)} Content-Type headers ({shown}): send one")
            return
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", self._too_big(f"{int(declared)} bytes"))
            return
        mime = content_types[0].split(b";")[0].strip().lower()
        # A body is read once it will be worked on: the requests waiting for their turn hold no body (uvicorn stops
        # reading a connection whose app does not read), so memory holds `max_busy` bodies and their work, however
        # many requests are in flight. The wait is long under load; the read itself has BODY_TIMEOUT_S.
        async with self._busy or contextlib.nullcontext():
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    body = await self._body(receive, send)
            except TimeoutError:
                await _answer(send, 408, "REQUEST_TIMEOUT", f"the request body did not arrive within "
                                                            f"{BODY_TIMEOUT_S} s")
                return
            if body is None:  # answered (413) or gone
                return
            replayed = False

            async def replay() -> Message:  # the app reads the body we already hold, then the connection as usual
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                problem = await asyncio.to_thread(self.problem, body, mime)  # a big body: not on the event loop
                if problem is not None:
                    await _answer(send, 400, "BAD_REQUEST", problem)
                    return
                await self.app(scope, replay, send)
            finally:
                if len(body) >= TRIM_AFTER_BYTES:
                    del body
                    await asyncio.to_thread(release_memory)

    async def _body(self, receive: Receive, send: Send) -> bytes | None:
        """The request's body, or None once it has answered 413 (more than `max_body_bytes`: never buffered past
        the limit) or the client is gone."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_body_bytes:
                await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED",
                              self._too_big(f"more than {self.max_body_bytes} bytes"))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def problem(self, body: bytes, mime: bytes) -> str | None:
        """Why the app must not parse `body` (of type `mime`): JSON deeper than `max_depth`, more rows than
        `max_rows`; None when nothing is wrong."""
        if mime == b"application/json":
            return json_problem(body, self.max_depth, self.max_rows)
        if self.max_rows is not None:
            return rows_problem(body, mime, self.max_rows, self.max_body_bytes)
        return None

    def _too_big(self, size: str) -> str:
        return (f"request body of {size}, over the limit of {self.max_body_bytes} bytes (the model's "
                f"serve.max_images images of serve.max_pixels pixels, uncompressed, as base64)")


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    """A JSON error as MLflow's scoring server writes them: {"error_code": ..., "message": ...}."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(model_uri: str, max_busy: int | None = None, runtime: str = "torch") -> tuple[ASGIApp, ServeConfig]:
    """MLflow's scoring app for `model_uri` behind :class:`RequestGuard`, with the model's own limits; `max_busy`
    requests worked on at once (None: the cores of this machine); the model embeds with `runtime` (torch, onnx:
    tasks/registry/runtime.py)."""
    from mlflow.pyfunc import scoring_server

    from tasks.registry.runtime import load_pyfunc

    model = load_pyfunc(model_uri, runtime)
    limits = model_limits(model)
    busy = max_busy or os.cpu_count() or 1
    app = RequestGuard(scoring_server.init(model), body_limit(limits), max_rows=limits.max_images, max_busy=busy)
    log.info("serve: %s (runtime %s), at most %d images of %d pixels per request, bodies up to %d bytes, %d worked "
             "on at once", model_uri, runtime, limits.max_images, limits.max_pixels, app.max_body_bytes, busy)
    return app, limits


def uvicorn_limit(max_connections: int) -> int:
    """uvicorn's `limit_concurrency` for at most `max_connections` requests in flight: uvicorn answers 503 when the
    connections open, the new one included, reach its limit, so a limit of 16 served 15 at most, and 16 requests
    sent together got 503 for most of them (11 of 16 in bench/serve_load.py)."""
    return max_connections + 1


def serve(model_uri: str, host: str, port: int, max_connections: int, runtime: str = "torch") -> None:
    """Serve `model_uri` on POST /invocations (and /ping, /health, /version) until interrupted, embedding with
    `runtime`."""
    import uvicorn

    app, _ = build_app(model_uri, min(max_connections, os.cpu_count() or 1), runtime)
    uvicorn.run(app, host=host, port=port, limit_concurrency=uvicorn_limit(max_connections), log_level="info")
