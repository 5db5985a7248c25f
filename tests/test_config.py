"""params.yaml parsing: strict, typed, and the repository's own params.yaml is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import Params, ParamsError, load_params
from tests.micro_project import REPO


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.dataset.name == "synthetic"
    assert params.protocol.train_rates == (2, 3, 4)
    assert params.model.levels == (4, 5)


def test_unknown_key_is_refused_by_dotted_name_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"unknown key 'train\.epohcs' \(did you mean 'train\.epochs'\?\)"):
        load_params(write(tmp_path, {"train": {"epohcs": 3}}))


def test_unknown_top_level_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        load_params(write(tmp_path, {"trian": {"epochs": 3}}))


def test_unknown_key_inside_a_model_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"unknown key 'model\.backbnoe'"):
        load_params(write(tmp_path, {"model": {"backbnoe": "resnet18"}}))


@pytest.mark.parametrize(("data", "key"), [
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"protocol": {"train_rates": 2}}, "protocol.train_rates"),
    ({"protocol": {"train_rates": [2, "x"]}}, r"protocol.train_rates\[1\]"),
    ({"evaluate": {"distance": "manhattan"}}, "evaluate.distance"),
    ({"model": {"backbone": "vgg16"}}, "backbone"),
])
def test_wrong_types_and_values_name_the_key(tmp_path: Path, data: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        load_params(write(tmp_path, data))


def test_values_are_typed_and_frozen(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, {"objective": {"margin": 1}, "model": {"levels": [5]}}))
    assert params.objective.margin == 1.0 and isinstance(params.objective.margin, float)
    assert params.model.levels == (5,)
    with pytest.raises(AttributeError):
        params.train.epochs = 3  # type: ignore[misc]
    assert isinstance(params, Params)


def test_derived_paths_follow_paths_and_dataset(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, {"paths": {"manifests": "m"}, "dataset": {"name": "viper"}}))
    assert params.mlr_manifest_path() == Path("m/viper-mlr.parquet")
    assert params.raw_dir() == Path("data/raw/viper")
