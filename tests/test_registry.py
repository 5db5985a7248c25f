"""The registered model and `rain promote`, against the real sqlite registry of a trained micro project.

Registration: lineage tags agree with dvc.lock and the files, nothing in the model is pickled, a fresh
process loads it by alias with pickle refused and returns the training code's features, normalised.
Promotion: the gate accepts a first champion and an equal or better version, refuses a worse one or
one measured differently, a forced promotion records its reason; two processes promoting at once
leave one champion and respect the gate, with the locks serialising their read-check-write.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tasks.infra.tracking import FIGURES_UNIT, PERCENT
from tasks.registry.promote import (
    LEGACY_FIGURES,
    LOCK_SUFFIX,
    RANK1,
    LockTimeout,
    PromoteRequest,
    PromotionError,
    break_lock,
    file_lock,
    gate,
    host_lock_path,
    promote,
    registry_lock,
    version_tags,
)
from tests.trained_project import MODEL, tracking

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


@pytest.fixture
def client(project: Path, mlflow_global: None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking(project))


def _lock_stage_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_registered_version_carries_lineage_and_the_candidate_alias(project: Path, client: Any) -> None:
    from tasks.infra.tracking import file_hash
    from tasks.register import eval_set_hash

    registration = json.loads((project / "reports/synthetic/registration.json").read_text())
    version = client.get_model_version(MODEL, str(registration["version"]))
    tags = version.tags
    metrics = json.loads((project / "reports/synthetic/metrics.json").read_text())
    # Lineage: the hashes DVC recorded for the data, the MLR manifest and the weights of this run.
    assert tags["dvc_data_md5"] == _lock_stage_md5(project, "download", "data/raw/synthetic")
    assert tags["dvc_mlr_manifest_md5"] == _lock_stage_md5(project, "synthesize",
                                                           "data/manifests/synthetic-mlr.parquet")
    assert tags["dvc_models_md5"] == _lock_stage_md5(project, "train", "models/synthetic")
    assert len(tags["dvc_params_sha256"]) == 64
    assert tags["mlr_manifest_sha256"] == file_hash(project / "data/manifests/synthetic-mlr.parquet")
    assert tags["params_yaml_sha256"] == file_hash(project / "params.yaml")
    assert tags["weights_sha256"] == file_hash(project / "models/synthetic/trial-0.safetensors")
    assert tags["eval_set"] == eval_set_hash(project / "data/manifests/synthetic.parquet",
                                             project / "data/manifests/synthetic-mlr.parquet")
    assert tags["dataset"] == "synthetic" and "train_rates=[2, 3, 4]" in tags["protocol"]
    assert "distance=cosine" in tags["protocol"] and "gallery_draws=1" in tags["protocol"]
    lr = metrics["rows"]["lr"]  # the LR queries' figures, named for them, in percent as the tag says
    assert tags[FIGURES_UNIT] == PERCENT
    for key in ("rank1", "rank1_std", "rank5", "rank10", "rank20", "mAP"):
        assert float(tags[f"lr_{key}"]) == pytest.approx(100 * lr[key], abs=1e-4)
    assert not {"rank1", "mAP", "params_sha256", "data_hash", "params_hash"} & set(tags)  # the older names
    # One name per hash across run and version: the training run carries the same manifest hash.
    run_tags = client.get_run(version.run_id).data.tags
    assert run_tags["mlr_manifest_sha256"] == tags["mlr_manifest_sha256"]
    assert len(run_tags["params_values_sha256"]) == 64
    assert tags["git_commit"]  # "unknown" here: the micro project is not a git repository
    assert str(client.get_registered_model(MODEL).aliases["candidate"]) == str(registration["version"])


def test_the_logged_model_shows_the_runs_final_figures_not_its_first_steps(project: Path, client: Any) -> None:
    # MLflow links to a logged model the run's metrics at the step it is logged at (0 by default: the first
    # training step's losses); the register stage links the latest value of each figure instead.
    version = client.get_model_version(MODEL, "1")
    run = client.get_run(version.run_id)
    assert version.source.startswith("models:/m-")  # the LoggedModel (the sqlite store leaves `model_id` unset)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    linked = logged.metrics
    # Named for its model, data and trial, and described by its figures first (not "model", no description).
    assert logged.name == f"{MODEL}-synthetic-trial{version.tags['trial']}"
    assert logged.tags["mlflow.note.content"].startswith("**LR queries: rank-1 ")
    shown = {m.key: m for m in linked}
    figures = {k: v for k, v in run.data.metrics.items() if not k.startswith(("cmc/", "system/"))}
    assert {"train/L_cls", "epoch/L_cls", "eval/lr_rank1", "eval_std/lr_rank1"} <= set(shown)
    assert set(shown) == set(figures) and len(linked) == len(figures)  # one entry each: none from step 0 besides
    evaluation = [m.key.startswith(("eval/", "eval_std/")) for m in linked]
    assert evaluation == sorted(evaluation, reverse=True) and evaluation[0]  # the evaluation's figures first
    for key, value in figures.items():
        assert shown[key].value == pytest.approx(value), key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/L_cls")]
    assert shown["train/L_cls"].step == max(steps) > 0  # the last training step, as the run shows it
    assert len(steps) == len(set(steps))  # linking added no point to the run's own history


def test_the_model_holds_no_pickle_and_its_weights_are_safetensors(project: Path, mlflow_global: None) -> None:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1"))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".joblib"))], files
    assert any(f.endswith(".safetensors") for f in files), files
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in pyfunc and "python_model" not in pyfunc  # from code, not cloudpickle
    signature = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert json.loads(signature["inputs"])[0]["name"] == "image"
    assert (local / "input_example.json").exists()


# Loads the model by alias in a fresh interpreter with pickle refused twice over: MLflow's own switch,
# and an audit hook that fails on any class an unpickler would resolve.
FRESH_LOAD = r"""
import sys
def no_pickle(event, args):
    if event == "pickle.find_class":
        raise RuntimeError(f"unpickling {args} while loading the model")
