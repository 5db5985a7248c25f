"""Frozen model and objective configurations (built from ``params.yaml`` by a generic loader).

Every field has a default, equal to the value ``params.yaml`` gives it (a test keeps the two equal), and one
of the types str, int, float, bool, tuple[int, ...], tuple[str, ...] or ``str | None``. Values are
validated in ``__post_init__``; a bad value raises ``InvalidValue`` (a ``ValueError``) naming the field
and the value. ``require`` is the one validation check of the project: ``tasks/config.py`` uses it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

BACKBONES = ("resnet18", "resnet34", "resnet50")
VARIANTS = ("rain", "baseline_hr", "baseline_hrlr")
MINING = ("batch_hard", "sampled")
ADV_LOSSES = ("non_saturating", "minimax", "reversal")
ADV_LEVELS = ("sum", "mean")
RETRIEVAL_FEATURES = ("v", "bnneck")


class InvalidValue(ValueError):
    """A configuration field holds a value it cannot take. ``key`` names the field, ``why`` says what it
    must be. Subclasses change only ``template`` (how the message reads), never the check."""

    template = "{key}={value!r}: {why}"

    def __init__(self, key: str, value: object, why: str) -> None:
        super().__init__(self.template.format(key=key, value=value, why=why))
        self.key, self.value, self.why = key, value, why


def require(ok: bool, key: str, value: object, why: str, error: type[InvalidValue] = InvalidValue) -> None:
    """Raise ``error(key, value, why)`` unless ``ok``: every config check goes through here."""
    if not ok:
        raise error(key, value, why)


def _as_tuples(obj: object) -> None:
    """Turn list values of tuple-typed fields into tuples (YAML gives lists)."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))


def _positive_ints(name: str, value: tuple[int, ...]) -> None:
    require(isinstance(value, tuple) and len(value) > 0, name, value, "must be a non-empty tuple of ints")
    require(all(not isinstance(v, bool) and isinstance(v, int) and v >= 1 for v in value), name, value,
            "every entry must be an int >= 1")


def _int_at_least(name: str, value: int, minimum: int) -> None:
    require(not isinstance(value, bool) and isinstance(value, int) and value >= minimum, name, value,
            f"must be an integer >= {minimum}")


