"""The game's diagnostics (rain_model/diagnostics.py) and the balance controls of the objective: each
measures or does what its name says, and measuring changes nothing a training step does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rain_model.config import InvalidValue, ModelConfig, ObjectiveConfig
from rain_model.diagnostics import centroid_gap, discriminator_accuracy, feature_distance, gradient_norms
from rain_model.discriminator import ResolutionDiscriminators
from rain_model.losses import discriminator_loss, reverse_gradient
from rain_model.network import RAIN
from rain_model.objective import Batch, adv_weight, make_optimizers, train_step

torch.set_num_threads(1)
LEVELS = (4, 5)


def _model(seed: int = 0) -> RAIN:
    torch.manual_seed(seed)
    return RAIN(ModelConfig(backbone="resnet18", levels=LEVELS, decoder_channels=(16, 8, 8)), 3).train()


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_hr = torch.rand(6, 3, 64, 32, generator=g)  # (B, 3, H, W)
    x_lr = nn.functional.interpolate(nn.functional.avg_pool2d(x_hr, 4), size=(64, 32), mode="bilinear")
    return Batch(x_hr, x_lr, torch.tensor([0, 0, 1, 1, 2, 2]))


def _features(separable: bool, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """f_4 (N, 256, 4, 2) and f_5 (N, 512, 2, 1) of 16 images at HR and at LR: LR features equal to
    the HR ones, or HR features shifted by +1 and LR by -1 in every channel (one line separates them)."""
    g = torch.Generator().manual_seed(seed)
    hr = (torch.randn(16, 256, 4, 2, generator=g), torch.randn(16, 512, 2, 1, generator=g))
    if not separable:
        return hr, tuple(f.clone() for f in hr)
    return tuple(f + 1 for f in hr), tuple(f - 1 for f in hr)


def _accuracy(d: ResolutionDiscriminators, hr: tuple[torch.Tensor, ...],
              lr: tuple[torch.Tensor, ...]) -> list[tuple[float, float]]:
    with torch.no_grad():
        logits = d(tuple(torch.cat([h, lo]) for h, lo in zip(hr, lr, strict=True)))
    return [discriminator_accuracy(lg[:16], lg[16:]) for lg in logits]


def test_a_trained_discriminator_scores_about_1_on_a_trivially_separable_batch() -> None:
    torch.manual_seed(0)
    d = ResolutionDiscriminators(LEVELS, (64, 64, 128, 256, 512), (32,))
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    hr, lr = _features(separable=True)
    for _ in range(30):
        logits = d(tuple(torch.cat([h, lo]) for h, lo in zip(hr, lr, strict=True)))
        opt.zero_grad()
        discriminator_loss([lg[:16] for lg in logits], [lg[16:] for lg in logits]).backward()
        opt.step()
    held_hr, held_lr = _features(separable=True, seed=1)  # other images, the same shift
    for acc_hr, acc_lr in _accuracy(d, held_hr, held_lr):
        assert acc_hr >= 0.95 and acc_lr >= 0.95, (acc_hr, acc_lr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_discriminator_scores_one_half_on_identical_hr_and_lr_features(seed: int) -> None:
    torch.manual_seed(seed)
    d = ResolutionDiscriminators(LEVELS, (64, 64, 128, 256, 512), (32,))
    for acc_hr, acc_lr in _accuracy(d, *_features(separable=False, seed=seed)):
        assert (acc_hr + acc_lr) / 2 == 0.5


def test_feature_distance_and_centroid_gap_are_0_for_equal_features_and_ignore_the_scale() -> None:
    g = torch.Generator().manual_seed(0)
    v_hr, noise = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    assert feature_distance(v_hr, v_hr) == 0 and centroid_gap(v_hr, v_hr) == 0
    v_lr = v_hr + 0.1 * noise
    assert feature_distance(3 * v_hr, 3 * v_lr) == pytest.approx(feature_distance(v_hr, v_lr), rel=1e-5)
    # A shift of every LR feature by the same vector is all centroid gap; the per-image distance sees it too.
    shift = torch.zeros(8)
    shift[0] = 2.0
    assert centroid_gap(v_hr, v_hr + shift) == pytest.approx(feature_distance(v_hr, v_hr + shift), rel=1e-5)
    assert centroid_gap(v_hr, v_hr[torch.randperm(20, generator=g)]) < 1e-5  # the same set, reordered


def test_gradient_norms_are_those_of_each_term_at_each_level_and_leave_parameter_gradients_alone() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, requires_grad=True)
    f4, f5 = torch.randn(3, 4) * weight, torch.randn(3, 4) * weight  # two "levels" in one graph
    adversarial = (f5 ** 2).sum()  # touches f5 only
    identity = 2 * f4.sum() + f5.sum()
    norms = gradient_norms(adversarial, identity, (f4, f5), (4, 5))
    assert norms["grad_f4_L_adv"] == 0.0
    assert norms["grad_f5_L_adv"] == pytest.approx(float((2 * f5).detach().norm()), rel=1e-6)
    assert norms["grad_f4_L_id"] == pytest.approx(2 * math.sqrt(12), rel=1e-6)
    assert norms["grad_f5_L_id"] == pytest.approx(math.sqrt(12), rel=1e-6)
    assert norms["grad_f5_ratio"] == pytest.approx(norms["grad_f5_L_adv"] / norms["grad_f5_L_id"])
    assert weight.grad is None
    (adversarial + identity).backward()  # the graph is still there for the step's own backward
    assert weight.grad is not None


def _after_steps(obj: ObjectiveConfig, with_diagnostics: bool, w_adv: float | None = None,
                 steps: int = 2) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    model = _model()
    optimizers = make_optimizers(model, obj)
    seen: list[dict[str, float]] = []
    for step in range(steps):
        diagnostics: dict[str, float] | None = {} if with_diagnostics else None
        train_step(model.generator, model.discriminators, optimizers, _batch(step), obj, step, w_adv=w_adv,
                   diagnostics=diagnostics)
        seen.append(diagnostics or {})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seen


@pytest.mark.parametrize("mining", ["batch_hard", "sampled"])
def test_measuring_the_game_changes_nothing_the_step_does(mining: str) -> None:
    obj = ObjectiveConfig(mining=mining)
    plain, _ = _after_steps(obj, with_diagnostics=False)
    measured, seen = _after_steps(obj, with_diagnostics=True)
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    expected = {f"D{j}_accuracy_{r}" for j in LEVELS for r in ("HR", "LR")} \
        | {"feature_spread", "feature_distance", "centroid_gap"} \
        | {f"grad_f{j}_{n}" for j in LEVELS for n in ("L_adv", "L_id", "ratio")}
    assert all(set(s) == expected for s in seen)
    assert all(0 <= s[k] <= 1 for s in seen for k in s if "accuracy" in k)
    assert all(s[k] > 0 for s in seen for k in s if k.startswith("grad_f") and not k.endswith("ratio"))


@pytest.mark.parametrize(("ramp", "expected"), [(0, [1.0, 1.0, 1.0, 1.0]), (2, [0.0, 0.5, 1.0, 1.0]),
                                               (3, [0.0, 1 / 3, 2 / 3, 1.0])])
def test_adv_weight_at_epoch_e_follows_the_ramp(ramp: int, expected: list[float]) -> None:
    obj = ObjectiveConfig(w_adv=1.0, adv_ramp_epochs=ramp)
    assert [adv_weight(obj, e) for e in range(4)] == pytest.approx(expected)
    assert adv_weight(ObjectiveConfig(w_adv=0.3, adv_ramp_epochs=2), 1) == pytest.approx(0.15)


def test_a_steps_w_adv_is_the_weight_l_adv_enters_the_update_with() -> None:
    """Passing w_adv to the step is the same update as configuring that weight."""
    ramped, _ = _after_steps(ObjectiveConfig(w_adv=1.0), with_diagnostics=False, w_adv=0.25)
    configured, _ = _after_steps(ObjectiveConfig(w_adv=0.25), with_diagnostics=False)
    full, _ = _after_steps(ObjectiveConfig(w_adv=1.0), with_diagnostics=False)
    assert all(torch.equal(ramped[k], configured[k]) for k in ramped)
    assert any(not torch.equal(ramped[k], full[k]) for k in ramped if k.startswith("generator."))


@pytest.mark.parametrize("d_steps", [1, 3])
def test_d_steps_is_the_number_of_discriminator_updates_per_step(d_steps: int) -> None:
    model, obj = _model(), ObjectiveConfig(d_steps=d_steps)
    optimizers = make_optimizers(model, obj)
    train_step(model.generator, model.discriminators, optimizers, _batch(0), obj, 0)
    d_steps_taken = {int(s["step"]) for s in optimizers.discriminator.state.values()}
    g_steps_taken = {int(s["step"]) for s in optimizers.generator.state.values()}
    assert d_steps_taken == {d_steps} and g_steps_taken == {1}


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.25])
def test_label_smoothing_moves_the_hr_target_to_1_minus_smoothing(smoothing: float) -> None:
    """The D loss of one HR logit is smallest where sigmoid(logit) = 1 - smoothing (its gradient is 0 there)."""
    target = 1 - smoothing
    logit = torch.tensor([math.log(target / (1 - target)) if smoothing else 20.0], requires_grad=True)
    discriminator_loss([logit], [torch.tensor([-30.0])], smoothing).backward()
    assert logit.grad is not None and abs(float(logit.grad)) < (1e-6 if smoothing else 1e-8)


@pytest.mark.parametrize(("key", "value"), [("d_steps", 0), ("d_steps", True), ("adv_ramp_epochs", -1),
                                            ("adv_ramp_epochs", 1.5), ("d_label_smoothing", 0.5),
                                            ("d_label_smoothing", -0.1)])
def test_balance_controls_out_of_range_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(InvalidValue, match=key):
        ObjectiveConfig(**{key: value})  # type: ignore[arg-type]


def test_reverse_gradient_is_the_identity_forward_and_minus_scale_times_the_gradient_backward() -> None:
    x = torch.randn(5, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, -0.3 * torch.arange(5.0))


def test_the_reversal_form_trains_d_on_its_loss_and_f_against_it_in_one_step() -> None:
    """adv_loss reversal: the D_j take one Adam step on minus Eq. 1 (their gradient is that of L_D alone),
    and F's gradient from L_adv is minus w_adv times that of L_D at its features."""
    obj = ObjectiveConfig(adv_loss="reversal", w_adv=0.5, bf16_autocast=False)  # fp32: compared exactly below
    model = _model()
    optimizers = make_optimizers(model, obj)
    batch = _batch(0)
    diagnostics: dict[str, float] = {}
    losses = train_step(model.generator, model.discriminators, optimizers, batch, obj, 0, diagnostics=diagnostics)
    assert {int(s["step"]) for s in optimizers.discriminator.state.values()} == {1}
    assert float(losses["L_D"]) == float(losses["L_adv"]) > 0
    assert {"D4_accuracy_HR", "D5_accuracy_LR", "grad_f4_L_adv", "feature_distance"} <= set(diagnostics)

    # F's side: the gradient of L_adv at f_j is -w_adv times that of the same loss without the reversal.
    from rain_model.losses import discriminator_loss as l_d
    from rain_model.objective import forward_generator, generator_losses

    model = _model()
    out = forward_generator(model.generator, batch, obj, LEVELS)
    reversed_adv = generator_losses(model.discriminators, out, batch, obj)["L_adv"]
    logits = model.discriminators(out.feats)
    plain = l_d([lg[:6] for lg in logits], [lg[6:] for lg in logits])
    g_rev = torch.autograd.grad(reversed_adv, out.feats[1], retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain, out.feats[1])[0]
    assert torch.allclose(g_rev, -0.5 * g_plain, rtol=1e-4, atol=1e-7)


