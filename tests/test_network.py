"""RAIN's parts: shapes at every level, reconstruction and embedding, configs, pretrained weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.network import RAIN

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> RAIN:
    torch.manual_seed(0)
    return RAIN(ModelConfig(backbone="resnet18", base_channels=64), num_classes=5).eval()  # torchvision's


@pytest.mark.parametrize(("height", "width"), [(64, 32), (32, 64)])
def test_shapes_at_every_level_reconstruction_and_embedding(model: RAIN, height: int, width: int) -> None:
    x = torch.rand(2, 3, height, width)
    with torch.no_grad():
        feats = model.generator.features(x)
        out = model.generator(x, levels=(4, 5))
        v = model.embed(x)
    want = [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)]  # resnet18 channels and stride of f1..f5
    assert [tuple(f.shape) for f in feats] == [(2, c, height // s, width // s) for c, s in want]
    assert out.x_rec is not None and out.x_rec.shape == x.shape
    assert float(out.x_rec.min()) >= 0 and float(out.x_rec.max()) <= 1
    assert out.logits is not None and out.logits.shape == (2, 5)
    assert [f.shape for f in out.feats] == [feats[3].shape, feats[4].shape]
    assert v.shape == (2, 512)
    torch.testing.assert_close(v, feats[4].mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), v)


def test_resnet50_channels_and_full_resolution_decoder() -> None:
    model = RAIN(ModelConfig(backbone="resnet50", base_channels=64, levels=(5,),
                             decoder_channels=(16, 8, 8, 8, 8)), 3).eval()
    x = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        out = model.generator(x, levels=(5,))
    assert out.feats[0].shape == (1, 2048, 2, 1)
    assert out.x_rec is not None and out.x_rec.shape == x.shape
    assert list(model.discriminators.by_level) == ["f5"]


@pytest.mark.parametrize(("backbone", "base", "expansion"), [("resnet18", 32, 1), ("resnet50", 16, 4)])
def test_a_narrower_backbone_scales_every_level_and_keeps_torchvisions_init(
        backbone: str, base: int, expansion: int) -> None:
    torch.manual_seed(0)
    model = RAIN(ModelConfig(backbone=backbone, base_channels=base, decoder_channels=(8,)), 3).eval()
    want = (base, *(base * 2**i * expansion for i in range(4)))
    with torch.no_grad():
        feats = model.generator.features(torch.rand(2, 3, 64, 32))
        out = model.generator(torch.rand(2, 3, 64, 32), levels=(4, 5))
    assert tuple(f.shape[1] for f in feats) == want == model.generator.backbone.channels
    assert out.logits is not None and model.generator.classifier.in_features == want[4]
    assert [tuple(lg.shape) for lg in model.discriminators(out.feats)] == [(2,), (2,)]
    conv = model.generator.backbone.layer3[0].conv2  # kaiming_normal_(fan_out, relu): std sqrt(2 / (out x kh x kw))
    fan_out = conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3]
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


def test_half_the_width_has_about_a_quarter_of_the_backbones_weights() -> None:
    def backbone_weights(base: int) -> int:
        return sum(p.numel() for p in RAIN(ModelConfig(base_channels=base), 3).generator.backbone.parameters())

    assert 0.24 < backbone_weights(32) / backbone_weights(64) < 0.26


def test_one_discriminator_per_level(model: RAIN) -> None:
    assert list(model.discriminators.by_level) == ["f4", "f5"]
    feats = model.generator.features(torch.rand(3, 3, 64, 32))
    logits = model.discriminators((feats[3], feats[4]))
    assert [tuple(lg.shape) for lg in logits] == [(3,), (3,)]


def test_rejects_sizes_not_divisible_by_32(model: RAIN) -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        model.embed(torch.rand(1, 3, 48, 32))


def test_imagenet_normalisation_happens_inside_the_model(model: RAIN) -> None:
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(model.generator.backbone.state_dict(), strict=False)
    x = torch.rand(2, 3, 64, 32)
    x_norm = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        want = torch.flatten(
            reference.avgpool(
                reference.layer4(
                    reference.layer3(
                        reference.layer2(
                            reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x_norm)))))
                        )
                    )
                )
            ),
            1,
        )  # (2, 512)
        torch.testing.assert_close(model.embed(x), want)


def test_loads_an_imagenet_state_dict_and_names_the_file_on_mismatch(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    good = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), good)
    model = RAIN(ModelConfig(backbone="resnet18", base_channels=64, pretrained_path=str(good)), 2)
    torch.testing.assert_close(model.generator.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(model.generator.backbone.bn1.running_var, reference.bn1.running_var)

    with pytest.raises(ValueError, match=r"resnet18-imagenet\.pth: shape of conv1\.weight is \(64, 3, 7, 7\)"):
        RAIN(ModelConfig(backbone="resnet18", base_channels=32, pretrained_path=str(good)), 2)  # F narrower

    wrong_arch = tmp_path / "resnet34-imagenet.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong_arch)
    with pytest.raises(ValueError, match=r"resnet34-imagenet\.pth"):
        RAIN(ModelConfig(backbone="resnet18", base_channels=64, pretrained_path=str(wrong_arch)), 2)

    wrong_shape = tmp_path / "resnet18-bad.pth"
    state = reference.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=r"resnet18-bad\.pth: shape of conv1\.weight"):
        RAIN(ModelConfig(backbone="resnet18", base_channels=64, pretrained_path=str(wrong_shape)), 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backbone": "vgg16"}, "backbone"),
        ({"levels": (5, 4)}, "levels"),
        ({"levels": (6,)}, "levels"),
        ({"levels": ()}, "levels"),
        ({"decoder_channels": (8, 8, 8, 8, 8, 8)}, "decoder_channels"),
        ({"disc_channels": (0,)}, "disc_channels"),
        ({"pretrained_path": ""}, "pretrained_path"),
        ({"base_channels": 0}, "base_channels"),
        ({"base_channels": 32, "pretrained": "imagenet"}, "base_channels"),
        ({"bnneck": "yes"}, "bnneck"),
        ({"retrieval_feature": "pooled"}, "retrieval_feature"),
        ({"retrieval_feature": "bnneck"}, "retrieval_feature"),  # bnneck is false
    ],
)
def test_model_config_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"variant": "cyclegan"}, "variant"),
        ({"w_adv": -1.0}, "w_adv"),
        ({"w_rec": float("nan")}, "w_rec"),
        ({"margin": 0.0}, "margin"),
        ({"mining": "semi_hard"}, "mining"),
        ({"adv_loss": "hinge"}, "adv_loss"),
        ({"lr": 0.0}, "lr"),
        ({"beta1_d": 1.0}, "beta1_d"),
        ({"variant": "baseline_hr", "w_cls": 0.0, "w_tri": 0.0}, "variant"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": float("nan")}, "label_smoothing"),
    ],
)
def test_objective_config_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        ObjectiveConfig(**kwargs)  # type: ignore[arg-type]


def test_yaml_lists_become_tuples() -> None:
    cfg = ModelConfig(levels=[5], decoder_channels=[8, 8])  # type: ignore[arg-type]
    assert cfg.levels == (5,) and cfg.decoder_channels == (8, 8)


# Run in a fresh interpreter: imports the third-party packages every project module imports at its top
# level first (their own import-time habits are not ours), then, under an audit hook, every module of
# rain_model and tasks, and prints what that second phase did to the process and the machine.
_IMPORT_PROBE = r"""
import ast, importlib, json, logging, os, pkgutil, sys, threading
from pathlib import Path

