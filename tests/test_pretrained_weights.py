"""The paper's settings one switch away: presets written into params.yaml, and ImageNet weights fetched once
into the torch cache with their checksum, never needed again after training, refused by name offline.
Nothing here touches the network: a local HTTP server on 127.0.0.1 stands in for download.pytorch.org."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from dataset_fixtures import LocalServer, http_server
from typer.testing import CliRunner

from flows.cli import app
from rain_model.config import ModelConfig
from rain_model.network import RAIN
from tasks.config import load_params
from tasks.infra import presets
from tasks.training import weights
from tests.micro_project import REPO, micro_params

__all__ = ["http_server"]


def resnet18_file() -> tuple[str, bytes]:
    """A real (randomly initialised) torchvision ResNet-18 state_dict, named as torch.hub names its files."""
    buffer = io.BytesIO()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), buffer)
    data = buffer.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_imagenet_weights_are_downloaded_once_checked_and_used(http_server: LocalServer, torch_home: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = resnet18_file()
    url = http_server.serve(f"/models/{name}", data)
    monkeypatch.setattr(weights, "imagenet_url", lambda backbone: url)
    params = micro_params({"model": {"pretrained": "imagenet", "base_channels": 64}})
    resolved = weights.resolve(params)
    assert resolved.model.pretrained is None
    assert resolved.model.pretrained_path == str(torch_home / "hub" / "checkpoints" / name)
    assert weights.resolve(params).model.pretrained_path == resolved.model.pretrained_path
    assert http_server.hits[f"/models/{name}"] == 1  # the second time from the cache
    model = RAIN(resolved.model, num_classes=3)
    expected = torch.load(io.BytesIO(data), weights_only=True)["conv1.weight"]
    assert torch.equal(model.generator.backbone.conv1.weight, expected)  # F starts from the file's weights


def test_a_file_that_does_not_match_its_hash_is_refused_naming_it(http_server: LocalServer, torch_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = resnet18_file()
    url = http_server.serve(f"/models/{name}", data[:-10] + b"corruption")
    monkeypatch.setattr(weights, "imagenet_url", lambda backbone: url)
    with pytest.raises(weights.PretrainedWeightsError, match=rf"sha256 does not start with {name[9:17]}"):
        weights.resolve(micro_params({"model": {"pretrained": "imagenet", "base_channels": 64}}))
    assert not list((torch_home / "hub" / "checkpoints").iterdir())  # nothing half-checked left behind


def test_an_unresolved_imagenet_setting_never_trains_from_scratch_silently() -> None:
    with pytest.raises(ValueError, match="pretrained='imagenet': fetch the weights"):
        RAIN(ModelConfig(pretrained="imagenet", base_channels=64), num_classes=3)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_with_the_paper_preset_offline_fails_in_seconds_naming_the_file(tmp_path: Path, torch_home: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    url = f"http://127.0.0.1:{_closed_port()}/models/resnet50-0676ba61.pth"  # nothing answers there
    monkeypatch.setattr(weights, "imagenet_url", lambda backbone: url)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", "--preset", "paper", "--project", str(project)])
    assert time.monotonic() - started < 30
    assert result.exit_code == 2, result.output
    folder = torch_home / "hub" / "checkpoints"
    assert f"resnet50-0676ba61.pth is not in {folder}" in result.output
    assert f"put that file in {folder}" in result.output
    assert "+  backbone: resnet50" in result.output  # the diff the preset made
    assert load_params(project / "params.yaml").model.backbone == "resnet50"
    assert not (project / "data").exists()  # no stage ran


def test_a_preset_changes_only_its_values_and_keeps_every_comment() -> None:
    before = (REPO / "params.yaml").read_text()
    overrides = presets.load("paper")
    after = presets.apply(before, overrides)
    wanted = yaml.safe_load(before)
    for section, values in overrides.items():
        wanted[section] |= values
    assert yaml.safe_load(after) == wanted
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert 0 < len(changed) <= sum(len(v) for v in overrides.values())
    for old, new in changed:
        assert old.partition("#")[2] == new.partition("#")[2]  # the comment is kept
        assert old.partition(":")[0] == new.partition(":")[0]  # on the same key


def test_the_paper_preset_is_the_papers_settings(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    presets.write(params_file, "paper")
    params = load_params(params_file)
    assert (params.model.backbone, params.model.pretrained, params.model.levels) == ("resnet50", "imagenet", (4, 5))
    assert params.model.base_channels == 64
    assert (params.train.height, params.train.width) == (256, 128)
    assert (params.objective.mining, params.objective.adv_loss) == ("sampled", "minimax")
    assert params.evaluate.flip is False and params.ray.use_gpu is True
    assert params.protocol.trials == 10 and params.train.trials == tuple(range(10))
    assert presets.write(params_file, "paper") == ""  # applied twice: nothing more to change


def test_an_unknown_preset_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    from tasks.config import ParamsError

    with pytest.raises(ParamsError, match=r"no preset 'papre' \(presets: cuhk03-crops, paper;"):
        presets.load("papre")
