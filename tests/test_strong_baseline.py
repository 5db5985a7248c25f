"""The re-ID "strong baseline" options (BNNeck, label smoothing, paired augmentation, learning-rate warm-up):
each does what it says when on, and changes nothing when off (the shipped params.yaml)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rain_model.augment import ERASE_FILL, augment_pair, pair_generator
from rain_model.backbone import gap
from rain_model.config import ModelConfig
from rain_model.losses import classification_loss
from rain_model.network import RAIN
from rain_model.objective import lr_factor, make_schedulers
from tasks.config import load_params
from tests.micro_project import REPO

torch.set_num_threads(1)


def _model(**kwargs: Any) -> RAIN:
    torch.manual_seed(0)
    return RAIN(ModelConfig(backbone="resnet18", decoder_channels=(8,), **kwargs), 4)


def test_the_shipped_params_switch_every_option_off() -> None:
    params = load_params(REPO / "params.yaml")
    assert (params.model.bnneck, params.model.retrieval_feature) == (False, "v")
    assert params.objective.label_smoothing == 0.0
    train = params.train
    assert (train.augment_flip, train.augment_pad, train.augment_erase, train.warmup_epochs) == (False, 0, 0.0, 0)


# BNNeck


def test_without_bnneck_the_network_is_the_papers() -> None:
    """Off adds no module, parameter or buffer: a state_dict saved before the option existed loads as it was."""
    plain, neck = _model(), _model(bnneck=True)
    assert plain.generator.neck is None
    extra = sorted(set(neck.state_dict()) - set(plain.state_dict()))
    assert extra == ["generator.neck.bias", "generator.neck.num_batches_tracked", "generator.neck.running_mean",
                     "generator.neck.running_var", "generator.neck.weight"]
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().embed(x), gap(plain.generator.features(x)[4]), rtol=0, atol=0)


def test_bnneck_gives_c_a_normalised_feature_and_keeps_v_for_the_triplet_loss() -> None:
    model = _model(bnneck=True).train()
    seen: list[torch.Tensor] = []
    model.generator.classifier.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    x = torch.rand(8, 3, 64, 32)
    out = model.generator(x, levels=(4, 5))
    (c_in,) = seen  # (8, d)
    torch.testing.assert_close(c_in.mean(dim=0), torch.zeros(c_in.shape[1]), rtol=0, atol=1e-5)
    assert torch.allclose(c_in.var(dim=0, unbiased=False), torch.ones(c_in.shape[1]), atol=1e-2)
    # v is GAP(f5) before the BN (non-negative after F's last ReLU): what L_tri and the diagnostics read
    torch.testing.assert_close(out.v, gap(model.generator.features(x)[4]))
    assert not torch.allclose(out.v.mean(dim=0), torch.zeros(out.v.shape[1]), atol=1e-2)
    assert model.generator.neck is not None and not model.generator.neck.bias.requires_grad  # frozen shift
    assert model.generator.neck.weight.requires_grad


@pytest.mark.parametrize("retrieval_feature", ["v", "bnneck"])
def test_embed_returns_v_or_the_bnneck_feature(retrieval_feature: str) -> None:
    model = _model(bnneck=True, retrieval_feature=retrieval_feature).train()
    with torch.no_grad():
        model.generator(torch.rand(8, 3, 64, 32))  # the BN's running statistics move off (0, 1)
    model.eval()
    x = torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        v = gap(model.generator.features(x)[4])  # (3, d)
        assert model.generator.neck is not None
        neck = model.generator.neck(v)  # (3, d), with the running statistics
        assert not torch.allclose(v, neck, atol=1e-3)
        want = v if retrieval_feature == "v" else neck
        torch.testing.assert_close(model.embed(x), want, rtol=0, atol=0)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # an exported model maps to the same


# Label smoothing (Eq. 3)


def test_label_smoothing_zero_is_eq3_and_eps_the_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, -1, 1, 3, -1])
    logits = torch.randn(6, 4)
    keep = labels >= 0
    assert torch.equal(classification_loss(logits, labels, 0.0), classification_loss(logits, labels))
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    eps, k = 0.1, logits.shape[1]
    logp = logits[keep].log_softmax(dim=1)  # (4, K)
    target = torch.full_like(logp, eps / k)
    target[torch.arange(len(logp)), labels[keep]] += 1 - eps  # 1 - eps + eps / K on the identity
    want = -(target * logp).sum(dim=1).mean()
    got = classification_loss(logits, labels, eps)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, classification_loss(logits, labels))
    # unlabelled rows stay out: changing their logits changes nothing
    other = logits.clone()
    other[~keep] = 100.0
    assert torch.equal(classification_loss(other, labels, eps), got)


# Augmentation of an HR image and its LR copy


def _coordinates(b: int, h: int = 64, w: int = 32) -> torch.Tensor:
    """Float images whose pixels name themselves: channel 0 row + 1, channel 1 column + 1, channel 2 image + 1."""
    rows = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([torch.stack([rows, cols, torch.full((h, w), i + 1.0)]) for i in range(b)])  # (B, 3, H, W)


OPTIONS = [{"flip": True}, {"pad": 6}, {"erase": 1.0}, {"flip": True, "pad": 6, "erase": 0.5}]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_an_image_and_its_lr_copy_get_the_same_flip_crop_and_erasing(options: dict[str, Any]) -> None:
    x_hr = _coordinates(16)
    x_lr = x_hr + 1000.0  # another picture, pixel for pixel: its transform must be x_hr's
    a_hr, a_lr = augment_pair(x_hr, x_lr, pair_generator(0, 0, 3), **options)
    assert a_hr.shape == x_hr.shape and not torch.equal(a_hr, x_hr)  # it did something
    filled = (a_hr == a_lr).all(dim=1)  # (B, H, W): padding (0) or erasing (ERASE_FILL), in both copies alike
    assert torch.equal(filled, ((a_hr == 0) | (a_hr == ERASE_FILL)).all(dim=1))
    moved = ~filled
    assert torch.equal((a_lr - a_hr)[moved[:, None].expand_as(a_hr)], torch.full((int(moved.sum()) * 3,), 1000.0))
    assert torch.equal(a_hr[:, 2][moved], torch.arange(1.0, 17)[:, None, None].expand(16, 64, 32)[moved])  # rows stay


def test_flip_mirrors_some_pairs_and_pad_shifts_within_the_pad() -> None:
    x = _coordinates(16)
    flipped, _ = augment_pair(x, x.clone(), pair_generator(1, 0, 0), flip=True)
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x, strict=True)]
    assert all(m or torch.equal(f, i) for m, f, i in zip(mirrored, flipped, x, strict=True))
    assert 0 < sum(mirrored) < 16
    shifted, _ = augment_pair(x, x.clone(), pair_generator(1, 0, 0), pad=4)
    for s, i in zip(shifted, x, strict=True):
        kept = (s != 0).all(dim=0)  # (H, W): pixels of the image, not of the zero padding
        dy = (s[0][kept] - i[0][kept]).unique()
        dx = (s[1][kept] - i[1][kept]).unique()
        assert len(dy) == len(dx) == 1 and abs(int(dy)) <= 4 and abs(int(dx)) <= 4  # one shift, within the pad
    assert (shifted == 0).any()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_with_every_option_off_the_images_come_back_unchanged(dtype: torch.dtype) -> None:
    x_hr = (torch.rand(4, 3, 64, 32) * 255).to(dtype)
    x_lr = (torch.rand(4, 3, 64, 32) * 255).to(dtype)
    a_hr, a_lr = augment_pair(x_hr, x_lr, pair_generator(0, 0, 0))
    assert torch.equal(a_hr, x_hr) and torch.equal(a_lr, x_lr)


def test_the_same_seed_rank_and_step_give_the_same_augmentation() -> None:
    x = _coordinates(8)
    options: dict[str, Any] = {"flip": True, "pad": 5, "erase": 0.5}
    first = augment_pair(x, x + 1, pair_generator(3, 1, 17), **options)
    again = augment_pair(x, x + 1, pair_generator(3, 1, 17), **options)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (pair_generator(3, 1, 18), pair_generator(3, 0, 17), pair_generator(4, 1, 17)):
        assert not torch.equal(augment_pair(x, x + 1, other, **options)[0], first[0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_erase_probability_one_erases_every_pair_and_zero_none(dtype: torch.dtype) -> None:
    scale = 255 if dtype == torch.uint8 else 1
    fill = round(ERASE_FILL * 255) if dtype == torch.uint8 else ERASE_FILL
    x = torch.zeros(32, 3, 64, 32, dtype=dtype) + (scale if dtype == torch.uint8 else 1)  # white: fill is grey
    erased, erased_lr = augment_pair(x, x.clone(), pair_generator(0, 0, 0), erase=1.0)
    area = (erased == fill).all(dim=1).flatten(1).sum(dim=1)  # (B,) erased pixels per image
    assert bool((area > 0).all()) and torch.equal(erased, erased_lr)
    assert bool((area <= 0.4 * 64 * 32 + 64).all())  # at most 40 % of the image (+ rounding)
    kept, _ = augment_pair(x, x.clone(), pair_generator(0, 0, 0), erase=0.0)
    assert torch.equal(kept, x)


# Learning-rate warm-up


def _optimizers(n: int = 2) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr) for lr in (0.002, 0.0001)[:n]]


def _rates(schedulers: list[torch.optim.lr_scheduler.LRScheduler], epochs: int) -> list[list[float]]:
    """Each optimizer's learning rate in every epoch (the schedule steps after each)."""
    out = []
    for _ in range(epochs):
        out.append([s.optimizer.param_groups[0]["lr"] for s in schedulers])
        for s in schedulers:
            s.optimizer.step()
            s.step()
    return out