def test_reversal_with_several_d_steps_is_refused_naming_the_key() -> None:
    with pytest.raises(InvalidValue, match="d_steps"):
        ObjectiveConfig(adv_loss="reversal", d_steps=2)


def test_feature_spread_is_zero_for_one_point_and_does_not_change_with_scale() -> None:
    from rain_model.diagnostics import feature_spread

    v = torch.randn(8, 16)
    assert feature_spread(torch.ones(8, 16)) == 0.0
    assert feature_spread(10 * v) == pytest.approx(feature_spread(v), rel=1e-5)
    assert feature_spread(v) > 0.5  # independent random directions: about sqrt(2)


def test_collapse_is_a_low_spread_with_the_triplet_loss_at_its_margin_when_it_is_on() -> None:
    from rain_model.diagnostics import COLLAPSE_SPREAD, collapse

    assert collapse(COLLAPSE_SPREAD, 0.3, 0.3) is None  # at the threshold: not collapsed
    low = collapse(COLLAPSE_SPREAD / 10, None, 0.3)  # no triplet loss: the spread decides
    assert low is not None and low.startswith("every feature at one point") and "L_tri" not in low
    stuck = collapse(0.001, 0.305, 0.3)
    assert stuck is not None and "L_tri at its margin (0.305 per term, margin 0.3)" in stuck
    # A low spread over the norm with a triplet loss that still separates: a common offset, not a collapse (a
    # BNNeck run on CUHK03 crops: spread 0.04, L_tri 0.4 per term, validation rank-1 rising).
    assert collapse(0.04, 0.4, 0.3) is None
    assert collapse(0.001, 0.1, 0.3) is None
