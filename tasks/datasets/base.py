"""The contract every dataset adapter fulfils: acquire the raw files, then list the images."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.config import Params


@dataclass(frozen=True)
class RawImage:
    """One image an adapter found in the raw folder, before it is decoded and checked."""

    path: str  # relative to the raw folder, POSIX separators
    person_id: int
    camera_id: int
    camera_pair: int = 0  # index of the camera pair the MLR protocol treats together
    view: int = 0  # 0: the view kept at HR; 1: the view down-sampled by the MLR protocol


class DatasetAdapter(Protocol):
    name: str
    # Pillow format names the decoder may use for this dataset (content decides, not the extension).
    image_formats: tuple[str, ...]
    # View 1 is genuinely low resolution (CAVIAR): its images are the queries as they are, with no synthetic
    # down-sampling and no HR or unseen-rate query sets (training still adds synthetic LR copies).
    native_lr_queries: bool

    def test_identities(self, params: Params) -> int | None:
        """Test identities of the dataset's paper split, used when protocol.test_identities is 0; None: half."""
        ...

    def acquire(self, raw_dir: Path, params: Params) -> None:
        """Fill `raw_dir` with the dataset's files (download, verify, extract, or generate)."""
        ...

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        """List the images of an acquired raw folder, in a deterministic order."""
        ...


class DatasetError(RuntimeError):
    """The raw dataset is missing, malformed or fails verification; the message says what to do."""
