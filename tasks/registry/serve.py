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
through). The model refuses more images or pixels than its ``serve`` limits (400,
tasks/registry/pyfunc_model.py), checked on image headers; that holds under `mlflow models serve` too.
:func:`serve` runs the guarded app with uvicorn and at most ``max_connections`` requests in flight (503
beyond), so memory is bounded by about that many bodies and the work behind a 504 by the limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
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

# What MLflow's scoring server parses (mlflow.pyfunc.scoring_server.CONTENT_TYPES).
CONTENT_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")

_ESCAPED = re.compile(rb"\\.", re.DOTALL)  # a backslash and the character it escapes
_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


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


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of JSON text `body` nest (brackets inside strings do not count).

    Vectorised, since a body may be hundreds of megabytes: escapes are dropped (so an escaped quote
    cannot end a string), then everything but brackets and quotes, then whole strings; the depth is the
    running sum of the brackets left. Text that is not JSON gets a number too, and json.loads refuses it.
    """
    structure = _STRING.sub(b"", _ESCAPED.sub(b"", body).translate(None, _NOT_STRUCTURE))
    chars = np.frombuffer(structure, dtype=np.uint8)
    if chars.size == 0:
        return 0
    opens = (chars == ord("[")) | (chars == ord("{"))
    closes = (chars == ord("]")) | (chars == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes.astype(np.int64)).max(initial=0))


class RequestGuard:
    """ASGI middleware on ``POST /invocations``: 415 without a Content-Type, 400 with more than one, 413 over
    `max_body_bytes`, 400 for JSON deeper than `max_depth`, all before the app sees the request; everything else
    passes through untouched."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

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
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_body_bytes:
                await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED",
                              self._too_big(f"more than {self.max_body_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        is_json = content_types[0].split(b";")[0].strip().lower() == b"application/json"
        # No deeper than its opening brackets: base64 images hold none, so most bodies need no scan.
        if is_json and body.count(b"[") + body.count(b"{") > self.max_depth:
            depth = await asyncio.to_thread(json_depth, body)  # a big body takes a moment: not on the event loop
            if depth > self.max_depth:
                await _answer(send, 400, "BAD_REQUEST", f"JSON nested {depth} levels deep, over the limit of "
                                                        f"{self.max_depth} (a request nests 4)")
                return
        replayed = False

        async def replay() -> Message:  # the app reads the body we already hold, then the connection as usual
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

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


def build_app(model_uri: str) -> tuple[ASGIApp, ServeConfig]:
    """MLflow's scoring app for `model_uri` behind :class:`RequestGuard`, with the model's own limits."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(model_uri)
    limits = model_limits(model)
    app = RequestGuard(scoring_server.init(model), body_limit(limits))
    log.info("serve: %s, at most %d images of %d pixels per request, bodies up to %d bytes", model_uri,
             limits.max_images, limits.max_pixels, app.max_body_bytes)
    return app, limits


def serve(model_uri: str, host: str, port: int, max_connections: int) -> None:
    """Serve `model_uri` on POST /invocations (and /ping, /health, /version) until interrupted."""
    import uvicorn

    app, _ = build_app(model_uri)
    uvicorn.run(app, host=host, port=port, limit_concurrency=max_connections, log_level="info")