sys.addaudithook(no_pickle)
import numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
paths = sys.argv[3:]
out = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in paths]}))
np.save(sys.argv[2], out, allow_pickle=False)
"""


def test_a_fresh_process_loads_by_alias_and_matches_the_training_features(project: Path, client: Any,
                                                                           tmp_path: Path) -> None:
    import torch

    from tasks.config import load_params
    from tasks.images.loaders import read_rows
    from tasks.registry.embed import embed_paths, load_model

    params = load_params(project / "params.yaml")
    rows = read_rows(str(project / params.mlr_manifest_path()), 0, ["query", "gallery"])
    paths = [str(project / r["path"]) for r in rows[:: max(1, len(rows) // 8)]]  # LR, HR, unseen-rate images
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking(project), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    out = tmp_path / "served.npy"
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, f"models:/{MODEL}@candidate", str(out), *paths],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(out)

    summary = json.loads((project / "models/synthetic/train.json").read_text())["trials"]["0"]
    model = load_model(project / "models/synthetic" / summary["weights"], params.model, summary["num_classes"])
    expected = torch.nn.functional.normalize(torch.from_numpy(
        embed_paths(model, paths, (params.train.height, params.train.width), flip=params.evaluate.flip)), dim=1)
    assert served.shape == tuple(expected.shape) and served.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-5)


def own_report_dir(params: Any, tmp_path: Path) -> Path:
    """A copy of the shared project's report folder, for a test's own run of the register stage to write its record
    (registration.json) in: the project's stays as dvc.lock has it, whichever test reads it next."""
    import shutil

    return Path(shutil.copytree(params.report_dir(), tmp_path / "reports"))


