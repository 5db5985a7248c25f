"""The GPU path in one prepared script, for a bare GPU machine (Python, torch, torchvision, numpy, pillow,
pyarrow, pyyaml: no Ray, Prefect, MLflow or DVC), so it imports `rain_model` and the Ray-free loop only.

In the same run, at ResNet-50 256x128 with P x K = 16 x 4 identity images (each with its LR copy):
  1. plain:    a torchvision ResNet-50 training step (HR only, cross-entropy, bf16 autocast, channels_last)
  2. rain:     the RAIN step (Eq. 8: D step + F/G/C step on HR and LR), bf16 autocast, channels_last
               -> identity images/s of both, their ratio, peak GPU memory of the RAIN step
  3. bf16:     the four Eq. 7 terms under bf16 autocast vs fp32 on one batch (same weights)
  4. loader:   the decoded-image store's images/s (to the device, as uint8) vs the RAIN step's images/s
  5. ddp:      a one-process process group (NCCL on CUDA, gloo otherwise) with the DDP-wrapped RAIN model
  6. loop:     two epochs of tasks/training/loop.py on a generated synthetic set, from the store, with
               train.loader_workers 0 (load in the training process) and 2 (prefetching processes)
  7. paper:    presets/paper.yaml (sampled triplets, Eq. 1 on both resolutions, bf16, no flip) trained by the
               same loop and scored on the device as the evaluate stage scores (CMC, mAP on the test split):
               `rain run --preset paper` without Ray, ImageNet weights (nothing downloads) or 10 trials
Every figure goes to a JSON file (--out) and is printed. --tiny runs it all on the CPU in seconds
(ResNet-18, 64x32, 4 x 2), which the test suite does; on one H100 the full run takes about two minutes.

    python bench/gpu.py [--tiny] [--out bench/out/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loader import synthetic_params, training_set
from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.network import RAIN
from rain_model.objective import Batch, forward_generator, generator_losses, make_optimizers, place_model, train_step
from tasks.evaluation.scoring import score_trial, summarise
from tasks.images.store import ImageStore, StorePairs
from tasks.training.loop import TrainJob, WorkerContext, ddp_backend, train_loop
from tests.micro_project import REPO, merge

TORCHVISION_WIDTH = 64  # F as the plain torchvision ResNet it is compared with (params.yaml's 32 is a CPU budget)
FULL = {"backbone": "resnet50", "height": 256, "width": 128, "p": 16, "k": 4, "identities": 200, "steps": 60,
        "warmup": 10, "paper_epochs": 2}
TINY = {"backbone": "resnet18", "height": 64, "width": 32, "p": 4, "k": 2, "identities": 12, "steps": 2,
        "warmup": 1, "paper_epochs": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[int], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per step after `warmup` untimed steps (cuDNN autotuning, allocator warm-up)."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync(device)
        started = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_batch(n: int, ids: int, size: tuple[int, int], device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    x_hr = torch.rand(n, 3, *size, generator=g)  # (B, 3, H, W)
    small = torch.nn.functional.interpolate(x_hr, scale_factor=0.25, mode="bilinear", antialias=True)
    x_lr = torch.nn.functional.interpolate(small, size=size, mode="bilinear")  # (B, 3, H, W)
    labels = torch.arange(n) // (n // ids)  # (B,) ids identities, K images each
    return Batch(x_hr.to(device), x_lr.to(device), labels.to(device))


def plain_resnet(cfg: dict[str, Any], batch: Batch, ids: int, device: torch.device) -> float:
    """Seconds per step of a torchvision ResNet training step on the HR images only."""
    import torchvision

    model = getattr(torchvision.models, cfg["backbone"])(num_classes=ids).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    x = batch.x_hr.contiguous(memory_format=torch.channels_last)

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), batch.labels)
        loss.backward()
        opt.step()

    return timed_steps(step, device, cfg["warmup"], cfg["steps"])


def rain_model_for(cfg: dict[str, Any], obj: ObjectiveConfig, ids: int, device: torch.device) -> RAIN:
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone=cfg["backbone"], base_channels=TORCHVISION_WIDTH, levels=(4, 5))
    return place_model(RAIN(model_cfg, ids), obj, device).train()


def rain_step(cfg: dict[str, Any], batch: Batch, ids: int, device: torch.device) -> tuple[float, float]:
    """Seconds per RAIN step and its peak GPU memory in GiB (0 on the CPU)."""
    obj = ObjectiveConfig(bf16_autocast=True, channels_last=True)
    model = rain_model_for(cfg, obj, ids, device)
    optimizers = make_optimizers(model, obj)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(lambda i: train_step(model.generator, model.discriminators, optimizers, batch, obj, i),
                          device, cfg["warmup"], cfg["steps"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak


def bf16_agreement(cfg: dict[str, Any], batch: Batch, ids: int, device: torch.device) -> dict[str, Any]:
    """Each Eq. 7 term under bf16 autocast and in fp32, from the same weights on the same batch."""
    terms = {}
    for name, obj in (("fp32", ObjectiveConfig()), ("bf16", ObjectiveConfig(bf16_autocast=True, channels_last=True))):
        model = rain_model_for(cfg, obj, ids, device)
        with torch.no_grad():
            out = forward_generator(model.generator, batch, obj, (4, 5))
            terms[name] = {k: float(v) for k, v in generator_losses(model.discriminators, out, batch, obj).items()}
    rel = {k: abs(terms["bf16"][k] - v) / max(abs(v), 1e-8) for k, v in terms["fp32"].items()}
    return {"fp32": terms["fp32"], "bf16": terms["bf16"], "max_relative_difference": max(rel.values())}


def loader_rate(rows: list[dict], store: ImageStore, cfg: dict[str, Any], device: torch.device) -> float:
    """Identity images/s of store batches (HR + LR) landing on the device as uint8, as train_loop reads them."""
    size = (cfg["height"], cfg["width"])
    pairs = StorePairs(store, rows, size, [r["label"] for r in rows])
    n = cfg["p"] * cfg["k"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(rows), (n,), generator=g).tolist() for _ in range(max(10, cfg["steps"]))]

    pin = device.type == "cuda"  # as train_loop's DataLoader does

    def step(i: int) -> None:
        for x in pairs.__getitems__(batches[i % len(batches)])[:2]:  # HR, LR
            (x.pin_memory() if pin else x).to(device, non_blocking=pin)

    return n / timed_steps(step, device, 2, len(batches))


def ddp_steps(cfg: dict[str, Any], batch: Batch, ids: int, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """A one-process group with the RAIN model under DistributedDataParallel for a few steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = ddp_backend(device)
    with tempfile.NamedTemporaryFile(prefix="rain-pg-") as rendezvous:
        dist.init_process_group(backend, init_method=f"file://{rendezvous.name}", rank=0, world_size=1)
        try:
            obj = ObjectiveConfig(bf16_autocast=True, channels_last=True)
            model = rain_model_for(cfg, obj, ids, device)
            optimizers = make_optimizers(model, obj)
            ids_arg = [device.index or 0] if device.type == "cuda" else None
            generator = DistributedDataParallel(model.generator, device_ids=ids_arg)
            discriminators = DistributedDataParallel(model.discriminators, device_ids=ids_arg)
            losses = [{k: float(v) for k, v in train_step(generator, discriminators, optimizers, batch, obj, i).items()}
                      for i in range(steps)]
            used = dist.get_backend()
        finally:
            dist.destroy_process_group()
    finite = all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in losses)
    return {"backend": used, "steps": steps, "finite": bool(finite), "last_losses": losses[-1]}


