"""params.yaml parsing: strict, typed, and the repository's own params.yaml is valid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rain_model.config import ModelConfig
from tasks.config import PROMOTED_ALIASES, Params, ParamsError, load_params, parse
from tests.micro_project import REPO


def write(tmp_path: Path, data: dict) -> Path:
    """The repository's params.yaml with `data` merged over it (load_params refuses a missing parameter)."""
    from tests.micro_project import merge

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()), data)))
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
    ({"ray": {"max_failures": -1}}, "ray.max_failures"),
    ({"ray": {"keep_checkpoints": 0}}, "ray.keep_checkpoints"),
    ({"serve": {"max_pixels": 0}}, "serve.max_pixels"),
    ({"serve": {"max_images": -1}}, "serve.max_images"),
    ({"serve": {"max_images": 2.5}}, "serve.max_images"),
])
def test_wrong_types_and_values_name_the_key(tmp_path: Path, data: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        load_params(write(tmp_path, data))


@pytest.mark.parametrize("alias", ["champion", "Champion"])
def test_register_alias_managed_by_rain_promote_is_refused_by_name(tmp_path: Path, alias: str) -> None:
    # Only `rain promote` (its gate, locks and promotion tags) moves `champion`; `dvc repro` must not.
    from tasks.registry.promote import PromoteRequest

    assert PromoteRequest().alias in PROMOTED_ALIASES  # the set refused here is the set promote moves
    with pytest.raises(ParamsError, match=rf"^params\.yaml: register\.alias = '{alias}' is invalid: .*rain promote"):
        load_params(write(tmp_path, {"register": {"alias": alias}}))
    assert load_params(write(tmp_path, {"register": {"alias": "staging"}})).register.alias == "staging"


def test_values_are_typed_and_frozen(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, {"objective": {"margin": 1}, "model": {"levels": [5]}}))
    assert params.objective.margin == 1.0 and type(params.objective.margin) is float
    assert params.model.levels == (5,)
    with pytest.raises(AttributeError):
        params.train.epochs = 3  # type: ignore[misc]
    sections = [getattr(params, f.name) for f in dataclasses.fields(params)]
    assert all(type(s).__dataclass_params__.frozen for s in sections if dataclasses.is_dataclass(s))  # type: ignore[attr-defined]


def test_flat_params_reads_as_params_yaml_writes_it(tmp_path: Path) -> None:
    # MLflow shows these to a person: no Python reprs such as `(2, 3, 4)`, `()`, `None` or `True`.
    from tasks.config import flat_params

    params = load_params(write(tmp_path, {"train": {"lr_decay_epochs": []}, "ray": {"use_gpu": True}}))
    flat = flat_params(params)
    assert flat["protocol.train_rates"] == "[2, 3, 4]" and flat["protocol.unseen_rates"] == "[8]"
    assert flat["train.lr_decay_epochs"] == "[]"
    assert flat["model.pretrained"] == "none" and flat["ray.address"] == "none"  # None, one way everywhere
    assert flat["ray.use_gpu"] == "true" and flat["evaluate.flip"] == "false"
    assert flat["objective.lr"] == "0.002" and flat["dataset.name"] == "synthetic"
    assert not [v for v in flat.values() if v.startswith(("(", "None", "True", "False"))]


@pytest.mark.parametrize(("dataset", "source"), [("viper", "viper"), ("cuhk03-detected", "cuhk03"),
                                                 ("synthetic", None)])
def test_flat_params_holds_only_the_source_of_the_dataset_in_use(tmp_path: Path, dataset: str,
                                                                 source: str | None) -> None:
    from tasks.config import flat_params

    params = load_params(write(tmp_path, {"dataset": {"name": dataset}}))
    sources = {k for k in flat_params(params) if k.startswith("sources.")}
    expected = {f"sources.{source}.{f}" for f in ("url", "md5", "filename")} if source else set()
    assert sources == expected
    if source:
        assert flat_params(params)[f"sources.{source}.md5"] == params.sources[source].md5


def test_the_params_hash_tells_values_apart_that_read_alike(tmp_path: Path) -> None:
    # None and the string "none" read the same in MLflow; the hash and the run keys use the typed values.
    from tasks.config import flat_params, param_values, params_values_sha256

    params = load_params(write(tmp_path, {}))
    named = dataclasses.replace(params, ray=dataclasses.replace(params.ray, address="none"))
    assert flat_params(named)["ray.address"] == flat_params(params)["ray.address"]
    assert params_values_sha256(named) != params_values_sha256(params)
    assert param_values(params)["protocol.train_rates"] == (2, 3, 4)
    assert params_values_sha256(load_params(write(tmp_path, {}))) == params_values_sha256(params)


def test_derived_paths_follow_paths_and_dataset(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, {"paths": {"manifests": "m"}, "dataset": {"name": "viper"}}))
    assert params.mlr_manifest_path() == Path("m/viper-mlr.parquet")
    assert params.raw_dir() == Path("data/raw/viper")


def _fields(obj: object, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a (nested) params dataclass by dotted key."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _fields(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_params_yaml_names_every_field_with_the_code_default() -> None:
    # params.yaml is "every parameter of the pipeline": each field of each params dataclass is written
    # there, and the dataclass default is that value, so a config built in code (Params(), ModelConfig())
    # and the pipeline's own run the same thing and cannot drift apart.
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = _fields(Params())
    del defaults["sources"]  # a mapping of datasets, no defaults: B keeps it in params.yaml only
    missing = []
    for key in defaults:
        section, name = key.split(".")
        if name not in (data.get(section) or {}):
            missing.append(key)
    assert not missing, f"params.yaml lacks {missing}"
    parsed = _fields(parse(Params, data, ""))
    differ = {k: (parsed[k], v) for k, v in defaults.items() if parsed[k] != v}
    assert not differ, f"params.yaml value != code default: {differ}"


@pytest.mark.parametrize(("data", "message"), [
    ({"train": {"epochs": 0}}, r"^params\.yaml: train\.epochs = 0 is invalid: expected >= 1$"),
    ({"model": {"levels": [5, 4]}}, r"^params\.yaml: model\.levels = \(5, 4\) is invalid: must be strictly"),
    ({"objective": {"lr": 0}}, r"^params\.yaml: objective\.lr = 0\.0 is invalid: must be > 0"),
])
def test_every_config_check_names_the_dotted_key_and_is_a_value_error(tmp_path: Path, data: dict,
                                                                      message: str) -> None:
    # One check (rain_model.config.require) for the pipeline's and the model's configs: the same wording,
    # the dotted key, and a ValueError for callers that catch that.
    with pytest.raises(ValueError, match=message):  # as callers that only know ValueError catch it
        load_params(write(tmp_path, data))
    with pytest.raises(ValueError, match=r"^levels=\(5, 4\): must be strictly"):
        ModelConfig(levels=(5, 4))