def test_each_new_version_gets_the_candidate_alias(project: Path, client: Any, mlflow_global: None,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import dataclasses

    from tasks import register
    from tasks.config import load_params

    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    # Other settings, same weights: another model (the same one again reuses its version, issue 28 item 4).
    params = dataclasses.replace(params, serve=dataclasses.replace(params.serve,
                                                                   max_images=params.serve.max_images + 1))
    before = client.get_registered_model(MODEL).aliases.get("champion")
    reg = register.run(params, params.model_dir(), own_report_dir(params, tmp_path), params.mlr_manifest_path(),
                       Path("params.yaml"))
    aliases = client.get_registered_model(MODEL).aliases
    assert str(aliases["candidate"]) == str(reg["version"]) and int(reg["version"]) >= 2
    assert aliases.get("champion") == before  # registering never touches the champion
    assert client.get_model_version(MODEL, str(reg["version"])).tags["eval_set"] == reg["tags"]["eval_set"]


def test_the_register_stage_cannot_set_champion(project: Path, client: Any, mlflow_global: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # params.yaml cannot say `register.alias: champion` (tests/test_config.py); a config that skipped that
    # check (built by hand) is refused by the stage itself, before anything is logged or registered.
    import dataclasses

    from tasks import register
    from tasks.config import load_params

    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    sneaky = dataclasses.replace(params.register)
    object.__setattr__(sneaky, "alias", "champion")
    before = client.get_registered_model(MODEL).aliases.get("champion")
    versions = len(client.search_model_versions(f"name='{MODEL}'"))
    with pytest.raises(ValueError, match=r"alias 'champion' is not set by the register stage.*rain promote"):
        register.run(dataclasses.replace(params, register=sneaky), params.model_dir(), params.report_dir(),
                     params.mlr_manifest_path(), Path("params.yaml"))
    assert client.get_registered_model(MODEL).aliases.get("champion") == before
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions


def test_a_model_trained_from_a_pretrained_file_loads_after_the_file_is_gone(
        project: Path, client: Any, mlflow_global: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The pretrained file only initialises training: the registered weights hold every parameter, so a
    # served or downloaded model must not need the file from the training machine.
    import dataclasses

    import mlflow
    import torch
    import torchvision

    from tasks import register
    from tasks.config import load_params
    from tasks.images.loaders import read_rows
    from tasks.infra.tracking import file_hash

    pretrained = tmp_path / "imagenet" / "resnet18.pth"
    pretrained.parent.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), pretrained)
    sha = file_hash(pretrained)
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, pretrained_path=str(pretrained)))
    reg = register.run(params, params.model_dir(), own_report_dir(params, tmp_path), params.mlr_manifest_path(),
                       Path("params.yaml"))
    pretrained.unlink()
    pretrained.parent.rmdir()

    uri = f"models:/{MODEL}/{reg['version']}"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    settings = json.loads(next(local.rglob("model.json")).read_text())
    assert settings["model"]["pretrained_path"] is None  # what the load reads: nothing outside the model
    assert settings["pretrained"] == {"file": "resnet18.pth", "sha256": sha}  # provenance, not read at load
    import hashlib  # the version's settings_sha256 (what register matches a re-run on) is its config artifact's

    assert reg["tags"]["settings_sha256"] == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    assert reg["tags"]["pretrained_sha256"] == sha == client.get_model_version(MODEL, reg["version"]).tags[
        "pretrained_sha256"]

    rows = read_rows(str(project / params.mlr_manifest_path()), 0, ["query"])[:3]
    paths = [str(project / r["path"]) for r in rows]
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking(project), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    out = tmp_path / "served.npy"
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, uri, str(out), *paths], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(out)
    assert served.shape[0] == len(paths) and np.isfinite(served).all()
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The gate, on versions of a model of their own (same artifacts as version 1, tags set per test).


def _versions(client: Any, rank1s: list[float]) -> tuple[str, list[str]]:
    """A fresh registered model with one version per rank-1 (tags copied from rain-reid v1)."""
    base = client.get_model_version(MODEL, "1")
    name = f"gate-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    versions = []
    for r in rank1s:
        tags = dict(base.tags) | {RANK1: f"{100 * r:.4f}"}  # v1 tags its figures in percent
        mv = client.create_model_version(name, base.source, run_id=base.run_id, tags=tags)
        versions.append(str(mv.version))
    return name, versions


