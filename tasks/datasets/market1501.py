"""Market-1501 (Zheng et al. 2015): 1,501 identities, 6 cameras.

Archive ``Market-1501-v15.09.15.zip``; images in ``bounding_box_train/``, ``bounding_box_test/`` and
``query/`` (other folders such as ``gt_bbox`` are ignored), named ``0002_c1s1_000451_03.jpg``: person
0002, camera 1, sequence 1, frame 451, box 3. Person -1 (junk boxes) and 0 (distractors) are dropped.

Camera rule for the MLR protocol: cameras are paired (c1, c2), (c3, c4), (c5, c6); the odd camera of
a pair stays HR (view 0), the even one (c2, c4, c6) is down-sampled (view 1). So
``camera_id = c - 1``, ``camera_pair = (c - 1) // 2``, ``view = (c - 1) % 2``. The protocol draws its own
identity splits; the archive's train/test folders do not define them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from tasks.config import Params
from tasks.datasets.acquire import acquire_archive
from tasks.datasets.base import DatasetError, RawImage

_FILE_RE = re.compile(r"^(-?\d+)_c(\d)s(\d+)_(\d+)_(\d+)\.jpg$")
FOLDERS = ("bounding_box_train", "bounding_box_test", "query")
DROPPED_PIDS = (-1, 0)  # junk, distractors


class Market1501Dataset:
    name = "market1501"
    image_formats: tuple[str, ...] = ("JPEG",)
    native_lr_queries: bool = False
    homepage = ""
    folder = "Market-1501"  # url, md5 and archive name: params.yaml sources.market1501

    def test_identities(self, params: Params) -> int | None:
        return 750  # the dataset's own 751 / 750 split (the RAIN paper does not use it)

    def acquire(self, raw_dir: Path, params: Params) -> None:
        acquire_archive(params, self.name, raw_dir, self.folder, homepage=self.homepage)
        next(iter(self.scan(raw_dir)))

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        records: list[RawImage] = []
        for sub in FOLDERS:
            folders = sorted(p for p in raw_dir.rglob(sub) if p.is_dir())
            if len(folders) != 1:
                raise DatasetError(f"{raw_dir}: expected one {sub}/ folder of Market-1501, found "
                                   f"{len(folders)}; run the download stage for dataset market1501")
            for file in sorted(folders[0].iterdir()):
                if file.suffix.lower() != ".jpg":
                    continue  # Thumbs.db and the like
                match = _FILE_RE.match(file.name)
                if match is None:
                    raise DatasetError(f"{file}: unexpected Market-1501 file name "
                                       f"(expected <pid>_c<cam>s<seq>_<frame>_<box>.jpg)")
                pid, cam = int(match[1]), int(match[2])
                if pid in DROPPED_PIDS:
                    continue
                if not 1 <= cam <= 6:
                    raise DatasetError(f"{file}: camera {cam} is not one of Market-1501's c1..c6")
                records.append(RawImage(path=file.relative_to(raw_dir).as_posix(), person_id=pid,
                                        camera_id=cam - 1, camera_pair=(cam - 1) // 2, view=(cam - 1) % 2))
        if not records:
            raise DatasetError(f"{raw_dir}: no Market-1501 images with a person id above 0")
        yield from records
