"""CAVIAR4REID (Cheng et al. 2011): a genuine low-resolution dataset, 72 identities, two cameras.

Files are ``XXXXYYY.jpg``: person XXXX, image YYY. Images 1-10 of a person come from the closer camera
(camera 0, kept as the HR view 0), images 11-20 from the distant one (camera 1, view 1; it is already
low resolution). 22 identities are seen by the closer camera only; following the paper (and Jiao et
al. 2018) they are dropped, leaving 50. Dataset page: https://lorisbaz.github.io/caviar4reid.html.
No published md5 was found for the archive: until ``sources.caviar.md5`` is set, the archive is never
downloaded, only a ``CAVIAR4REID.zip`` the user put in ``data/downloads/`` is accepted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from tasks.config import Params
from tasks.datasets.acquire import acquire_archive
from tasks.datasets.base import DatasetError, RawImage

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})(\d{3})\.jpe?g$", re.IGNORECASE)
CLOSE_CAMERA_LAST_IMAGE = 10  # YYY <= 10: closer camera (0); above: distant camera (1)


class CaviarDataset:
    name = "caviar"
    image_formats: tuple[str, ...] = ("JPEG",)
    native_lr_queries: bool = True  # the distant camera is genuinely low resolution
    homepage = "https://lorisbaz.github.io/caviar4reid.html"
    folder = "CAVIAR4REID"  # url, md5 and archive name: params.yaml sources.caviar

    def test_identities(self, params: Params) -> int | None:
        return 25  # the paper: half of the 50 identities kept

    def acquire(self, raw_dir: Path, params: Params) -> None:
        acquire_archive(params, self.name, raw_dir, self.folder, homepage=self.homepage)
        next(iter(self.scan(raw_dir)))

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        found: dict[int, list[tuple[int, str]]] = {}
        for file in sorted(raw_dir.rglob("*")):
            match = _FILE_RE.match(file.name)
            if match is None or not file.is_file():
                continue
            camera = 0 if int(match[2]) <= CLOSE_CAMERA_LAST_IMAGE else 1
            found.setdefault(int(match[1]), []).append((camera, file.relative_to(raw_dir).as_posix()))
        if not found:
            raise DatasetError(f"{raw_dir}: no CAVIAR4REID images (XXXXYYY.jpg); run the download stage "
                               f"for dataset caviar")
        both = sorted(pid for pid, imgs in found.items() if {c for c, _ in imgs} == {0, 1})
        dropped = sorted(set(found) - set(both))
        log.info("caviar: %d identities seen by both cameras; %d seen by one camera only, dropped",
                 len(both), len(dropped))
        if not both:
            raise DatasetError(f"{raw_dir}: no CAVIAR4REID person is seen by both cameras")
        for pid in both:
            for camera, path in sorted(found[pid]):
                yield RawImage(path=path, person_id=pid, camera_id=camera, camera_pair=0, view=camera)
