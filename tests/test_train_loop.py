"""The Ray-free training loop: when it checkpoints, which DDP backend it needs, and that it trains from the
decoded-image store."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.config import TrainConfig
from tasks.images.loaders import read_rows
from tasks.training.loop import TrainJob, WorkerContext, checkpoint_due, ddp_backend, train_loop
from tests.micro_project import micro_params, prepare_data


def test_checkpoint_is_due_after_the_last_epoch_by_time_or_every_n_epochs() -> None:
    by_time = TrainConfig(epochs=10, checkpoint_every_epochs=0, checkpoint_every_seconds=60)
    assert [e for e in range(10) if checkpoint_due(by_time, e, since_last=5.0)] == [9]
    assert checkpoint_due(by_time, 3, since_last=60.0)
    every_3 = TrainConfig(epochs=10, checkpoint_every_epochs=3, checkpoint_every_seconds=1e9)
    assert [e for e in range(10) if checkpoint_due(every_3, e, since_last=0.0)] == [2, 5, 8, 9]


def test_ddp_backend_is_nccl_on_cuda_and_gloo_on_cpu() -> None:
    assert ddp_backend(torch.device("cuda", 0)) == "nccl"
    assert ddp_backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("every_epochs, checkpointed", [(0, [2]), (1, [0, 1, 2])])
def test_loop_reports_every_epoch_and_checkpoints_as_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                every_epochs: int, checkpointed: list[int]) -> None:
    monkeypatch.chdir(tmp_path)
    params = micro_params({"train": {"epochs": 3, "checkpoint_every_epochs": every_epochs}})
    mlr = prepare_data(tmp_path, params)
    reports: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    job = TrainJob(params=params, rows=read_rows(str(mlr), 0, ["train"]), store=str(params.store_dir()))
    train_loop(job, WorkerContext(report=lambda metrics, state: reports.append((metrics, state))))
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2]
    assert [m["epoch"] for m, state in reports if state is not None] == checkpointed
    assert all(m["images"] > 0 and m["L_total"] > 0 for m, _ in reports)


def test_semi_supervised_training_never_reads_the_hidden_labels(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Figure 5's setting: permuting the identities of the unlabelled images changes no batch and no weight,
    and C has one output per labelled identity."""
    import numpy as np

    from tasks.images.loaders import semi_supervised_labels

    monkeypatch.chdir(tmp_path)
    params = micro_params({"train": {"epochs": 1, "label_fraction": 0.5}})
    mlr = prepare_data(tmp_path, params)
    rows = read_rows(str(mlr), 0, ["train"])
    kept = semi_supervised_labels([r["label"] for r in rows], 0.5, params.train.seed)
    hidden = [i for i, y in enumerate(kept) if y < 0]
    permuted = [dict(r) for r in rows]
    for i, j in zip(hidden, np.random.default_rng(0).permutation(hidden), strict=True):
        permuted[i]["label"] = rows[j]["label"]
    assert [r["label"] for r in permuted] != [r["label"] for r in rows]

    def final_state(training_rows: list[dict[str, Any]]) -> dict[str, Any]:
        states: list[dict[str, Any]] = []
        job = TrainJob(params=params, rows=training_rows, store=str(params.store_dir()))
        train_loop(job, WorkerContext(report=lambda metrics, state: states.append(state) if state else None))
        return states[-1]

    a, b = final_state(rows), final_state(permuted)
    assert a["num_classes"] == b["num_classes"] == max(kept) + 1 == round(0.5 * len({r["label"] for r in rows}))
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=0, atol=0, msg=key)


def test_the_resume_key_follows_what_the_weights_depend_on_and_nothing_else() -> None:
    """A re-run resumes an interrupted Ray run only under the same key (tasks/training/resume.py)."""
    import dataclasses

    from tasks.training import resume

    params = micro_params()
    reads = {"mlr_manifest": "m", "store": "s", "code": "c", "pretrained": "none"}
    key = resume.run_key(params, 0, reads)
    neutral = [dataclasses.replace(params, train=dataclasses.replace(params.train, checkpoint_every_seconds=5,
                                                                     trials=(0, 1))),
               dataclasses.replace(params, ray=dataclasses.replace(params.ray, keep_runs=9, max_failures=3))]
    assert all(resume.run_key(p, 0, reads) == key for p in neutral)
    changed = [resume.run_key(params, 1, reads),
               resume.run_key(dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=3)), 0, reads),
               resume.run_key(params, 0, reads | {"pretrained": "another file's sha256"}),
               resume.run_key(params, 0, reads | {"code": "edited"})]
    assert key not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize("variant, shown", [("rain", "L_adv .* L_rec .* L_cls .* L_tri .* L_D "),
                                            ("baseline_hr", "L_cls .* L_tri [0-9.e-]+ \\|")])
