"""What training prints: one line per epoch (losses by the paper's names, images/s, ETA) and a batch line
within long epochs."""

from __future__ import annotations

import logging

import pytest

from tasks.training.progress import Progress, duration, epoch_line, eta_seconds, game_summary, validation_summary


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (0, 44.6, 65, 3599, 7620)] == ["0s", "45s", "1m05s", "59m59s", "2h07m"]


def test_the_eta_is_the_mean_epoch_time_times_the_epochs_left() -> None:
    assert eta_seconds(elapsed=30.0, epochs_done=3, epochs_left=7) == pytest.approx(70.0)
    assert eta_seconds(elapsed=0.0, epochs_done=0, epochs_left=7) is None


def test_an_epoch_line_names_each_loss_the_rate_and_the_eta() -> None:
    line = epoch_line(2, 20, {"L_cls": 4.1234, "L_tri": 0.35}, 412.4, 6.23, 105.0)
    assert line == "epoch 3/20: L_cls 4.123  L_tri 0.35 | 412 images/s, 6.2 s | ETA 1m45s"
    assert epoch_line(19, 20, {"L_cls": 1.0}, 400.0, 6.0, 0.0).endswith("| done")


def test_the_game_summary_names_each_discriminator_the_distance_the_gradient_ratio_and_the_weight() -> None:
    game = {"D4_accuracy_HR": 0.914, "D4_accuracy_LR": 0.88, "D5_accuracy_HR": 0.75, "D5_accuracy_LR": 0.7,
            "feature_distance": 0.2134, "centroid_gap": 0.05, "grad_f4_ratio": 0.3, "grad_f5_ratio": 0.123,
            "w_adv": 0.5}
    assert game_summary(game) == ("D4 HR/LR 0.91/0.88  D5 HR/LR 0.75/0.70  HR-LR distance 0.213  "
                                  "|adv|/|id| f4 0.3 f5 0.12  w_adv 0.5")
    assert game_summary({}) == ""
    line = epoch_line(0, 2, {"L_adv": 0.7}, 100.0, 1.0, 1.0, game)
    assert line.startswith("epoch 1/2: L_adv 0.7 | D4 HR/LR 0.91/0.88")
    assert line.endswith("w_adv 0.5 | 100 images/s, 1.0 s | ETA 1s")


def test_the_validation_summary_gives_the_epochs_figure_and_the_best_so_far() -> None:
    val = {"lr_rank1": 0.341, "lr_mAP": 0.4, "best_lr_rank1": 0.36, "best_epoch": 9.0}
    assert validation_summary(val) == "val LR rank-1 34.1% (best 36.0% at epoch 9)"
    assert validation_summary({}) == ""
    line = epoch_line(9, 13, {"L_cls": 1.0}, 100.0, 1.0, 30.0, {}, val)
    assert line == "epoch 10/13: L_cls 1 | val LR rank-1 34.1% (best 36.0% at epoch 9) | 100 images/s, 1.0 s | ETA 30s"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_epoch_and_a_batch_line_only_when_an_epoch_runs_long(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    progress = Progress(epochs=2, batches_per_epoch=10, losses=("L_cls", "L_D"), every=30.0, clock=clock)
    caplog.set_level(logging.INFO, logger="tasks.training.progress")
    for epoch, seconds_per_batch in ((0, 1.0), (1, 8.0)):  # 10 s, then 80 s an epoch
        progress.start_epoch()
        for b in range(1, 11):
            clock.now += seconds_per_batch
            progress.batch(epoch, b, images=b * 32)
        progress.epoch(epoch, {"L_cls": 3.0, "L_tri": 0.5, "L_D": 1.4}, images_per_second=32 / seconds_per_batch)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/2: L_cls 3  L_D 1.4 | 32 images/s, 10.0 s | ETA 10s",
                     "epoch 2/2: batch 4/10, 4 images/s", "epoch 2/2: batch 8/10, 4 images/s",
                     "epoch 2/2: L_cls 3  L_D 1.4 | 4 images/s, 80.0 s | done"]