def loop_epochs(rows: list[dict], store: ImageStore, cfg: dict[str, Any], device: torch.device,
                loader_workers: int) -> dict[str, Any]:
    """Two epochs of the Ray-free training loop (tasks/training/loop.py) from the store, bf16 + channels_last."""
    params = synthetic_params(cfg["identities"], cfg["height"], cfg["width"], {
        "model": {"backbone": cfg["backbone"], "base_channels": TORCHVISION_WIDTH},
        "objective": {"bf16_autocast": True, "channels_last": True},
        "train": {"epochs": 2, "p": cfg["p"], "k": cfg["k"], "loader_workers": loader_workers},
    })
    reports: list[dict[str, Any]] = []
    started = time.perf_counter()
    train_loop(TrainJob(params=params, rows=rows, store=str(store.folder)),
               WorkerContext(device=device, report=lambda metrics, state: reports.append(metrics)))
    return {"seconds": round(time.perf_counter() - started, 1), "training_images": len(rows),
            "epochs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                        if k.startswith("L_") or k in ("epoch", "images", "images_per_second")} for r in reports]}


def paper_preset(rows: list[dict], store: ImageStore, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """presets/paper.yaml trained for cfg["paper_epochs"] epochs by the training loop, then scored on `device`
    by the evaluate stage's scoring on trial 0's test split. Its ImageNet weights are left out (no network
    here) and one trial is trained, on the generated set `rows` and `store` were made from (same size and
    trial count)."""
    preset = yaml.safe_load((REPO / "presets" / "paper.yaml").read_text())
    preset.pop("ray")  # one GPU in this process, no Ray
    params = synthetic_params(cfg["identities"], cfg["height"], cfg["width"], merge(preset, {
        "model": {"backbone": cfg["backbone"], "pretrained": None},
        "protocol": {"trials": 1},
        "train": {"trials": [0], "epochs": cfg["paper_epochs"], "p": cfg["p"], "k": cfg["k"], "height": cfg["height"],
                  "width": cfg["width"]},
    }))
    states: list[dict[str, Any]] = []
    started = time.perf_counter()
    train_loop(TrainJob(params=params, rows=rows, store=str(store.folder)),
               WorkerContext(device=device, report=lambda metrics, state: states.extend([state] if state else [])))
    trained = time.perf_counter()
    model = RAIN(params.model, states[-1]["num_classes"])
    model.load_state_dict(states[-1]["model"])
    scores, _ = score_trial(model.to(device).eval(), params, params.mlr_manifest_path(), 0, store)
    return {"objective": {"mining": params.objective.mining, "adv_loss": params.objective.adv_loss,
                          "bf16_autocast": params.objective.bf16_autocast}, "flip": params.evaluate.flip,
            "train_seconds": round(trained - started, 1), "score_seconds": round(time.perf_counter() - trained, 1),
            "rows": {name: {k: round(float(v), 4) for k, v in summarise(name, evals).items() if k in ("rank1", "mAP")}
                     for name, evals in scores.items()}}


def run(cfg: dict[str, Any], device: torch.device, work: Path) -> dict[str, Any]:
    ids = cfg["p"]
    n = cfg["p"] * cfg["k"]
    size = (cfg["height"], cfg["width"])
    batch = make_batch(n, ids, size, device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "config": cfg}
    plain_s = plain_resnet(cfg, batch, ids, device)
    rain_s, peak = rain_step(cfg, batch, ids, device)
    result["plain_images_per_second"] = round(n / plain_s, 1)
    result["rain_images_per_second"] = round(n / rain_s, 1)
    result["rain_over_plain"] = round(plain_s / rain_s, 3)
    result["rain_peak_memory_gib"] = round(peak, 2)
    result["bf16_vs_fp32"] = bf16_agreement(cfg, batch, ids, device)
    os.chdir(work)
    data_params = synthetic_params(cfg["identities"], cfg["height"], cfg["width"])
    started = time.perf_counter()
    rows, store = training_set(work, data_params)
    result["data_seconds"] = round(time.perf_counter() - started, 1)
    result["loader_images_per_second"] = round(loader_rate(rows, store, cfg, device), 1)
    result["loader_keeps_up"] = result["loader_images_per_second"] > result["rain_images_per_second"]
    result["ddp"] = ddp_steps(cfg, batch, ids, device)
    # Loading in the training process (the CPU default) and in two prefetching DataLoader processes.
    result["train_loop"] = {f"loader_workers={w}": loop_epochs(rows, store, cfg, device, w) for w in (0, 2)}
    result["paper_preset"] = paper_preset(rows, store, cfg, device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="ResNet-18 at 64x32, 4 x 2, on the CPU: a smoke run")
    ap.add_argument("--out", type=Path, default=Path("bench/out/gpu.json"))
    ap.add_argument("--device", default=None, help="default: cuda when available (never with --tiny)")
    ap.add_argument("--paper-epochs", type=int, default=None, help="epochs of the paper preset's training (default 2)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    out = args.out.resolve()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        here = Path.cwd()
        try:
            cfg = TINY if args.tiny else FULL
            result = run(cfg | ({"paper_epochs": args.paper_epochs} if args.paper_epochs else {}), device, Path(tmp))
        finally:
            os.chdir(here)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
