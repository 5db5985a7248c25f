"""Ray Train overhead: the same training loop (tasks/training/loop.py) as a plain PyTorch process and
through Ray Train with 1 and 2 workers, measured in one run on the same micro dataset.

Throughput is identity images per second over epochs 2..N, timed from one epoch's end to the next
(so it includes what Ray adds per epoch: the report barrier and checkpoint upload), summed over ranks.
Worker-group start-up is printed separately. Target: Ray Train with 1 worker >= 0.95x the plain loop.

    .venv/bin/python bench/ray_overhead.py [--identities 60 --epochs 4 --backbone resnet18]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import Params, parse
from tasks.images.loaders import read_rows
from tasks.training.loop import TrainJob, WorkerContext, train_loop
from tests.micro_project import REPO, merge, prepare_data

Figures = tuple[float, float, float, float]  # images/s, in-epoch images/s, s between epochs, wall s


def throughput(reports: list[dict[str, Any]], world: int) -> tuple[float, float, float]:
    """Images/s between the end of the first epoch and the end of the last, all ranks together; the same
    counting only the time inside epochs; and the mean time from one epoch's end to the next one's start
    (what reporting adds: Ray's report barrier, checkpoint saving)."""
    first, last, timed = reports[0], reports[-1], reports[1:]
    images = sum(r["images"] for r in timed) * world  # every rank gets an equal share
    inside = sum(r["epoch_end_time"] - r["epoch_start_time"] for r in timed)
    between = [b["epoch_start_time"] - a["epoch_end_time"] for a, b in zip(reports, timed, strict=False)]
    return (images / (last["epoch_end_time"] - first["epoch_end_time"]), images / inside,
            sum(between) / len(between))


def plain(job: TrainJob) -> Figures:
    reports: list[dict[str, Any]] = []
    started = time.perf_counter()
    train_loop(job, WorkerContext(report=lambda metrics, state: reports.append(metrics)))
    return *throughput(reports, 1), time.perf_counter() - started


def with_ray(job: TrainJob, workers: int, storage: Path) -> Figures:
    import json

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer

    from tasks.train import train_worker

    log = storage / f"reports-{workers}w-{time.time_ns()}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    class Reports(UserCallback):  # runs in the Train controller: every report, checkpointed or not
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            with log.open("a") as fh:
                fh.write(json.dumps(metrics[0]) + "\n")

    cpus = max(1, (os.cpu_count() or 2) // workers)
    trainer = TorchTrainer(
        train_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"bench-{workers}w-{time.time_ns()}", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[Reports()]))  # type: ignore[list-item]  # stub says Tune callbacks
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    reports = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["epoch"])
    return *throughput(reports, workers), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="train.checkpoint_every_epochs (0, the default: by time, so here only after the last epoch)")
    args = ap.parse_args()

    import yaml

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse(Params, merge(base, {
        "synthetic": {"identities": args.identities, "test_identities": 0, "images_per_camera": 4,
                      "height": args.height, "width": args.width},
        "protocol": {"trials": 1},
        "model": {"backbone": args.backbone},
        "train": {"epochs": args.epochs, "height": args.height, "width": args.width,
                  "checkpoint_every_epochs": args.checkpoint_every},
    }), "")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlr = prepare_data(Path(tmp), params)
        rows = read_rows(str(mlr), 0, ["train"])
        job = TrainJob(params=params, rows=rows, store=str(params.store_dir().resolve()))
        print(f"{len(rows)} training images, {args.backbone} {args.height}x{args.width}, P={params.train.p} "
              f"K={params.train.k}, {args.epochs} epochs (throughput over epochs 2..{args.epochs}), "
              f"checkpoint every {args.checkpoint_every or params.train.checkpoint_every_seconds} "
              f"{'epoch(s)' if args.checkpoint_every else 's (and after the last epoch)'}")
        results = {"plain PyTorch": plain(job)}
        from tasks.infra.raycluster import connect

        started = time.perf_counter()
        connect(None)
        print(f"ray.init: {time.perf_counter() - started:.1f} s")
        for workers in (1, 2):
            results[f"Ray Train, {workers} worker{'s' * (workers > 1)}"] = with_ray(job, workers, Path(tmp) / "ray")
        # The baseline again: if the two plain figures differ, the machine was busy and the ratios are noise.
        results["plain PyTorch (again)"] = plain(job)
    base_ips = (results["plain PyTorch"][0] + results["plain PyTorch (again)"][0]) / 2
    base_inside = (results["plain PyTorch"][1] + results["plain PyTorch (again)"][1]) / 2
    print(f"baseline = mean of the two plain runs: {base_ips:.1f} images/s ({base_inside:.1f} inside epochs)")
    print("the second plain run shares the cores with the idle Ray cluster, the first does not")
    print(f"\n{'loop':<24}{'images/s':>10}{'ratio':>8}{'in-epoch':>10}{'ratio':>8}{'s between':>11}{'wall s':>9}")
    for name, (ips, inside, between, wall) in results.items():
        print(f"{name:<24}{ips:>10.1f}{ips / base_ips:>7.2f}x{inside:>10.1f}{inside / base_inside:>7.2f}x"
              f"{between:>11.3f}{wall:>9.1f}")


if __name__ == "__main__":
    main()