def test_warm_up_rises_linearly_then_the_decays_apply_to_both_rates() -> None:
    schedulers = make_schedulers(_optimizers(), (5, 7), 0.1, warmup_epochs=3, warmup_factor=0.01)
    factors = [0.01, 0.01 + 0.99 / 3, 0.01 + 0.99 * 2 / 3, 1, 1, 0.1, 0.1, 0.01, 0.01]
    rates = _rates(schedulers, len(factors))
    for epoch, (factor, (lr_g, lr_d)) in enumerate(zip(factors, rates, strict=True)):
        assert lr_g == pytest.approx(0.002 * factor, rel=1e-12), epoch
        assert lr_d == pytest.approx(0.0001 * factor, rel=1e-12), epoch  # D's by the same factor
    assert [lr_factor(e, (5, 7), 0.1, 3, 0.01) for e in range(9)] == pytest.approx(factors, rel=1e-12)


def test_without_warm_up_the_schedule_is_todays_multisteplr_exactly() -> None:
    ours = make_schedulers(_optimizers(), (8, 11), 0.1, warmup_epochs=0, warmup_factor=0.01)
    assert all(type(s) is torch.optim.lr_scheduler.MultiStepLR for s in ours)  # checkpoints hold the same state
    todays = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=[8, 11], gamma=0.1) for o in _optimizers()]
    assert _rates(ours, 14) == _rates(todays, 14)  # bit for bit