def test_rank_0_logs_one_line_per_epoch_and_no_schedule_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture, variant: str,
                                                              shown: str) -> None:
    """Without L_adv the discriminator's optimizer never steps: it has no LR schedule to step either (torch
    warned "lr_scheduler.step() before optimizer.step()" for every run without it)."""
    import logging
    import re
    import warnings

    monkeypatch.chdir(tmp_path)
    params = micro_params({"train": {"epochs": 2}, "objective": {"variant": variant}})
    mlr = prepare_data(tmp_path, params)
    job = TrainJob(params=params, rows=read_rows(str(mlr), 0, ["train"]), store=str(params.store_dir()))
    caplog.set_level(logging.INFO, logger="tasks.training.progress")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_loop(job, WorkerContext())
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.training.progress"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(shown, line) for line in lines), lines
    assert "ETA" in lines[0] and lines[1].endswith("done")


def test_each_epoch_reports_the_game_and_the_ramped_w_adv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The diagnostics of every step, averaged over the epoch, reach the report (MLflow's `game/` section)
    and the epoch line; with a 2-epoch ramp, epoch e trains with w_adv * e / 2."""
    import logging

    monkeypatch.chdir(tmp_path)
    params = micro_params({"train": {"epochs": 3}, "objective": {"w_adv": 0.6, "adv_ramp_epochs": 2}})
    mlr = prepare_data(tmp_path, params)
    reports: list[dict[str, Any]] = []
    job = TrainJob(params=params, rows=read_rows(str(mlr), 0, ["train"]), store=str(params.store_dir()))
    caplog.set_level(logging.INFO, logger="tasks.training.progress")
    train_loop(job, WorkerContext(report=lambda metrics, state: reports.append(metrics)))
    assert [m["game/w_adv"] for m in reports] == pytest.approx([0.0, 0.3, 0.6])
    for m in reports:
        assert 0 <= m["game/D4_accuracy_HR"] <= 1 and 0 <= m["game/D5_accuracy_LR"] <= 1
        assert m["game/feature_distance"] > 0 and m["game/grad_f5_L_id"] > 0
    assert reports[0]["game/grad_f4_L_adv"] == 0.0 and reports[2]["game/grad_f4_L_adv"] > 0  # weight 0, then not
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.training.progress"]
    assert all("D4 HR/LR" in line and "HR-LR distance" in line for line in lines), lines


def test_validation_reads_no_test_image_keeps_the_best_epoch_and_changes_no_weight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With protocol.val_identities the loop scores the validation split after every epoch: the weights it
    trains are those of a run that never validates, no pixel of a test-split image is read before the model is
    chosen, and the weights kept are those of the epoch with the best validation LR rank-1."""
    from tasks.images.store import ImageStore
    from tasks.training.loop import kept_weights

    monkeypatch.chdir(tmp_path)
    params = micro_params({"train": {"epochs": 3}, "protocol": {"val_identities": 2}})
    mlr = prepare_data(tmp_path, params)
    rows = read_rows(str(mlr), 0, ["train"])
    read: list[str] = []
    real_rows = ImageStore.rows

    def recording(self: ImageStore, paths: Any, size: tuple[int, int]) -> Any:
        read.extend(paths)
        return real_rows(self, paths, size)

    monkeypatch.setattr(ImageStore, "rows", recording)
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {"plain": [], "validated": []}
    for name, manifest in (("plain", None), ("validated", str(mlr.resolve()))):
        job = TrainJob(params=params, rows=rows, store=str(params.store_dir()), mlr=manifest)
        # A copy, as train.py's torch.save is: on the CPU the state's weights are the live tensors, so an earlier
        # epoch's state kept as it is would show the last epoch's weights.
        train_loop(job, WorkerContext(report=lambda metrics, state, out=runs[name]: out.append(
            (metrics, copy.deepcopy(state)))))
    plain_last, validated_last = runs["plain"][-1][1], runs["validated"][-1][1]
    assert plain_last is not None and validated_last is not None
    assert all(torch.equal(plain_last["model"][k], validated_last["model"][k]) for k in plain_last["model"])
    assert plain_last["best"] is None and kept_weights(plain_last) is plain_last["model"]

    test_paths = {r["path"] for r in read_rows(str(mlr), 0, ["query", "gallery", "gallery_pool"])}
    val_paths = {r["path"] for r in read_rows(str(mlr), 0, ["val_query", "val_gallery", "val_gallery_pool"])}
    assert val_paths and set(read) & val_paths and not set(read) & test_paths

    scores = [m["val/lr_rank1"] for m, _ in runs["validated"]]
    for metrics, _ in runs["validated"]:  # HR against LR in eval mode, as retrieval sees them
        assert 0.0 <= metrics["val/probe_accuracy"] <= 1.0 and metrics["val/centroid_gap"] >= 0.0
    best = scores.index(max(scores))  # the first of equal scores: a later epoch must do better to be kept
    assert validated_last["best"]["epoch"] == best and runs["validated"][-1][0]["val/best_epoch"] == best + 1
    best_state = runs["validated"][best][1]
    assert best_state is not None  # MICRO checkpoints every epoch
    kept = kept_weights(validated_last)
    assert all(torch.equal(kept[k], best_state["model"][k]) for k in kept)
