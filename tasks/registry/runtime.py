"""Which runtime a loaded registered model embeds with: `torch` (its safetensors weights through PyTorch) or `onnx`
(its ONNX export through onnxruntime, tasks/registry/onnx_model.py). Chosen at load, as MLflow's model_config
``{"runtime": ...}``, so `rain search` and `rain serve-model` use the model's own predict either way."""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

RUNTIMES = ("torch", "onnx")
DEFAULT_RUNTIME = "torch"


class UnknownRuntime(ValueError):
    """A runtime name that is none of RUNTIMES."""


class NoOnnxModel(MlflowException):
    """The model version holds no ONNX export (registered before the register stage made one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=RESOURCE_DOES_NOT_EXIST)


def check_runtime(value: str) -> str:
    if value not in RUNTIMES:
        raise UnknownRuntime(f"--runtime {value!r}: expected one of {', '.join(RUNTIMES)}")
    return value


def runtime_of(model_config: dict[str, Any] | None) -> str:
    """The runtime a pyfunc was loaded with (its model_config; none: torch)."""
    return check_runtime(str((model_config or {}).get("runtime", DEFAULT_RUNTIME)))


def load_pyfunc(model_uri: str, runtime: str) -> Any:
    """The registered pyfunc at `model_uri`, embedding with `runtime`. A version without an ONNX export, asked for
    `onnx`, raises NoOnnxModel naming the version (an alias resolved to it)."""
    import mlflow.pyfunc

    if check_runtime(runtime) == DEFAULT_RUNTIME:  # loaded as before runtimes existed: the model's default
        return mlflow.pyfunc.load_model(model_uri)
    try:
        if not takes_runtime(model_uri):
            raise NoOnnxModel(NO_ONNX)
        return mlflow.pyfunc.load_model(model_uri, model_config={"runtime": runtime})
    except NoOnnxModel as exc:
        raise NoOnnxModel(f"{_version_uri(model_uri)}: {exc.message}") from exc


NO_ONNX = ("holds no ONNX model (registered before the register stage exported one): use --runtime torch, or "
           "register the model again")


def takes_runtime(model_uri: str) -> bool:
    """Whether the model at `model_uri` was logged to take a runtime (its MLmodel's pyfunc `config`). MLflow ignores,
    with a warning, a model_config key the model was not logged with: a version from before the ONNX export would
    silently embed with PyTorch."""
    from mlflow.models import get_model_info

    pyfunc = get_model_info(model_uri).flavors.get("python_function", {})
    return "runtime" in (pyfunc.get("config") or {})


def _version_uri(model_uri: str) -> str:
    """models:/name@alias -> models:/name/<version>; any other URI as it is."""
    import re

    from mlflow import MlflowClient

    m = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", model_uri)
    if not m:
        return model_uri
    try:
        return f"models:/{m.group(1)}/{MlflowClient().get_model_version_by_alias(m.group(1), m.group(2)).version}"
    except MlflowException:  # the alias moved off meanwhile: the URI as given still names what was loaded
        return model_uri
