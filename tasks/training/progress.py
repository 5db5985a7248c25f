"""What training prints while it runs (rank 0): one line per epoch and a sign of life within long epochs.

    epoch 3/20: L_adv 0.69  L_rec 0.021  L_cls 4.12  L_tri 0.35  L_D 1.38 | D4 HR/LR 0.91/0.88  D5 HR/LR 0.75/0.70
      HR-LR distance 0.21  |adv|/|id| f4 0.3 f5 0.12  w_adv 1 | 412 images/s, 6.2 s | ETA 1m45s   (one line)
    epoch 4/20: batch 120/310, 405 images/s

The ETA is the mean time of the epochs this process has trained times the epochs left: a resumed run
does not count the epochs of the run before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from tasks.infra.tracking import GAME, VALIDATION

log = logging.getLogger(__name__)

# A line within an epoch at most this often: short epochs print only their epoch line, and a long one
# (thousands of images on a CPU) still shows it is moving. Not a param: it changes no output.
PROGRESS_EVERY_SECONDS = 30.0


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: as long as it must be to read at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_seconds(elapsed: float, epochs_done: int, epochs_left: int) -> float | None:
    """Mean epoch time so far times the epochs left; None before the first epoch ends."""
    if epochs_done <= 0:
        return None
    return elapsed / epochs_done * epochs_left


def game_summary(game: Mapping[str, float]) -> str:
    """The game's diagnostics (rain_model/diagnostics.py, without their section prefix) in a few words:
    `D4 HR/LR 0.91/0.88  D5 HR/LR 0.75/0.70  HR-LR distance 0.21  |adv|/|id| f4 0.30 f5 0.12`, led by
    `COLLAPSED (feature spread 0.003)` in an epoch whose features collapsed."""
    levels = sorted({k[1:k.index("_")] for k in game if k.startswith("D") and k.endswith("_accuracy_HR")})
    parts = [f"COLLAPSED (feature spread {game['feature_spread']:.3g})"] if game.get("collapsed") else []
    parts += [f"D{j} HR/LR {game[f'D{j}_accuracy_HR']:.2f}/{game[f'D{j}_accuracy_LR']:.2f}" for j in levels]
    if "feature_distance" in game:
        parts.append(f"HR-LR distance {game['feature_distance']:.3g}")
    ratios = [f"f{j} {game[f'grad_f{j}_ratio']:.2g}" for j in levels if f"grad_f{j}_ratio" in game]
    if ratios:
        parts.append("|adv|/|id| " + " ".join(ratios))
    if game.get("w_adv") is not None:
        parts.append(f"w_adv {game['w_adv']:.2g}")
    return "  ".join(parts)


def validation_summary(val: Mapping[str, float]) -> str:
    """`val LR rank-1 34.1% (best 36.0% at epoch 9)` from the `val/` metrics without their prefix; "" if none."""
    if "lr_rank1" not in val:
        return ""
    return (f"val LR rank-1 {100 * val['lr_rank1']:.1f}% (best {100 * val['best_lr_rank1']:.1f}% at epoch "
            f"{int(val['best_epoch'])})")


def epoch_line(epoch: int, epochs: int, losses: Mapping[str, float], images_per_second: float, seconds: float,
               eta: float | None, game: Mapping[str, float] | None = None,
               val: Mapping[str, float] | None = None) -> str:
    shown = "  ".join(f"{name} {value:.4g}" for name, value in losses.items())
    when = "done" if epoch + 1 == epochs else f"ETA {duration(eta)}" if eta is not None else "ETA -"
    summaries = "".join(f"{part} | " for part in (game_summary(game or {}), validation_summary(val or {})) if part)
    return (f"epoch {epoch + 1}/{epochs}: {shown} | {summaries}"
            f"{images_per_second:.0f} images/s, {seconds:.1f} s | {when}")


class Progress:
    """Logs `epoch_line` after each epoch, showing the losses named in `losses` (the objective's terms, by the
    paper's names), and a batch line within an epoch every `every` seconds."""

    def __init__(self, epochs: int, batches_per_epoch: int, losses: tuple[str, ...],
                 every: float = PROGRESS_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.epochs, self.batches_per_epoch, self.losses = epochs, batches_per_epoch, losses
        self.every, self.clock = every, clock
        self.started: float | None = None  # the first epoch's start: building the model is not an epoch
        self.epochs_done = 0
        self.epoch_started = self.last_line = 0.0

    def start_epoch(self) -> None:
        self.epoch_started = self.last_line = self.clock()
        if self.started is None:
            self.started = self.epoch_started

    def batch(self, epoch: int, batches: int, images: int) -> None:
        """After `batches` batches (`images` images) of `epoch`."""
        now = self.clock()
        if now - self.last_line < self.every:
            return
        self.last_line = now
        rate = images / max(now - self.epoch_started, 1e-9)
        log.info("epoch %d/%d: batch %d/%d, %.0f images/s", epoch + 1, self.epochs, batches,
                 self.batches_per_epoch, rate)

    def epoch(self, epoch: int, losses: Mapping[str, float], images_per_second: float) -> None:
        now = self.clock()
        self.epochs_done += 1
        eta = eta_seconds(now - (self.started or now), self.epochs_done, self.epochs - epoch - 1)
        shown = {name: losses[name] for name in self.losses if name in losses}
        game = {k[len(GAME):]: v for k, v in losses.items() if k.startswith(GAME)}
        val = {k[len(VALIDATION):]: v for k, v in losses.items() if k.startswith(VALIDATION)}
        log.info("%s", epoch_line(epoch, self.epochs, shown, images_per_second, now - self.epoch_started, eta, game,
                                  val))