def _finite(name: str, value: float, minimum: float, strict: bool) -> None:
    require(not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value), name, value,
            "must be a finite number")
    require(value > minimum or (not strict and value == minimum), name, value,
            f"must be {'>' if strict else '>='} {minimum}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of RAIN: F (ResNet), G (HR decoder), D_j (one per level), C (linear classifier)."""

    backbone: str = "resnet18"
    """F: torchvision ResNet, resnet18 | resnet34 | resnet50 (the paper's), trained from scratch unless
    pretrained_path."""
    base_channels: int = 32
    """Channels of F's R1 and layer1; each later layer doubles them (f5 has 8x, 32x for resnet50). 64 is
    torchvision's and the only width its ImageNet weights fit; compute goes with its square (32: a CPU budget)."""
    levels: tuple[int, ...] = (4, 5)
    """Feature levels j with a resolution discriminator D_j; (5,) = single-level, (4, 5) = multi-level."""
    pretrained: str | None = None
    """imagenet: torchvision's ImageNet weights of `backbone`, fetched by the caller into a local file and
    passed as pretrained_path (this package does no downloading); None: pretrained_path or from scratch."""
    pretrained_path: str | None = None
    """Local ImageNet state_dict of the torchvision ResNet (``fc.*`` is ignored); loaded weights-only."""
    decoder_channels: tuple[int, ...] = (64, 32, 16, 8)
    """G: widths of its learned x2 up-sampling stages (1 to 5; f5 has stride 32, the rest is bilinear)."""
    disc_channels: tuple[int, ...] = (256, 128)
    """D_j: widths of its 1x1-conv layers before global average pooling and the logit."""
    bnneck: bool = False
    """BNNeck (Luo et al. 2019, reid-strong-baseline): a BatchNorm1d with a frozen bias between v = GAP(f5) and
    C, so C reads the normalised feature while L_tri keeps v; off: C reads v (the paper)."""
    retrieval_feature: str = "v"
    """What ``embed`` returns for retrieval: v (before the BNNeck) | bnneck (its normalised output; bnneck only)."""

    def __post_init__(self) -> None:
        _as_tuples(self)
        require(self.backbone in BACKBONES, "backbone", self.backbone, f"must be one of {', '.join(BACKBONES)}")
        _positive_ints("levels", self.levels)
        require(all(j <= 5 for j in self.levels) and list(self.levels) == sorted(set(self.levels)), "levels",
                self.levels, "must be strictly increasing feature levels in 1..5")
        require(self.pretrained_path is None or (isinstance(self.pretrained_path, str) and self.pretrained_path != ""),
                "pretrained_path", self.pretrained_path, "must be a non-empty path or None")
        require(self.pretrained in (None, "imagenet"), "pretrained", self.pretrained, "must be imagenet or None")
        require(self.pretrained is None or self.pretrained_path is None, "pretrained", self.pretrained,
                "must be None when pretrained_path names a file (one source of initial weights)")
        _int_at_least("base_channels", self.base_channels, 1)
        # torchvision's ImageNet weights are 64 wide; a pretrained_path file is checked against F's shapes on load
        require(self.base_channels == 64 or self.pretrained != "imagenet", "base_channels", self.base_channels,
                "must be 64 with pretrained: imagenet (the width of torchvision's weights)")
        _positive_ints("decoder_channels", self.decoder_channels)
        require(len(self.decoder_channels) <= 5, "decoder_channels", self.decoder_channels,
                "must have at most 5 entries (x2 stages)")
        _positive_ints("disc_channels", self.disc_channels)
        require(isinstance(self.bnneck, bool), "bnneck", self.bnneck, "must be true or false")
        require(self.retrieval_feature in RETRIEVAL_FEATURES, "retrieval_feature", self.retrieval_feature,
                f"must be one of {', '.join(RETRIEVAL_FEATURES)}")
        require(self.retrieval_feature != "bnneck" or self.bnneck, "retrieval_feature", self.retrieval_feature,
                "must be v unless bnneck is true (there is no BNNeck feature without it)")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective (Eq. 7-8), its variants and the two optimizers."""

    variant: str = "rain"
    """rain: Eq. 7 | baseline_hr: L_cls + L_tri on HR only | baseline_hrlr: RAIN without L_adv."""
    w_adv: float = 1.0
    """Weight of L_adv (Eq. 1) in Eq. 7; 0 switches the term (and the D step) off."""
    w_rec: float = 1.0
    """Weight of L_rec (Eq. 2) in Eq. 7; 0 switches the term (and G's forward) off."""
    w_cls: float = 1.0
    """Weight of L_cls (Eq. 3) in Eq. 7; 0 switches the term (and C's forward) off."""
    w_tri: float = 1.0
    """Weight of L_tri (Eq. 6) in Eq. 7; 0 switches the term off."""
    margin: float = 0.3
    """Triplet margin m of Eq. 6."""
    mining: str = "batch_hard"
    """Triplet positives/negatives: batch_hard (hardest in the batch) | sampled (one random each, paper)."""
    adv_loss: str = "non_saturating"
    """Feature-extractor side of Eq. 1: non_saturating (-log D(f_L)) | minimax (Eq. 1 itself) | reversal
    (a gradient-reversal layer, Ganin & Lempitsky 2015: one backward trains D_j on Eq. 1 and gives F minus
    w_adv times its gradient, in place of the two-optimizer alternation; D_j updates once per step)."""
    adv_ramp_epochs: int = 0
    """Warm-up of L_adv: epoch e (from 0) weights it w_adv * min(1, e / adv_ramp_epochs), so the identity
    losses shape the features first while the D_j already train; 0: w_adv from the first step."""
    d_steps: int = 1
    """Updates of the D_j per F/G/C update, each on the same batch's detached features."""
    d_label_smoothing: float = 0.0
    """One-sided label smoothing of the D step: HR features are labelled 1 - this (Salimans et al. 2016),
    which keeps D_j from growing over-confident and F's gradient from fading; 0: Eq. 1 as written."""
    label_smoothing: float = 0.0
    """Label smoothing of L_cls (Eq. 3; Szegedy et al. 2016, reid-strong-baseline uses 0.1): the target puts
    1 - this + this / K on the identity and this / K on every class; 0: Eq. 3 as written."""
    lr: float = 2e-3
    """Adam learning rate of F, G, C (high for a short run: params.yaml says why)."""
    lr_d_ratio: float = 0.5
    """Adam learning rate of all D_j as a multiple of ``lr`` (D's rate is ``lr_d``): tied, so that a rate chosen
    for F on a dataset moves D with it. At 1/20 of F's rate (the earlier absolute 1e-4 against 2e-3) D stayed at
    chance on real crops for a whole run; tests/test_discriminator_pace.py checks that D at this ratio separates
    a fixed F's HR and LR features within a few steps."""
    decay_d: bool = False
    """Whether train.lr_decay_epochs also decay D's rate. Off: D keeps its rate (after any warm-up) while F's
    decays, so it can still follow F's last, small moves (decayed with F, it moved ~1e-5 per step at the end)."""
    adv_levels: str = "sum"
    """How L_adv combines the levels' terms: sum (Eq. 7 with one L_adv per D_j: multi-level weighs the
    adversarial gradient twice single-level's) | mean (the same weight whatever the number of levels)."""
    weight_decay: float = 5e-4
    """L2 weight decay of F, G, C (the discriminators have none)."""
    beta1: float = 0.9
    """Adam beta1 of F, G, C."""
    beta1_d: float = 0.5
    """Adam beta1 of the discriminators (0.5 as usual for adversarial training)."""
    bf16_autocast: bool = False
    """bfloat16 autocast of the forward passes: for GPUs, and for CPUs with bf16 instructions (avx512_bf16, AMX),
    where oneDNN made a ResNet-18 RAIN step 1.5-1.8x faster; other CPUs emulate it, 2.2x slower than fp32
    (bench/precision.py measures both). Off by default: fp32 is fast everywhere and gives one trajectory."""
    channels_last: bool = False
    """channels_last memory format for inputs (and the model, see ``place_model``): faster convolutions
    with bf16 on tensor-core GPUs (and a ResNet-18 RAIN step 1.14x on 2 CPU cores); the same outputs up to
    float rounding, which an adversarial trajectory can carry far (tests/test_adversarial_alignment.py)."""

    def __post_init__(self) -> None:
        require(self.variant in VARIANTS, "variant", self.variant, f"must be one of {', '.join(VARIANTS)}")
        for name in ("w_adv", "w_rec", "w_cls", "w_tri", "weight_decay"):
            _finite(name, getattr(self, name), 0.0, strict=False)
        for name in ("margin", "lr", "lr_d_ratio"):
            _finite(name, getattr(self, name), 0.0, strict=True)
        _int_at_least("adv_ramp_epochs", self.adv_ramp_epochs, 0)
        _int_at_least("d_steps", self.d_steps, 1)
        require(self.adv_loss != "reversal" or self.d_steps == 1, "d_steps", self.d_steps,
                "must be 1 with adv_loss reversal (D_j updates in the same backward as F)")
        _finite("d_label_smoothing", self.d_label_smoothing, 0.0, strict=False)
        require(self.d_label_smoothing < 0.5, "d_label_smoothing", self.d_label_smoothing,
                "must be < 0.5 (HR features must stay labelled closer to HR than to LR)")
        _finite("label_smoothing", self.label_smoothing, 0.0, strict=False)
        require(self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing,
                "must be < 1 (at 1 the target no longer names the identity)")
        for name in ("beta1", "beta1_d"):
            value = getattr(self, name)
            _finite(name, value, 0.0, strict=False)
            require(value < 1.0, name, value, "must be < 1")
        require(self.mining in MINING, "mining", self.mining, f"must be one of {', '.join(MINING)}")
        require(self.adv_loss in ADV_LOSSES, "adv_loss", self.adv_loss, f"must be one of {', '.join(ADV_LOSSES)}")
        require(self.adv_levels in ADV_LEVELS, "adv_levels", self.adv_levels, f"must be one of {', '.join(ADV_LEVELS)}")
        for name in ("bf16_autocast", "channels_last", "decay_d"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")
        weights = "w_cls, w_tri" if self.variant == "baseline_hr" else "w_adv, w_rec, w_cls, w_tri"
        require(len(self.active_terms()) > 0, "variant", self.variant, f"every loss it uses ({weights}) has weight 0")

    @property
    def lr_d(self) -> float:
        """Adam learning rate of all D_j: ``lr * lr_d_ratio``."""
        return self.lr * self.lr_d_ratio

    def active_terms(self) -> tuple[str, ...]:
        """Names of the Eq. 7 terms this variant computes (weight > 0 and used by the variant)."""
        used = {
            "rain": ("L_adv", "L_rec", "L_cls", "L_tri"),
            "baseline_hrlr": ("L_rec", "L_cls", "L_tri"),
            "baseline_hr": ("L_cls", "L_tri"),
        }[self.variant]
        weight = {"L_adv": self.w_adv, "L_rec": self.w_rec, "L_cls": self.w_cls, "L_tri": self.w_tri}
        return tuple(name for name in used if weight[name] > 0)
