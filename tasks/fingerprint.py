"""Stage `fingerprint`: the content of what the download stage reads from outside the project, as one small file
DVC can compare (<manifests>/<dataset>-fingerprint.json, a dep of the download stage); likewise the content of
the file `model.pretrained_path` names (<manifests>/<dataset>-pretrained.json, a dep of the train stage).

DVC hashes only what dvc.yaml names, and a dataset's source is named there only by params (url, md5). That pins a
downloaded archive (its md5 is checked), but not what a user keeps themselves: a custom dataset's table and every
image it lists (sources.custom.url), or an archive put in paths.downloads by hand with no md5 to check it against.
A dvc.yaml dep cannot name those files (they differ per dataset, and other datasets have none), so this stage runs
on every `dvc repro` (always_changed) and writes the source params plus one sha256 over the (path, sha256) of each
such file. Its output changes exactly when one of them does, and only then does DVC re-run download.

Reading every image on every repro would cost as much as the download itself: files are hashed through the
file-hash cache (tasks/datasets/filehash.py), which reads only those whose size, times or inode changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from tasks.config import Params, SourceConfig, load_params
from tasks.datasets import DatasetError, get_adapter
from tasks.datasets.acquire import archive_name
from tasks.datasets.custom import source_files
from tasks.datasets.filehash import DEFAULT_CACHE, FileHashes
from tasks.infra.logs import setup_logging

log = logging.getLogger(__name__)


def source_of(params: Params) -> SourceConfig | None:
    """params.yaml sources.<key> of the dataset (cuhk03-detected reads sources.cuhk03); None if it has none."""
    name = params.dataset.name
    return params.sources.get(getattr(get_adapter(name), "source_name", name))


def source_inputs(params: Params) -> list[Path]:
    """The files outside DVC's view that the download of `params.dataset.name` reads (absolute, resolved)."""
    source = source_of(params)
    if params.dataset.name == "custom":
        if source is None or not source.url:
            return []  # the download stage says what is missing
        table, images = source_files(source.url)
        return [table.resolve(), *images] if table.is_file() else []
    # An archive with an md5 is pinned by params (download checks it); one without is only a file in downloads.
    if source is None or source.md5 or not archive_name(source):
        return []
    archive = params.downloads_dir() / archive_name(source)
    return [archive.resolve()] if archive.is_file() else []


def pretrained(params: Params, out: Path, cache: Path | None = DEFAULT_CACHE) -> dict[str, Any]:
    """Write which file `model.pretrained_path` names and its sha256 to `out` (a dep of the train stage: the
    params name the path, not what the file holds)."""
    path = params.model.pretrained_path
    content: str | None = None
    if path is not None:
        with FileHashes(cache) as hashes:
            try:
                content = hashes.sha256(Path(path).resolve())
            except OSError as exc:  # the train stage refuses it by name; appearing later must change this
                content = f"unreadable: {exc.strerror}"
    record = {"pretrained_path": path, "sha256": content}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def run(params: Params, out: Path, cache: Path | None = DEFAULT_CACHE) -> dict[str, Any]:
    started = time.perf_counter()
    source = source_of(params)
    fingerprint: dict[str, Any] = {"dataset": params.dataset.name,
                                   "source": None if source is None else dataclasses.asdict(source)}
    try:
        files = source_inputs(params)
    except DatasetError as exc:  # e.g. a url that is no local path: download refuses it with this message
        fingerprint["error"] = str(exc)
        files = []
    digest = hashlib.sha256()
    with FileHashes(cache) as hashes:
        for file in sorted(set(files)):
            try:
                content = hashes.sha256(file)
            except OSError as exc:  # it may become readable: that must change the fingerprint too
                content = f"unreadable: {exc.strerror}"
            digest.update(f"{file.as_posix()}\t{content}\n".encode())
    fingerprint |= {"files": len(files), "sha256": digest.hexdigest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")  # no times in it: same input, same file
    log.info("fingerprint: %s, %d source files (%d read, %d unchanged since hashed) in %.2f s", params.dataset.name,
             len(files), hashes.hashed, hashes.reused, time.perf_counter() - started)
    return fingerprint | {"read": hashes.hashed, "reused": hashes.reused}


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.fingerprint_path())
    pretrained(params, params.pretrained_fingerprint_path())


if __name__ == "__main__":
    main()