def test_a_warm_up_schedule_resumes_from_its_state_exactly() -> None:
    straight = make_schedulers(_optimizers(1), (4,), 0.1, warmup_epochs=3, warmup_factor=0.05)
    want = _rates(straight, 6)
    first = make_schedulers(_optimizers(1), (4,), 0.1, warmup_epochs=3, warmup_factor=0.05)
    head = _rates(first, 2)
    state = copy.deepcopy(first[0].state_dict())
    resumed = make_schedulers(_optimizers(1), (4,), 0.1, warmup_epochs=3, warmup_factor=0.05)
    resumed[0].load_state_dict(state)
    resumed[0].optimizer.param_groups[0]["lr"] = first[0].optimizer.param_groups[0]["lr"]  # as the optimizer's state
    assert head + _rates(resumed, 4) == want


# In the training loop


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.micro_project import prepared

    root, _ = prepared(tmp_path_factory, "strong", {})
    return root


def _train(root: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any],
           resume: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train on the micro data; the checkpoint states (copied: a report saves them before training goes on)."""
    from tasks.images.loaders import read_rows
    from tasks.training.loop import TrainJob, WorkerContext, train_loop
    from tests.micro_project import micro_params

    monkeypatch.chdir(root)
    params = micro_params(overrides)
    job = TrainJob(params=params, rows=read_rows(str(params.mlr_manifest_path()), 0, ["train"]),
                   store=str(params.store_dir()))
    states: list[dict[str, Any]] = []
    train_loop(job, WorkerContext(resume=resume,
                                  report=lambda _m, state: states.append(copy.deepcopy(state)) if state else None))
    return states


STRONG = {"train": {"epochs": 3, "augment_flip": True, "augment_pad": 4, "augment_erase": 0.5, "warmup_epochs": 2,
                    "warmup_factor": 0.1, "lr_decay_epochs": [2]}}


def test_a_resumed_run_with_augmentation_and_warm_up_continues_exactly(micro: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _train(micro, monkeypatch, STRONG)
    assert [s["epoch"] for s in straight] == [0, 1, 2]
    lr = [s["optimizers"]["generator"]["param_groups"][0]["lr"] for s in straight]  # after epochs 1, 2, 3
    base = load_params(REPO / "params.yaml").objective.lr
    assert lr == pytest.approx([base * 0.55, base * 0.1, base * 0.1], rel=1e-12)  # warm-up to 1 at 2, then x0.1
    resumed = _train(micro, monkeypatch, STRONG, resume=straight[0])
    assert [s["epoch"] for s in resumed] == [1, 2]
    for key, value in straight[-1]["model"].items():
        torch.testing.assert_close(resumed[-1]["model"][key], value, rtol=0, atol=0, msg=key)
    # the augmentation really ran in the loop: without it the same run ends elsewhere
    plain = _train(micro, monkeypatch, {"train": {**STRONG["train"], "augment_flip": False, "augment_pad": 0,
                                                  "augment_erase": 0.0}})
    assert any(not torch.equal(plain[-1]["model"][k], v) for k, v in straight[-1]["model"].items())


def test_d_keeps_its_rate_through_f_s_decays_unless_decay_d() -> None:
    """The training loop's schedules: F/G/C's rate decays at train.lr_decay_epochs; D's (lr x lr_d_ratio) warms up
    with it but decays only with objective.decay_d, so a late D can still follow F's small moves."""
    from rain_model.network import RAIN
    from rain_model.objective import make_optimizers
    from tasks.training.loop import lr_schedulers
    from tests.micro_project import micro_params

    for decay_d in (False, True):
        params = micro_params({"objective": {"lr": 0.002, "lr_d_ratio": 0.5, "decay_d": decay_d},
                               "train": {"epochs": 6, "lr_decay_epochs": [2, 4], "lr_decay": 0.1,
                                         "warmup_epochs": 1, "warmup_factor": 0.1}})
        optimizers = make_optimizers(RAIN(params.model, 4), params.objective)
        rates = _rates(lr_schedulers(optimizers, params), 6)
        assert [f for f, _ in rates] == pytest.approx([0.0002, 0.002, 0.0002, 0.0002, 2e-05, 2e-05])
        d_rates = [0.0001, 0.001, 0.0001, 0.0001, 1e-05, 1e-05] if decay_d else [0.0001, 0.001, 0.001, 0.001,
                                                                                     0.001, 0.001]
        assert [d for _, d in rates] == pytest.approx(d_rates), decay_d