def project_modules():
    names = []
    for pkg in ("rain_model", "tasks"):
        spec = importlib.util.find_spec(pkg)
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, pkg + ".")]
    return names

def top_level_imports(name):
    tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module

names = project_modules()
for dep in sorted({d for n in names for d in top_level_imports(n)}):
    if dep.split(".")[0] not in ("rain_model", "tasks", "__future__"):
        importlib.import_module(dep)

import torch
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EFFECTS = {"socket.connect", "socket.bind", "socket.getaddrinfo", "subprocess.Popen", "os.fork", "os.system",
           "os.posix_spawn", "os.mkdir", "os.rename", "os.remove", "shutil.rmtree"}
events = []

def audit(event, args):
    writes = event == "open" and (
        (isinstance(args[1], str) and set(args[1]) & set("wax+")) or (isinstance(args[2], int) and args[2] & WRITES))
    if writes or event in EFFECTS:
        events.append(f"{event} {args[0]!r}")

def os_threads():
    return len(os.listdir("/proc/self/task"))

root = logging.getLogger()
before = {"os_threads": os_threads(), "python_threads": threading.active_count(), "root_handlers": len(root.handlers),
          "root_level": root.level, "torch_threads": torch.get_num_threads(), "torch_seed": torch.initial_seed()}
sys.addaudithook(audit)
for name in names:
    importlib.import_module(name)
after = {"os_threads": os_threads(), "python_threads": threading.active_count(), "root_handlers": len(root.handlers),
         "root_level": root.level, "torch_threads": torch.get_num_threads(), "torch_seed": torch.initial_seed()}
print(json.dumps({"modules": names, "events": events, "before": before, "after": after,
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_importing_every_module_does_no_work(tmp_path: Path) -> None:
    """Importing rain_model and tasks starts no thread (a torch op would start its pool), writes no file,
    opens no socket, spawns no process, configures no logging and touches no torch global state."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1",  # a .pyc would count as a file
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert {"rain_model.objective", "tasks.train", "tasks.registry.search", "tasks.training.loop"} <= set(
        report["modules"])  # the walk really reached the modules, not only the packages
    assert report["events"] == []
    assert report["after"] == report["before"]
    assert not report["cuda_initialized"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["home"]