def _promote(project: Path, client: Any, name: str, version: str, reason: str | None = None) -> Any:
    request = PromoteRequest(model_name=name, version=version, force_reason=reason, lock_timeout_s=30)
    return promote(client, request, host_lock_path(tracking(project), project))


def test_gate_accepts_a_first_champion_and_at_least_as_good_versions_and_refuses_worse(project: Path,
                                                                                       client: Any) -> None:
    name, (v1, v2, v3, v4) = _versions(client, [0.50, 0.40, 0.50, 0.70])
    first = _promote(project, client, name, v1)
    assert first.accepted and first.previous is None
    worse = _promote(project, client, name, v2)
    assert not worse.accepted and "40.00% < champion's 50.00%" in worse.reason
    assert str(client.get_registered_model(name).aliases["champion"]) == v1
    assert _promote(project, client, name, v3).accepted  # equal rank-1 is enough
    better = _promote(project, client, name, v4)
    assert better.accepted and better.previous == v3
    tags = client.get_model_version(name, v4).tags
    assert tags["promoted_over"] == v3 and "promotion_force_reason" not in tags
    assert client.get_registered_model(name).aliases == {"champion": int(v4)}
    assert not client.search_registered_models(f"name='{name}{LOCK_SUFFIX}'")  # lock released


