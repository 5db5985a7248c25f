"""Where F's initial weights come from: `model.pretrained_path` (a local state_dict) or `model.pretrained:
imagenet` (torchvision's ImageNet weights of the backbone, the paper's initialisation).

ImageNet weights are torchvision's own file (its weights API names the URL; the name carries the first hex
digits of the file's sha256, as torch.hub checks them). They are downloaded once into the torch cache
(`torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME) and checked against that hash; a machine without the
network gets an error naming the file and the folder to put it in. `resolve` turns either setting into an
absolute `pretrained_path` before any worker starts (workers do not share the driver's working folder);
the trained weights then hold everything, so a registered model never needs the file again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tasks.config import Params
from tasks.infra.tracking import file_hash

log = logging.getLogger(__name__)

# One file, one try, checked by the sha256 prefix torchvision publishes. Not tasks.datasets.acquire.fetch (md5,
# retries for dataset archives): importing tasks.datasets would make every dataset adapter a dep of train.
DOWNLOAD_TIMEOUT_S = 20  # per connection attempt and read: offline, fail in seconds rather than hang


class PretrainedWeightsError(RuntimeError):
    """The initial weights named in params.yaml cannot be had; the message says which file and where."""


def imagenet_url(backbone: str) -> str:
    """torchvision's ImageNet-1k (V1, the weights of He et al.) file of `backbone`."""
    from torchvision.models import get_model_weights

    return str(get_model_weights(backbone)["IMAGENET1K_V1"].url)


def cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_file(backbone: str, url: str | None = None) -> Path:
    """Where the torch cache keeps `backbone`'s ImageNet weights (downloaded from `url`)."""
    return cache_dir() / Path(urllib.parse.urlparse(url or imagenet_url(backbone)).path).name


def _hash_prefix(name: str) -> str | None:
    """The sha256 prefix in a torch.hub file name (`resnet50-0676ba61.pth`), None if it has none."""
    match = re.search(r"-([0-9a-f]{6,})\.", name)
    return match.group(1) if match else None


def _check(path: Path, url: str) -> Path:
    prefix = _hash_prefix(path.name)
    if prefix is not None and not file_hash(path).startswith(prefix):
        raise PretrainedWeightsError(f"{path}: its sha256 does not start with {prefix}, as {url} promises: a "
                                     f"damaged or different file; delete it to download it again")
    return path


def fetch_imagenet(backbone: str, url: str | None = None) -> Path:
    """The local file of `backbone`'s ImageNet weights: from the torch cache, else downloaded into it."""
    url = url or imagenet_url(backbone)
    target = imagenet_file(backbone, url)
    if target.is_file():
        return _check(target, url)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.pretrained = imagenet: downloading %s into %s", url, target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        _check(tmp, url)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise PretrainedWeightsError(
            f"model.pretrained = imagenet: {target.name} is not in {target.parent} and could not be downloaded "
            f"from {url} ({getattr(exc, 'reason', exc)}); put that file in {target.parent} (or set TORCH_HOME), "
            f"or set model.pretrained_path to a local copy") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(params: Params) -> Params:
    """`params` with the initial weights as an absolute, existing `model.pretrained_path` (and
    `model.pretrained` cleared), or unchanged when training starts from scratch."""
    model = params.model
    if model.pretrained == "imagenet":
        file = fetch_imagenet(model.backbone)
    elif model.pretrained_path is not None:
        file = Path(model.pretrained_path).resolve()
        if not file.is_file():
            raise PretrainedWeightsError(f"params.yaml model.pretrained_path = {model.pretrained_path!r}: no such "
                                         f"file ({file})")
    else:
        return params
    return dataclasses.replace(params, model=dataclasses.replace(model, pretrained=None, pretrained_path=str(file)))


def without_initial_weights(params: Params) -> Params:
    """For loading trained weights: they hold every parameter, so no initial-weights file is read."""
    return dataclasses.replace(params, model=dataclasses.replace(params.model, pretrained=None, pretrained_path=None))
