"""Benchmark the synthesis stage: images per second of tasks/synthesize.py run() on all cores, against a
plain single-process Pillow loop doing the same work (decode, shrink by r, bilinear back up, encode PNG)
on the same generated images, in the same run.

    .venv/bin/python bench/synthesize.py [--identities 100] [--images-per-camera 4] [--size 128x64]
                                          [--repeats 3] [--workers 0]

Both sides process the same (image, rates) jobs the stage derives from the manifest: each image's drawn
training rate (none when it is 1) plus, for view-1 images, every unseen rate; PNGs are written with
compress_level=1 like the stage. Images per second = HR images in / wall seconds; the best of
`--repeats` alternating runs is kept for each side (the machine is shared). The stage's time includes
its whole run(): reading the manifest, the process pool, and writing the MLR manifest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import download, manifest, synthesize
from tasks.config import DatasetChoice, Params, Paths, ProtocolConfig, SyntheticConfig
from tasks.infra.parallel import worker_count
from tasks.protocol import mlr

OUT = Path(__file__).resolve().parent / "out"


def plain_loop(jobs: list[tuple[Path, tuple[int, ...]]], out_dir: Path) -> None:
    """The reference: one process, Pillow only."""
    for src, rates in jobs:
        with Image.open(src) as opened:
            hr = opened.convert("RGB")
        w, h = hr.size
        for rate in rates:
            small = hr.resize((max(1, round(w / rate)), max(1, round(h / rate))), Image.Resampling.BILINEAR)
            dst = out_dir / f"{src.parent.name}_{src.stem}_r{rate}.png"
            small.resize((w, h), Image.Resampling.BILINEAR).save(dst, compress_level=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images-per-camera", type=int, default=4)
    parser.add_argument("--size", default="128x64", help="HxW of the generated images (multiples of 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="stage processes; 0 = all cores")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))

    work = args.out / "synthesize"
    if work.exists():
        shutil.rmtree(work)
    params = Params(
        paths=Paths(raw=str(work / "raw"), manifests=str(work / "manifests"), lr=str(work / "lr")),
        dataset=DatasetChoice(name="synthetic"),
        synthetic=SyntheticConfig(identities=args.identities, test_identities=0,
                                  images_per_camera=args.images_per_camera, height=height, width=width),
        protocol=ProtocolConfig(trials=1, workers=args.workers),
    )
    download.run(params, params.raw_dir())
    manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())
    rows = pq.read_table(params.manifest_path()).to_pylist()
    jobs: list[tuple[Path, tuple[int, ...]]] = []
    for row in rows:
        rates = {mlr.draw_rate(row["path"], params.protocol)} - {1}
        if row["view"] == 1:
            rates |= set(params.protocol.unseen_rates)
        if rates:
            jobs.append((params.raw_dir() / row["path"], tuple(sorted(rates))))
    n_images, n_lr = len(rows), sum(len(r) for _, r in jobs)
    cores = len(os.sched_getaffinity(0))
    print(f"{n_images} HR images ({height}x{width}), {n_lr} LR images to write; {cores} cores, "
          f"stage workers = {worker_count(args.workers)}")

    wall: dict[str, list[float]] = {"stage": [], "plain": []}
    cpu: dict[str, list[float]] = {"stage": [], "plain": []}
    for repeat in range(args.repeats):
        for side in (("stage", "plain") if repeat % 2 == 0 else ("plain", "stage")):
            lr_dir = params.lr_dir()
            if lr_dir.exists():
                shutil.rmtree(lr_dir)
            lr_dir.mkdir(parents=True)
            before, start = os.times(), time.perf_counter()
            if side == "stage":
                synthesize.run(params, params.raw_dir(), params.manifest_path(), lr_dir,
                               params.mlr_manifest_path())
            else:
                plain_loop(jobs, lr_dir)
            seconds, after = time.perf_counter() - start, os.times()
            # CPU seconds of this process and of its (joined) pool workers.
            used = sum(after[:4]) - sum(before[:4])
            wall[side].append(seconds)
            cpu[side].append(used)
            print(f"  run {repeat + 1} {side:5s}: {seconds:6.2f} s wall, {used:6.2f} s CPU, "
                  f"load average {os.getloadavg()[0]:.1f}")

    stage, plain = min(wall["stage"]), min(wall["plain"])
    stage_cpu, plain_cpu = min(cpu["stage"]), min(cpu["plain"])
    print(f"stage (tasks/synthesize.py run, {worker_count(args.workers)} processes): "
          f"{n_images / stage:8.1f} images/s  ({n_lr / stage:.1f} LR writes/s), "
          f"{1000 * stage_cpu / n_images:.2f} ms CPU per image")
    print(f"plain Pillow loop (1 process):            {n_images / plain:8.1f} images/s  "
          f"({n_lr / plain:.1f} LR writes/s), {1000 * plain_cpu / n_images:.2f} ms CPU per image")
    print(f"ratio stage / plain: {plain / stage:.2f}x wall (target >= 1.8x on 2 cores); "
          f"CPU per image stage / plain: {stage_cpu / plain_cpu:.2f}")


if __name__ == "__main__":
    main()
