"""VIPeR (Gray and Tao 2008): 632 identities, one image in each of two cameras.

Archive ``VIPeR.v1.0.zip`` holds ``VIPeR/cam_a/*.bmp`` and ``VIPeR/cam_b/*.bmp``, named
``<number>_<angle>.bmp`` (e.g. ``000_45.bmp``, ``000_90.bmp``): the number is the person, the angle
suffix differs between the two cameras. cam_a is camera 0 and stays HR (view 0); cam_b is camera 1,
down-sampled by the MLR protocol (view 1). One camera pair. Only numbers seen in both cameras are kept.
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

_FILE_RE = re.compile(r"^(\d+)_(\d+)\.bmp$", re.IGNORECASE)
_CAMERAS = ("cam_a", "cam_b")


class VIPeRDataset:
    name = "viper"
    image_formats: tuple[str, ...] = ("BMP",)
    native_lr_queries: bool = False
    homepage = "https://vision.soe.ucsc.edu/node/178"
    folder = "VIPeR.v1.0"  # url, md5 and archive name: params.yaml sources.viper

    def test_identities(self, params: Params) -> int | None:
        return 316  # the paper: 632 pairs split in halves

    def acquire(self, raw_dir: Path, params: Params) -> None:
        acquire_archive(params, self.name, raw_dir, self.folder, homepage=self.homepage)
        next(iter(self.scan(raw_dir)))  # fail now, naming the problem, if the layout is not VIPeR's

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        by_camera: list[dict[int, list[str]]] = []
        for cam in _CAMERAS:
            folders = sorted(p for p in raw_dir.rglob(cam) if p.is_dir())
            if len(folders) != 1:
                raise DatasetError(f"{raw_dir}: expected one {cam}/ folder of VIPeR images, found "
                                   f"{len(folders)}; run the download stage for dataset viper")
            found: dict[int, list[str]] = {}
            for file in sorted(folders[0].iterdir()):
                match = _FILE_RE.match(file.name)
                if match is None:
                    if file.suffix.lower() == ".bmp":
                        raise DatasetError(f"{file}: unexpected VIPeR file name "
                                           f"(expected <number>_<angle>.bmp)")
                    continue
                found.setdefault(int(match[1]), []).append(file.relative_to(raw_dir).as_posix())
            by_camera.append(found)
        paired = sorted(set(by_camera[0]) & set(by_camera[1]))
        unpaired = sorted(set(by_camera[0]) ^ set(by_camera[1]))
        if unpaired:
            log.warning("viper: %d numbers seen by one camera only, dropped: %s", len(unpaired),
                        unpaired[:10])
        if not paired:
            raise DatasetError(f"{raw_dir}: no VIPeR person is seen by both cameras")
        for pid in paired:
            for cam_id, found in enumerate(by_camera):
                for path in found[pid]:
                    yield RawImage(path=path, person_id=pid, camera_id=cam_id, camera_pair=0, view=cam_id)