def test_gate_refuses_a_version_measured_differently_unless_forced_with_a_reason(project: Path,
                                                                                 client: Any) -> None:
    from flows.cli import app

    name, (v1, v2) = _versions(client, [0.30, 0.90])
    client.set_model_version_tag(name, v2, "protocol", "MLR train_rates=[2] something else")
    assert _promote(project, client, name, v1).accepted

    runner = CliRunner()
    cli = ["promote", "--project", str(project), "--model", name]
    refused = runner.invoke(app, [*cli, v2])
    assert refused.exit_code == 1 and "measured differently" in refused.output and "protocol" in refused.output
    no_reason = runner.invoke(app, [*cli, v2, "--force"])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    forced = runner.invoke(app, [*cli, v2, "--force", "--reason", "new protocol adopted by the team"])
    assert forced.exit_code == 0, forced.output
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion_force_reason"] == "new protocol adopted by the team"
    assert "measured differently" in tags["promotion_gate_verdict"]
    assert str(client.get_registered_model(name).aliases["champion"]) == v2

    listing = runner.invoke(app, [*cli, "--list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    lines = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 3}
    assert "champion" in lines[v2] and "30.0" in lines[v1] and "90.0" in lines[v2]
    assert "new protocol adopted" in listing.output and "something else" in listing.output


def test_a_version_tagged_by_the_older_register_stage_is_listed_and_gated(project: Path, client: Any) -> None:
    from flows.cli import app

    name, (v1, v2) = _versions(client, [0.50, 0.40])
    for new, old in LEGACY_FIGURES.items():  # v1 as the register stage tagged it before the LR names
        value = client.get_model_version(name, v1).tags.get(new)
        if value is not None:
            client.set_model_version_tag(name, v1, old, value)
            client.delete_model_version_tag(name, v1, new)
    assert "lr_rank1" not in client.get_model_version(name, v1).tags
    assert _promote(project, client, name, v1).accepted  # a first champion with the older names
    worse = _promote(project, client, name, v2)
    assert not worse.accepted and "40.00% < champion's 50.00%" in worse.reason
    listing = CliRunner().invoke(app, ["promote", "--project", str(project), "--model", name, "--list"],
                                 env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    lines = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 3}
    assert "50.0" in lines[v1] and "40.0" in lines[v2]


def test_registry_text_with_rich_markup_is_listed_as_written(project: Path, client: Any) -> None:
    # A reason or tag is anyone's free text: `[/bold]` once made rich raise MarkupError on every --list.
    from flows.cli import app

    name, (v1, v2) = _versions(client, [0.30, 0.90])
    client.set_model_version_tag(name, v2, "protocol", "[red]new[/red] protocol [link=x]")
    runner = CliRunner()
    cli = ["promote", "--project", str(project), "--model", name]
    assert runner.invoke(app, [*cli, v1]).exit_code == 0
    forced = runner.invoke(app, [*cli, v2, "--force", "--reason", "[/bold] oops"])
    assert forced.exit_code == 0, forced.output
    listing = runner.invoke(app, [*cli, "--list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert "[/bold] oops" in listing.output and "[red]new[/red] protocol [link=x]" in listing.output


def test_gate_on_tags() -> None:
    tags = {"dataset": "d", "protocol": "p", "eval_set": "e", "lr_rank1": "0.5"}
    assert gate(tags, None)[0]
    assert gate(tags, tags | {"lr_rank1": "0.5"})[0]
    assert not gate(tags, tags | {"lr_rank1": "0.51"})[0]
    assert not gate(tags | {"lr_rank1": "0.9"}, tags | {"eval_set": "other"})[0]
    assert not gate({"lr_rank1": "0.9"}, None)[0]  # unknown provenance never becomes champion unforced


def test_gate_reads_a_version_registered_under_the_older_figure_names() -> None:
    # The register stage tagged `rank1` (`mAP`, ...) before the figures were named for the LR queries: a
    # champion registered then is still compared, its `rank1` read as `lr_rank1`.
    provenance = {"dataset": "d", "protocol": "p", "eval_set": "e"}
    old = provenance | {"rank1": "0.5", "mAP": "0.3"}
    assert LEGACY_FIGURES["lr_rank1"] == "rank1" and LEGACY_FIGURES["lr_mAP"] == "mAP"
    passes, why = gate(provenance | {"lr_rank1": "0.4"}, old)
    assert not passes and "40.00% < champion's 50.00%" in why
    assert gate(provenance | {"lr_rank1": "0.6"}, old)[0]
    assert gate(old, provenance | {"lr_rank1": "0.45"})[0]  # an old-style candidate too
    assert not gate(old | {"lr_rank1": "0.4"}, provenance | {"lr_rank1": "0.45"})[0]  # the current name wins
    passes, why = gate(provenance | {"lr_rank1": "0.6"}, provenance)  # a champion with neither name
    assert not passes and "champion lacks the tag 'lr_rank1'" in why and "'rank1'" in why


def test_gate_compares_a_fraction_era_champion_with_a_percent_candidate_in_one_unit() -> None:
    # The register stage tagged fractions before it tagged percent (FIGURES_UNIT): a champion registered then is
    # read x 100, so a better candidate in percent is not refused as if 40.0 < 0.5, nor a worse one let through.
    provenance = {"dataset": "d", "protocol": "p", "eval_set": "e"}
    fractions = provenance | {"lr_rank1": "0.5", "lr_rank1_std": "0.02", "lr_mAP": "0.3"}
    percent = provenance | {FIGURES_UNIT: PERCENT}
    passes, why = gate(percent | {"lr_rank1": "40.0"}, fractions)
    assert not passes and "40.00% < champion's 50.00%" in why
    assert gate(percent | {"lr_rank1": "50.0"}, fractions)[0]
    assert gate(fractions, percent | {"lr_rank1": "49.9"})[0]  # and the other way round
    read = version_tags(fractions)
    assert (read["lr_rank1"], read["lr_rank1_std"], read["lr_mAP"]) == ("50.0000", "2.0000", "30.0000")
    assert version_tags(read) == read  # percent is read as it is
    assert version_tags(fractions | {"lr_mAP": "edited"})["lr_mAP"] == "edited"  # a hand-edited tag is left alone


def test_promote_refuses_an_unknown_version_or_a_blank_force_reason(project: Path, client: Any) -> None:
    with pytest.raises(PromotionError, match="no version"):
        _promote(project, client, MODEL, "999")
    with pytest.raises(ValueError, match="non-empty reason"):
        PromoteRequest(force_reason="  ")


# ----------------------------------------------------------------------------------------------------
# Races: two processes promote at once.

RACE_WORKER = r"""
import json, sys, time
from pathlib import Path
from mlflow import MlflowClient
from tasks.registry import promote as p

uri, name, version, host_lock, barrier, out = sys.argv[1:7]
events = []
real_gate, real_set = p.gate, MlflowClient.set_registered_model_alias

def slow_gate(candidate, champion):
    events.append(["read", time.time(), None if champion is None else champion.get("lr_rank1")])
    time.sleep(0.5)  # widen the window between reading the champion and moving the alias
    return real_gate(candidate, champion)

def timed_set(self, *args, **kwargs):
    result = real_set(self, *args, **kwargs)
    events.append(["write", time.time(), None])
    return result

p.gate, MlflowClient.set_registered_model_alias = slow_gate, timed_set
client = MlflowClient(uri)
client.get_registered_model(name)  # connect before the start line
Path(out + ".ready").touch()
while not Path(barrier).exists():
    time.sleep(0.005)
d = p.promote(client, p.PromoteRequest(model_name=name, version=version, lock_timeout_s=120), Path(host_lock))
events.append(["done", time.time(), None])
Path(out).write_text(json.dumps({"accepted": d.accepted, "version": d.version, "reason": d.reason,
                                 "events": events}))
"""


@pytest.mark.parametrize("hosts", ["same-host", "two-hosts"])
def test_two_racing_promotions_leave_one_champion_and_respect_the_gate(project: Path, client: Any,
                                                                       tmp_path: Path, hosts: str) -> None:
    """Both candidates beat the current champion; the worse one must not end up champion.

    `two-hosts` gives each process its own host lock file, as on two machines: only the registry lock
    (the atomically created lock model) keeps them apart.
    """
    name, (v0, low, high) = _versions(client, [0.20, 0.40, 0.60])
    assert _promote(project, client, name, v0).accepted
    uri = tracking(project)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    barrier = tmp_path / "go"
    procs, outs = [], []
    for i, version in enumerate((low, high)):
        lock = tmp_path / (f"host{i}.lock" if hosts == "two-hosts" else "shared.lock")
        out = tmp_path / f"worker{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", RACE_WORKER, uri, name, version, str(lock),
                                       str(barrier), str(out)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 180
        while not all(Path(str(o) + ".ready").exists() for o in outs):
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        barrier.touch()
        for p in procs:
            assert p.wait(timeout=180) == 0, p.communicate()[0][-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    low_res, high_res = (json.loads(o.read_text()) for o in outs)

    champions = [v for v in (v0, low, high) if "champion" in client.get_model_version(name, v).aliases]
    assert champions == [high], champions  # exactly one champion, and the better one
    assert high_res["accepted"]
    # Serialised: one read-check-write finished before the other read the champion.
    first, second = sorted((low_res, high_res), key=lambda r: r["events"][0][1])
    assert first["events"][-1][1] <= second["events"][0][1], (first["events"], second["events"])
    if first is high_res:  # the better one won the race: the worse one saw it and was refused
        assert not low_res["accepted"] and "< champion's 60.00%" in low_res["reason"]
    else:  # the worse one went first; the better one then replaced it
        assert low_res["accepted"] and second["events"][0][2] == "40.0000"
    assert not client.search_registered_models(f"name='{name}{LOCK_SUFFIX}'")


def test_registry_lock_excludes_a_second_holder_and_recovers_from_a_dead_one(client: Any) -> None:
    name = f"lock-{uuid.uuid4().hex[:8]}"
    with (registry_lock(client, name, timeout_s=5), pytest.raises(LockTimeout, match="promotion-lock"),
          registry_lock(client, name, timeout_s=0.5)):
        pass
    assert not client.search_registered_models(f"name='{name}{LOCK_SUFFIX}'")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.create_registered_model(name + LOCK_SUFFIX, tags={"token": "t", "host": socket.gethostname(),
                                                             "pid": str(dead.pid)})
    with registry_lock(client, name, timeout_s=5):  # its holder is gone: taken over
        pass

    client.create_registered_model(name + LOCK_SUFFIX, tags={"token": "t", "host": "elsewhere", "pid": "1"})
    with pytest.raises(LockTimeout, match="--break-lock"), registry_lock(client, name, timeout_s=0.3):
        pass
    assert break_lock(client, name) == {"token": "t", "host": "elsewhere", "pid": "1"}
    with registry_lock(client, name, timeout_s=1):
        pass


def test_host_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    lock = host_lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    assert lock == tmp_path / "mlflow.db.promote.lock"
    assert host_lock_path("http://tracking:5000", tmp_path) == tmp_path / ".cache" / "promote.lock"
    with file_lock(lock, timeout_s=1), pytest.raises(LockTimeout), file_lock(lock, timeout_s=0.2):
        pass
    with file_lock(lock, timeout_s=0.2):  # released
        pass


def test_promote_has_help() -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["promote", "--help"])
    assert result.exit_code == 0 and "--force" in result.output and "--list" in result.output


# ----------------------------------------------------------------------------------------------------
# A registry of its own (no trained project): versions carrying the register stage's gate tags.


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    """(client, project) of an empty sqlite registry in tmp_path; MLflow's process-wide URI put back after."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking(tmp_path))  # the CLI sets it: restored after the test
    (tmp_path / "artifacts").mkdir()
    return MlflowClient(tracking(tmp_path)), tmp_path


def _tagged_versions(client: Any, project: Path, rank1s: list[float]) -> tuple[str, list[str]]:
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    tags = {"dataset": "synthetic", "protocol": "p", "eval_set": "e"}
    versions = [str(client.create_model_version(name, (project / "artifacts").as_uri(),
                                                tags=tags | {RANK1: f"{100 * r:.4f}", FIGURES_UNIT: PERCENT}).version)
                for r in rank1s]
    return name, versions


def _listing(project: Path, name: str) -> dict[str, str]:
    from flows.cli import app

    result = CliRunner().invoke(app, ["promote", "--project", str(project), "--model", name, "--list"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}


def test_a_version_promoted_through_the_gate_after_a_forced_promotion_loses_the_old_reason(
        fresh: tuple[Any, Path]) -> None:
    client, project = fresh
    name, (v1, v2, v3) = _tagged_versions(client, project, [0.30, 0.20, 0.10])
    assert _promote(project, client, name, v1).accepted
    assert _promote(project, client, name, v2, reason="hotfix for the demo").forced
    assert _promote(project, client, name, v3, reason="rollback drill").forced
    assert "hotfix for the demo" in _listing(project, name)[v2]
    again = _promote(project, client, name, v2)  # 0.20 >= the champion's 0.10: through the gate
    assert again.accepted and not again.forced
    tags = client.get_model_version(name, v2).tags
    assert "promotion_force_reason" not in tags and "promotion_gate_verdict" not in tags, tags
    rows = _listing(project, name)
    assert "champion" in rows[v2] and "hotfix" not in rows[v2], rows[v2]
    assert "rollback drill" in rows[v3]  # v3's forced promotion stays on record


def test_control_characters_in_a_reason_are_escaped_by_the_listing(fresh: tuple[Any, Path]) -> None:
    from flows.cli import app

    client, project = fresh
    name, (v1, v2) = _tagged_versions(client, project, [0.30, 0.20])
    assert _promote(project, client, name, v1).accepted
    reason = "\x1b[2J\x1b[31mall clear\x1b[0m\u202e"  # clear the screen, red, bidi override
    forced = CliRunner().invoke(app, ["promote", "--project", str(project), "--model", name, v2, "--force",
                                      "--reason", reason])
    assert forced.exit_code == 0, forced.output
    assert client.get_model_version(name, v2).tags["promotion_force_reason"] == reason  # recorded as given
    result = CliRunner().invoke(app, ["promote", "--project", str(project), "--model", name, "--list"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "\\x1b[2J\\x1b[31mall clear\\x1b[0m\\u202e" in result.output, result.output


ROWS_MODEL = """
import mlflow.models
from mlflow.pyfunc import PythonModel


class Rows(PythonModel):
    def predict(self, context, model_input, params=None):
        return [len(model_input)]


mlflow.models.set_model(Rows())
"""


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it in the register stage runs (not even `except Exception`)."""


def test_register_after_a_kill_right_after_mlflow_created_the_version_reuses_it(
        fresh: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28, item 4: killed after `Created version 'N'` (registration.json and dvc.lock not written), the
    stage ran again under DVC and registered N+1 with the same weights_sha256 and MLflow run."""
    import dataclasses

    import mlflow

    from rain_model.metrics import METRIC_KEYS
    from tasks import register
    from tasks.infra.tracking import file_hash
    from tests.micro_project import micro_params

    client, root = fresh
    params = micro_params({"register": {"model_name": f"fresh-{uuid.uuid4().hex[:8]}"}})
    name = params.register.model_name
    run_id = client.create_run(client.create_experiment(f"e-{uuid.uuid4().hex[:8]}")).info.run_id
    client.log_metric(run_id, "epoch/L_tri", 0.3, step=1)
    model_dir, report_dir = root / "models", root / "reports"
    model_dir.mkdir()
    report_dir.mkdir()
    (model_dir / "weights.safetensors").write_bytes(b"the trained weights")
    (model_dir / "train.json").write_text(json.dumps(
        {"trials": {"0": {"weights": "weights.safetensors", "mlflow_run_id": run_id, "num_classes": 4}}}))
    figures = {k: 0.5 for k in METRIC_KEYS} | {"rank1_std": 0.01}
    (report_dir / "metrics.json").write_text(json.dumps({"rows": {"lr": figures}, "trials": 1, "gallery_draws": 10}))
    for file in ("hr.parquet", "mlr.parquet", "params.yaml"):
        (root / file).write_text(file)
    code = root / "rows_model.py"
    code.write_text(ROWS_MODEL)
    logged: list[Path] = []

    def log_model(params: Any, weights: Path, settings: Any, step: int = 0,
                  name: str = "model", onnx: Path | None = None) -> Any:  # the pyfunc, in miniature
        logged.append(weights)
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), step=step)

    def checked_onnx_export(params: Any, weights: Path, num_classes: int, folder: Path) -> Any:  # bytes, no network
        return SimpleNamespace(folder=folder, max_abs_diff=0.0, opset=20)

    def stage() -> dict[str, Any]:
        return register.run(params, model_dir, report_dir, root / "mlr.parquet", root / "params.yaml",
                            manifest_path=root / "hr.parquet", lock_file=root / "dvc.lock")  # no lock: stale

    monkeypatch.setattr(register, "log_model", log_model)
    monkeypatch.setattr(register, "checked_onnx_export", checked_onnx_export)
    real_register = mlflow.register_model

    def register_then_die(*args: Any, **kwargs: Any) -> Any:
        real_register(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(mlflow, "register_model", register_then_die)
    with pytest.raises(Killed):
        stage()
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [1]
    assert not (report_dir / "registration.json").exists()

    monkeypatch.setattr(mlflow, "register_model", real_register)
    registration = stage()  # DVC runs the stage again: dvc.lock never recorded the killed run
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == [1], "one set of weights, two versions"
    assert registration["version"] == 1 and client.get_registered_model(name).aliases == {"candidate": 1}
    assert versions[0].tags["weights_sha256"] == file_hash(model_dir / "weights.safetensors")
    assert versions[0].tags["mlflow_run_id"] == run_id
    assert len(logged) == 1  # the model was not logged a second time either
    assert json.loads((report_dir / "registration.json").read_text())["version"] == 1

    (model_dir / "weights.safetensors").write_bytes(b"other weights")  # retrained: a new version, as before
    assert stage()["version"] == 2 and len(logged) == 2
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, flip=True))
    assert stage()["version"] == 3 and len(logged) == 3  # same weights, other settings: another model
