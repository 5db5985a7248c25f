"""RESULTS.md quotes only what is committed: every raw output it names under docs/results/ exists, and no image
made from the CUHK03 crops is among them (their terms: research use, never committed)."""

from __future__ import annotations

import re

from tests.micro_project import REPO

RESULTS = REPO / "RESULTS.md"
DOCS = REPO / "docs" / "results"
# Pictures of metrics only: the grid's plots. A ranked-gallery sheet, t-SNE or CMC picture of a real dataset shows
# (or is made from) its images.
METRIC_PLOTS = {"label_fraction.png", "rate_bars.png"}


def test_every_raw_output_results_md_names_is_committed() -> None:
    named = set(re.findall(r"docs/results/([\w./-]+\w)", RESULTS.read_text()))
    assert named, "RESULTS.md names no raw output under docs/results/"
    missing = sorted(n for n in named if not (DOCS / n).is_file() and not (DOCS / n / "results.md").is_file())
    assert not missing, f"RESULTS.md quotes files that are not committed: {missing}"


def test_no_picture_of_the_real_crops_is_committed() -> None:
    real = [p for p in DOCS.rglob("*") if p.is_file() and "cuhk03" in p.as_posix().lower()]
    pictures = [p.name for p in real if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}]
    assert set(pictures) <= METRIC_PLOTS, f"pictures from the CUHK03 crops in docs/results: {pictures}"
