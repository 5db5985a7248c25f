"""The embedded default dataset: procedural pedestrians, generated deterministically from a seed.

It is built to reproduce the problem RAIN solves. Identities are drawn so that coarse cues (clothing
colours from a small palette, skin, build) are shared by groups of identities (48 combinations), a
mid-scale cue (a 3-pixel belt) survives r = 2 and 3, and what tells the members of a group apart
are fine cues: a garment texture (stripes or checks with a 2-3 pixel period)
and a small chest logo. A 4x down-sampling erases the fine cues, so a model that learned to rely on them
from HR images only loses much more rank-1 on LR queries than on HR queries.

Each camera has its own illumination (gain and colour cast), background clutter, and each image its
own pose (shift, scale, stride) and crop jitter. Files: ``cam_<c>/<pid>_<c>_<i>.png`` (lossless, so
the fine cues of HR images survive storage).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.config import Params, SyntheticConfig
from tasks.datasets.base import DatasetError, RawImage

_FILE_RE = re.compile(r"^(\d{4})_(\d)_(\d{2})\.png$")

# Coarse palette: few enough values that identities share them (the point of the dataset).
_SHIRTS = np.array([[200, 40, 40], [40, 80, 190], [40, 150, 60], [220, 200, 60]], dtype=np.float32)
_TROUSERS = np.array([[40, 40, 50], [120, 110, 90], [60, 70, 130]], dtype=np.float32)
_SKIN = np.array([[225, 185, 155], [140, 95, 70]], dtype=np.float32)
# A mid-scale cue (a 3-pixel belt) that survives r = 2 and 3 but blurs away at r = 4.
_BELTS = np.array([[15, 15, 15], [240, 240, 240], [150, 40, 150]], dtype=np.float32)


class SyntheticDataset:
    name = "synthetic"
    image_formats: tuple[str, ...] = ("PNG",)
    native_lr_queries: bool = False

    def test_identities(self, params: Params) -> int | None:
        return params.synthetic.test_identities or None  # its own split, sized in params.yaml; 0: half

    def acquire(self, raw_dir: Path, params: Params) -> None:
        generate(raw_dir, params.synthetic)

    def scan(self, raw_dir: Path) -> Iterator[RawImage]:
        files = sorted(raw_dir.glob("cam_*/*.png"))
        if not files:
            raise DatasetError(f"{raw_dir}: no synthetic images; run the download stage first")
        for file in files:
            match = _FILE_RE.match(file.name)
            if match is None:
                raise DatasetError(f"{file}: unexpected file name in the synthetic dataset")
            pid, cam = int(match[1]), int(match[2])
            # Camera pairs (0,1), (2,3), ...: the odd camera of each pair is the distant (LR) one.
            yield RawImage(path=file.relative_to(raw_dir).as_posix(), person_id=pid, camera_id=cam,
                           camera_pair=cam // 2, view=cam % 2)


def generate(raw_dir: Path, cfg: SyntheticConfig) -> int:
    """Write the whole dataset into `raw_dir`; returns the number of images. Deterministic in cfg."""
    rng = np.random.default_rng(cfg.seed)
    identities = [_draw_identity(rng) for _ in range(cfg.identities)]
    cameras = [_draw_camera(rng, c) for c in range(cfg.cameras)]
    count = 0
    for cam_id, camera in enumerate(cameras):
        cam_dir = raw_dir / f"cam_{cam_id}"
        cam_dir.mkdir(parents=True, exist_ok=True)
        for pid, ident in enumerate(identities):
            for i in range(cfg.images_per_camera):
                # One generator per image, so any image can be regenerated on its own.
                img_rng = np.random.default_rng([cfg.seed, cam_id, pid, i])
                pixels = _render(ident, camera, img_rng, cfg.height, cfg.width)
                Image.fromarray(pixels).save(cam_dir / f"{pid:04d}_{cam_id}_{i:02d}.png", optimize=False)
                count += 1
    return count


def _draw_identity(rng: np.random.Generator) -> dict[str, object]:
    return {
        "shirt": _SHIRTS[rng.integers(len(_SHIRTS))],
        "trousers": _TROUSERS[rng.integers(len(_TROUSERS))],
        "skin": _SKIN[rng.integers(len(_SKIN))],
        "torso_w": float(rng.choice([0.42, 0.55])),
        "leg_frac": 0.46,
        "belt": _BELTS[rng.integers(len(_BELTS))],
        # Fine cues: texture kind, period (px), phase, and a 3x3 logo with its own colour.
        "texture": int(rng.integers(4)),  # 0 h-stripes, 1 v-stripes, 2 checks, 3 diagonal
        "period": int(rng.integers(2, 4)),
        "tex_colour": rng.uniform(0, 255, 3).astype(np.float32),
        "logo": rng.integers(0, 2, (3, 3)).astype(bool),
        "logo_colour": rng.uniform(0, 255, 3).astype(np.float32),
        "logo_x": float(rng.uniform(-0.15, 0.15)),
    }


def _draw_camera(rng: np.random.Generator, cam_id: int) -> dict[str, object]:
    return {
        "gain": float(rng.uniform(0.75, 1.15)),
        "cast": rng.uniform(-18, 18, 3).astype(np.float32),
        "bg": rng.uniform(60, 200, 3).astype(np.float32),
        "clutter": 4 + 3 * cam_id,
    }


def _render(ident: dict, camera: dict, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = Image.new("RGB", (w, h), tuple(int(v) for v in camera["bg"]))
    draw = ImageDraw.Draw(img)
    for _ in range(int(camera["clutter"])):  # background clutter: boxes in muted colours
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 3))
        colour = tuple(int(v) for v in rng.uniform(40, 220, 3))
        draw.rectangle([x0, y0, x1, y1], fill=colour)

    # Pose and crop jitter: a person box shifted and scaled within the frame.
    scale = rng.uniform(0.82, 0.95)
    ph, cx = int(h * scale), w / 2 + rng.uniform(-0.08, 0.08) * w
    top = int(rng.uniform(0.02, 1 - scale - 0.01) * h)
    head_h, leg_h = int(ph * 0.14), int(ph * ident["leg_frac"])
    torso_h = ph - head_h - leg_h
    torso_w = int(w * ident["torso_w"])
    tx0 = int(cx - torso_w / 2)
    ty0 = top + head_h
    skin = tuple(int(v) for v in ident["skin"])
    draw.ellipse([cx - head_h * 0.4, top, cx + head_h * 0.4, top + head_h], fill=skin)
    stride = int(rng.uniform(0, 0.12) * w)
    leg_w = max(3, torso_w // 2 - 1)
    trousers = tuple(int(v) for v in ident["trousers"])
    draw.rectangle([tx0 - stride // 2, ty0 + torso_h, tx0 + leg_w - stride // 2, ty0 + torso_h + leg_h],
                   fill=trousers)
    draw.rectangle([tx0 + torso_w - leg_w + stride // 2, ty0 + torso_h,
                    tx0 + torso_w + stride // 2, ty0 + torso_h + leg_h], fill=trousers)
    arm_w = max(2, w // 16)
    draw.rectangle([tx0 - arm_w, ty0 + 1, tx0 - 1, ty0 + int(torso_h * 0.9)], fill=skin)
    draw.rectangle([tx0 + torso_w, ty0 + 1, tx0 + torso_w + arm_w - 1, ty0 + int(torso_h * 0.9)], fill=skin)
    pixels = np.asarray(img, dtype=np.float32).copy()

    # Torso: coarse colour plus the identity's fine texture (period 2-3 px: gone after 4x down-sampling).
    ty1, tx1 = min(h, ty0 + torso_h), min(w, tx0 + torso_w)
    tx0c = max(0, tx0)
    yy, xx = np.mgrid[ty0:ty1, tx0c:tx1]
    period, kind = int(ident["period"]), int(ident["texture"])
    if kind == 2:  # checks of (period - 1)-pixel cells
        cell = period - 1
        on = (yy // cell + xx // cell) % 2 == 0
    else:  # stripes: horizontal, vertical or diagonal
        coord = {0: yy, 1: xx, 3: yy + xx}[kind]
        on = coord % period < (period + 1) // 2
    torso = np.where(on[..., None], ident["shirt"], 0.5 * ident["shirt"] + 0.5 * ident["tex_colour"])
    pixels[ty0:ty1, tx0c:tx1] = torso

    belt_y = ty0 + torso_h - 3
    pixels[max(0, belt_y):max(0, belt_y + 3), tx0c:tx1] = ident["belt"]

    # Logo: a 3x3 pattern of 2x2-pixel cells at the chest.
    lx = int(cx + ident["logo_x"] * w) - 3
    ly = ty0 + max(2, torso_h // 5)
    for (i, j), bit in np.ndenumerate(ident["logo"]):
        if bit:
            y, x = ly + 2 * i, lx + 2 * j
            if 0 <= y < h - 1 and 0 <= x < w - 1:
                pixels[y:y + 2, x:x + 2] = ident["logo_colour"]

    # Camera illumination, then sensor noise.
    pixels = pixels * camera["gain"] + camera["cast"]
    pixels += rng.normal(0, 4.0, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)
