"""Stage `manifest`: decode every raw image once and describe it in data/manifests/<dataset>.parquet.

Schema (one row per usable image): path (relative to the raw folder), person_id, camera_id,
camera_pair, view (0 = kept HR, 1 = down-sampled by the MLR protocol), width, height (pixels after
EXIF orientation), content_hash (sha256 of the file bytes). Files that fail to decode go to
<dataset>-quarantine.parquet (path, reason) and are counted; they never reach training.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import Params, load_params
from tasks.datasets import RawImage, get_adapter
from tasks.images.imageio import ImageRejected, decode_rgb
from tasks.infra.logs import setup_logging
from tasks.infra.parallel import map_chunks, worker_count

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("person_id", pa.int64()),
    ("camera_id", pa.int32()),
    ("camera_pair", pa.int32()),
    ("view", pa.int8()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("content_hash", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])


def run(params: Params, raw_dir: Path, manifest_path: Path, quarantine_path: Path) -> dict[str, int]:
    adapter = get_adapter(params.dataset.name)
    records = list(adapter.scan(raw_dir))
    check = functools.partial(_check_chunk, raw_dir=raw_dir, formats=tuple(adapter.image_formats))
    results = map_chunks(check, records, worker_count(params.protocol.workers))
    rows = [r for r in results if "reason" not in r]
    rejected = [r for r in results if "reason" in r]
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest_path)
    pq.write_table(pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA), quarantine_path)
    summary = {"images": len(rows), "quarantined": len(rejected),
               "identities": len({r["person_id"] for r in rows})}
    log.info("manifest: %(images)d images of %(identities)d identities, %(quarantined)d quarantined", summary)
    for r in rejected:
        log.warning("quarantined %s: %s", r["path"], r["reason"])
    return summary


def _check_chunk(records: Sequence[RawImage], raw_dir: Path, formats: tuple[str, ...]) -> list[dict]:
    out: list[dict] = []
    for rec in records:
        file = raw_dir / rec.path
        try:
            data = file.read_bytes()
            img = decode_rgb(data, formats, name=file)
        except ImageRejected as exc:
            out.append({"path": rec.path, "reason": exc.reason})
            continue
        except OSError as exc:
            out.append({"path": rec.path, "reason": f"unreadable file: {exc}"})
            continue
        out.append({"path": rec.path, "person_id": rec.person_id, "camera_id": rec.camera_id,
                    "camera_pair": rec.camera_pair, "view": rec.view, "width": img.width,
                    "height": img.height, "content_hash": hashlib.sha256(data).hexdigest()})
    return out


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())


if __name__ == "__main__":
    main()
