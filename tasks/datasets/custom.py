"""A user's own images, described by a table: ``dataset.name: custom``.

``sources.custom.url`` is the path of a CSV or Parquet file (a ``file://`` URL also works; a relative
path is taken from the project folder) with one row per image:

=============  ========  =========================================================================
column         required  meaning
=============  ========  =========================================================================
path           yes       image file; a relative path is resolved against the table's own folder
person_id      yes       integer identity (64-bit: -2**63 to 2**63 - 1)
camera_id      yes       integer >= 0 (32-bit: up to 2**31 - 1)
camera_pair    no        integer >= 0 (32-bit); default ``camera_id // 2``
view           no        0 (kept HR) or 1 (down-sampled by the MLR protocol); default ``camera_id % 2``
=============  ========  =========================================================================

Other columns are refused (a misspelt optional column would otherwise be silently ignored).
``acquire`` copies no image: it validates the table, listing every problem with its file, row (1-based
data row; in a CSV that is line row + 1) and column, checks that the MLR protocol can split it (two views,
and at least two people seen in both), and writes the normalised table (absolute image paths, and the
sha256 of each image) to ``<raw>/custom.parquet``; ``scan`` reads that. Image formats accepted: JPEG, PNG,
BMP, WEBP and TIFF (decided from content, see tasks/images/imageio.py); unreadable images are quarantined
by the manifest stage, not refused here.

The images live outside the project, where DVC does not look: the ``fingerprint`` stage (tasks/fingerprint.py)
hashes the table and every image it lists (``source_files``) into a file the download stage depends on, so
editing the table or overwriting an image re-runs download; the sha256 column then changes this stage's output,
so the manifest stage and everything after it re-run too.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import Params
from tasks.datasets.base import DatasetError, RawImage
from tasks.datasets.filehash import DEFAULT_CACHE, FileHashes

if TYPE_CHECKING:
    import pandas as pd

TABLE_NAME = "custom.parquet"
REQUIRED = ("path", "person_id", "camera_id")
OPTIONAL = ("camera_pair", "view")
MAX_REPORTED = 20
SCHEMA = pa.schema([("path", pa.string()), ("person_id", pa.int64()), ("camera_id", pa.int32()),
                    ("camera_pair", pa.int32()), ("view", pa.int8()),
                    ("sha256", pa.string())])  # null: unreadable (the manifest stage quarantines it)
INT64 = (-(2**63), 2**63 - 1)
INT32 = 2**31 - 1
# (column, lowest, highest): the range each column's Parquet type holds, or the protocol allows.
RANGES = (("person_id", *INT64), ("camera_id", 0, INT32), ("camera_pair", 0, INT32), ("view", 0, 1))


class CustomDataset:
    name = "custom"
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
    native_lr_queries: bool = False

    def test_identities(self, params: Params) -> int | None:
        return None  # half

    def acquire(self, raw_dir: Path, params: Params) -> None:
        source = params.sources.get(self.name)
        if source is None or not source.url:
            raise DatasetError("dataset custom needs params.yaml sources.custom.url: the path of a CSV or "
                               "Parquet table with columns path, person_id, camera_id "
                               "(optional camera_pair, view)")
        with FileHashes(DEFAULT_CACHE) as hashes:  # the fingerprint stage has just hashed them: reused here
            table = normalise(table_path(source.url), hashes)
        raw_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, raw_dir / TABLE_NAME)

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        file = raw_dir / TABLE_NAME
        if not file.is_file():
            raise DatasetError(f"{file}: missing; run the download stage for dataset custom")
        for row in pq.read_table(file).to_pylist():
            yield RawImage(path=row["path"], person_id=row["person_id"], camera_id=row["camera_id"],
                           camera_pair=row["camera_pair"], view=row["view"])


def table_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise DatasetError(f"sources.custom.url = {url!r}: must be a local file path, "
                           f"not a {parsed.scheme} URL")
    return Path(url)


def read_table(file: Path) -> pd.DataFrame:
    import pandas as pd  # not at import time: a bare GPU image (bench/gpu.py) has no pandas

    if not file.is_file():
        raise DatasetError(f"{file}: no such file (params.yaml sources.custom.url)")
    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(file, dtype=str, keep_default_na=False, skipinitialspace=True)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(file).to_pandas()
    except (ValueError, OSError, pa.ArrowException, pd.errors.ParserError) as exc:
        raise DatasetError(f"{file}: cannot read the table: {exc}") from exc
    raise DatasetError(f"{file}: the custom table must be .csv or .parquet, not {suffix or 'no extension'!r}")


def source_files(url: str) -> tuple[Path, list[Path]]:
    """(the table, the image files it lists): what the download of `url` reads, for the fingerprint stage.

    Lenient where ``normalise`` is strict: an unreadable table lists no images, and paths that are no file are
    left out; the download stage then names the problem. Raises DatasetError for a URL that is not a local path."""
    file = table_path(url)
    try:
        frame = read_table(file)
    except DatasetError:
        return file, []
    columns = [str(c).strip() for c in frame.columns]
    if "path" not in columns:
        return file, []
    base = file.resolve().parent
    images = []
    for raw_path in frame.iloc[:, columns.index("path")]:
        if isinstance(raw_path, str) and raw_path.strip():
            image = (base / raw_path.strip()).resolve()
            if image.is_file():
                images.append(image)
    return file, images


def normalise(file: Path, hashes: FileHashes | None = None) -> pa.Table:
    """Validate the user's table and return it with absolute paths, every column filled in and each image's
    sha256 (read through `hashes`, a file-hash cache; None: read every image)."""
    import pandas as pd

    frame = read_table(file)
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = pd.Index(columns)
    missing = [c for c in REQUIRED if c not in columns]
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
                ([f"unknown column(s) {', '.join(unknown)}"] if unknown else [])
        raise DatasetError(f"{file}: {'; '.join(parts)} (columns: path, person_id, camera_id, "
                           f"optional camera_pair, view)")
    if frame.empty:
        raise DatasetError(f"{file}: the table has no rows")
    base = file.resolve().parent
    problems: list[str] = []
    rows: list[dict[str, object]] = []
    seen: dict[tuple[int, int], tuple[int, str]] = {}  # (device, inode) -> (row, path as written)

    def problem(row: int, column: str, text: str) -> None:
        problems.append(f"row {row}, column {column}: {text}")

    for index, record in enumerate(frame.to_dict("records"), start=1):
        values: dict[str, object] = {}
        raw_path = record["path"]
        if not isinstance(raw_path, str) or not raw_path.strip():
            problem(index, "path", "empty")
        else:
            image = (base / raw_path.strip()).resolve()
            # By inode, not path: a hard link (or a bind mount) is the same image under another name, and it would
            # be one image in two places of a split (a test image seen in training).
            inode = _inode(image) if image.is_file() else None
            if inode is None:
                problem(index, "path", f"{raw_path!r}: no such file ({image})")
            elif inode in seen:
                first_row, first = seen[inode]
                how = "" if (base / first.strip()).resolve() == image else f" ({first!r}: a hard link to it)"
                problem(index, "path", f"{raw_path!r}: same file as row {first_row}{how}")
            else:
                seen[inode] = (index, raw_path)
            values["path"] = image.as_posix()
        for column, low, high in RANGES:
            if column not in record or (column in OPTIONAL and _blank(record[column])):
                continue
            number = _as_int(record[column])
            if number is None:
                problem(index, column, f"{record[column]!r} is not an integer")
            elif not low <= number <= high:
                allowed = "0 or 1" if high == 1 else f"{low} to {high}"
                problem(index, column, f"{number} is out of range ({allowed})")
            else:
                values[column] = number
        if len(values) >= len(REQUIRED):
            camera = values.get("camera_id")
            if isinstance(camera, int):
                values.setdefault("camera_pair", camera // 2)
                values.setdefault("view", camera % 2)
            rows.append(values)
        if len(problems) >= MAX_REPORTED:
            break
    if problems:
        more = " (first problems only)" if len(problems) >= MAX_REPORTED else ""
        raise DatasetError(f"{file}: invalid custom dataset table{more}:\n  " + "\n  ".join(problems))
    _check_views(file, rows)
    hashes = hashes if hashes is not None else FileHashes(None)
    for row in rows:
        try:
            row["sha256"] = hashes.sha256(str(row["path"]))
        except OSError:
            row["sha256"] = None
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_views(file: Path, rows: list[dict[str, object]]) -> None:
    """The MLR protocol (tasks/protocol/mlr.py) splits the people seen in both views (0: kept HR, 1: down-sampled)
    into train and test identities: without two views, or two such people, it can make no query or gallery."""
    views: dict[int, set[int]] = {}
    for row in rows:
        views.setdefault(cast(int, row["person_id"]), set()).add(cast(int, row["view"]))
    found = sorted(set().union(*views.values()))
    cameras = ", ".join(str(c) for c in sorted({cast(int, row["camera_id"]) for row in rows}))
    need = ("the MLR protocol needs the same people in two views: images from two cameras (camera_id 0 and 1 of a "
            "pair; view = camera_id % 2 unless a view column says otherwise)")
    if len(found) < 2:
        raise DatasetError(f"{file}: all {len(rows)} images are in view {found[0]} (camera_id found: {cameras}); "
                           f"{need}")
    both = sorted(pid for pid, seen in views.items() if len(seen) == 2)
    if len(both) < 2:
        who = f" (person_id {both[0]})" if both else ""
        raise DatasetError(f"{file}: {len(both)} person{who} seen in both views (camera_id found: {cameras}); "
                           f"{need}, for at least 2 people (one to train on, one to test)")


def _blank(value: object) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value) or \
        (isinstance(value, str) and not value.strip())


def _as_int(value: object) -> int | None:
    if isinstance(value, bool) or _blank(value):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None
