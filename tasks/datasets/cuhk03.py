"""CUHK03 (Li et al. 2014): 1,467 identities, 5 camera pairs, up to 5 images per person and camera.

It needs a sign-up, so there is no download URL: the user puts ``cuhk03_release.zip`` where the error
message says (``data/downloads/`` by default) and the md5 is verified. The zip holds
``cuhk03_release/cuhk-03.mat``, a MATLAB v7.3 file (HDF5), read with h5py:

- ``labeled`` and ``detected`` (hand-cropped or detector boxes): each a 1x5 array of references, one per
  camera pair, to a cell array of persons x 10 images. MATLAB stores arrays column-major, so h5py sees
  every array transposed: a pair's cell array is (10, persons) and an image is (3, W, H) uint8.
- Columns 0-4 are one camera of the pair, 5-9 the other; empty cells (stored as a 2-element uint64
  array with a ``MATLAB_empty`` attribute) are skipped.

``acquire`` writes each image as ``<images>/<pair>_<person>_<view>_<image>.png`` (1-based, the names
torchreid uses). Ids: ``person_id = 1000 * pair + person`` (0-based, unique across pairs),
``camera_id = 2 * pair + view``, ``camera_pair = pair``; view 0 (columns 0-4) stays HR, view 1
(columns 5-9) is down-sampled by the MLR protocol. The paper's split is 1,367 / 100 identities, the
default here (``test_identities()``; ``protocol.test_identities`` other than 0 overrides it).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import Params
from tasks.datasets.acquire import fetch_source, source_for
from tasks.datasets.archive import extract
from tasks.datasets.base import DatasetError, RawImage

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})\.png$")
MAT_NAME = "cuhk-03.mat"
PAIR_STRIDE = 1000  # person_id = PAIR_STRIDE * pair + person


class CUHK03Dataset:
    image_formats: tuple[str, ...] = ("PNG",)
    native_lr_queries: bool = False
    homepage = "http://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html"
    source_name = "cuhk03"  # both image kinds come from params.yaml sources.cuhk03 (url, md5, archive name)

    def test_identities(self, params: Params) -> int | None:
        return 100  # the paper's 1,367 / 100 split

    def __init__(self, images: str = "labeled") -> None:
        if images not in ("labeled", "detected"):
            raise ValueError(f"CUHK03 images are 'labeled' or 'detected', not {images!r}")
        self.images = images
        self.name = "cuhk03" if images == "labeled" else "cuhk03-detected"

    def acquire(self, raw_dir: Path, params: Params) -> None:
        source = source_for(params, self.source_name)
        archive = fetch_source(source, self.source_name, params.downloads_dir(), homepage=self.homepage)
        scratch = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".cuhk03-"))
        try:
            extract(archive, scratch / "x")
            mats = sorted((scratch / "x").rglob(MAT_NAME))
            if len(mats) != 1:
                raise DatasetError(f"{archive}: expected one {MAT_NAME} inside, found {len(mats)}")
            out = raw_dir / self.images
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            count = export_images(mats[0], self.images, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("cuhk03: %d %s images written to %s", count, self.images, out)

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        folder = raw_dir / self.images
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"{folder}: no CUHK03 images; run the download stage for dataset {self.name}")
        for file in files:
            match = _FILE_RE.match(file.name)
            if match is None:
                raise DatasetError(f"{file}: unexpected file name in the CUHK03 images")
            pair, person, view = int(match[1]) - 1, int(match[2]) - 1, int(match[3]) - 1
            yield RawImage(path=file.relative_to(raw_dir).as_posix(), person_id=PAIR_STRIDE * pair + person,
                           camera_id=2 * pair + view, camera_pair=pair, view=view)


def export_images(mat_path: Path, which: str, out: Path) -> int:
    """Write every non-empty image of `which` ('labeled' | 'detected') in `mat_path` as PNG into `out`."""
    count = 0
    try:
        import h5py  # not at import time: a bare GPU image (bench/gpu.py) has no h5py

        mat = h5py.File(mat_path, "r")
    except OSError as exc:
        raise DatasetError(f"{mat_path}: not a MATLAB v7.3 (HDF5) file: {exc}") from exc
    with mat:
        if which not in mat:
            raise DatasetError(f"{mat_path}: no {which!r} array (found: {', '.join(sorted(mat))})")
        pair_refs = np.asarray(mat[which]).ravel()  # (5,) references, one per camera pair
        for pair, pair_ref in enumerate(pair_refs):
            cells = np.asarray(mat[pair_ref]).T  # (persons, 10) references
            if cells.ndim != 2 or cells.shape[1] != 10:
                raise DatasetError(f"{mat_path}: {which} pair {pair + 1} has shape {cells.shape}, "
                                   f"expected (persons, 10)")
            if cells.shape[0] > PAIR_STRIDE:
                raise DatasetError(f"{mat_path}: {which} pair {pair + 1} has {cells.shape[0]} persons, "
                                   f"more than {PAIR_STRIDE}")
            for person in range(cells.shape[0]):
                for column in range(10):
                    pixels = np.asarray(mat[cells[person, column]])
                    if pixels.ndim != 3 or pixels.size == 0:
                        continue  # empty cell: this person has fewer images in this camera
                    hwc = np.ascontiguousarray(pixels.T)  # (3, W, H) -> (H, W, 3)
                    if hwc.shape[2] != 3 or hwc.dtype != np.uint8:
                        raise DatasetError(f"{mat_path}: {which} pair {pair + 1} person {person + 1} image "
                                           f"{column + 1}: {hwc.dtype} {hwc.shape}, expected uint8 (H, W, 3)")
                    view = 1 if column < 5 else 2
                    name = f"{pair + 1}_{person + 1:03d}_{view}_{column + 1:02d}.png"
                    Image.fromarray(hwc).save(out / name)
                    count += 1
    if count == 0:
        raise DatasetError(f"{mat_path}: no {which} images found")
    return count
