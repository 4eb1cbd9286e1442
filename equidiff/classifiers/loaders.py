"""Classifiers from local checkpoints, each wrapped in ``Classifier`` with its input contract.

Nothing here downloads: weights are read from local files with ``safe_torch_load`` (no pickled code
runs) and loaded strictly, so a wrong architecture, class count or key prefix is an error that lists
the keys that do not match, never a half-initialised network.

* ``load_robustness``: MadryLab robustness checkpoints (or files converted from them). Their
  ``AttackerModel`` clamps its input to [0, 1] and normalises it inside the model
  (``InputNormalize``); here the clamp and the normaliser's mean/std move to the wrapper.
* ``load_torchvision``: a torchvision architecture with local weights (a plain state dict or a
  Lightning checkpoint), ImageNet normalisation.
* ``load_small_net``: the in-package ``SmallCNN`` / ``MLP``, trained directly on [-1, 1] data.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from equidiff.classifiers.nets import MLP, SmallCNN
from equidiff.classifiers.safe_load import CONVERT_IN_PLACE, safe_torch_load
from equidiff.classifiers.wrapper import Classifier
from equidiff.errors import ConfigError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROBUSTNESS_DATASETS = {
    "cifar10": {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "image_size": 32, "num_classes": 10},
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224, "num_classes": 1000},
}
ROBUSTNESS_ZOO = "https://github.com/MadryLab/robustness#pretrained-models"
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


# ---------------------------------------------------------------- helpers
def _require_file(path: str | os.PathLike, how_to_get: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"classifier weights not found: {path}. {how_to_get}")
    return path


def checkpoint_state_dict(obj, source: str = "checkpoint") -> dict:
    """The state dict inside a loaded checkpoint: under ``model``, ``state_dict`` or ``model_state_dict``
    (robustness, Lightning, common training scripts), the dict itself if it holds only tensors, or the
    ``state_dict()`` of a pickled module."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key].state_dict()
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        found = list(obj)[:8]
    else:
        found = type(obj).__name__
    raise ConfigError(f"{source} holds no state dict (looked for a dict of tensors or one under "
                      f"{', '.join(_STATE_DICT_KEYS)}); found {found}")


def _detect_prefix(keys: Iterable[str], expected: list[str]) -> str:
    """The prefix ``p`` such that the keys starting with ``p``, with ``p`` removed, are the network's keys."""
    keys, want = list(keys), set(expected)
    if set(keys) == want or not expected:
        return ""
    anchor = expected[0]
    found = {k[: len(k) - len(anchor)] for k in keys if k.endswith("." + anchor)}
    good = sorted(p for p in found if {k[len(p):] for k in keys if k.startswith(p)} == want)
    if len(good) > 1:
        raise ConfigError(f"the checkpoint holds the network under several prefixes {good}; choose one with "
                          f"strip_prefix=...")
    return good[0] if good else ""


def _strip(state: Mapping, prefix: str) -> dict:
    if not prefix:
        return dict(state)
    prefix = prefix if prefix.endswith(".") else prefix + "."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ConfigError(f"no checkpoint key starts with {prefix!r}; the keys start like {list(state)[:5]}")
    return out


def _load_strict(net: nn.Module, state: Mapping, source, what: str) -> None:
    """``net.load_state_dict(state)``, with an error naming a few keys that do not match."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(
            f"the weights in {source} do not fit {what}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}. Check the architecture, num_classes and "
            f"(for wrapped checkpoints) strip_prefix")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"the weights in {source} do not fit {what}: {e}") from e


def _infer_num_classes(state: Mapping) -> int | None:
    """Rows of the last 2-D ``*weight`` tensor: the classification head in every supported architecture."""
    heads = [v for k, v in state.items()
             if k.endswith("weight") and isinstance(v, torch.Tensor) and v.ndim == 2]
    return int(heads[-1].shape[0]) if heads else None


def _wrap(net: nn.Module, defaults: dict, overrides: dict) -> Classifier:
    return Classifier(net, **{**defaults, **overrides})


# ---------------------------------------------------------------- robustness
def robustness_cifar_archs() -> list[str]:
    """The architecture names ``robustness.cifar_models`` exposes (resnet50, resnet18, vgg16, ...)."""
    from robustness import cifar_models

    return sorted(n for n in dir(cifar_models) if n.islower() and n != "test"
                  and inspect.isfunction(getattr(cifar_models, n)))


def _robustness_arch(arch: str, dataset: str, num_classes: int) -> nn.Module:
    if dataset == "cifar10":
        from robustness import cifar_models

        if arch.lower() not in robustness_cifar_archs():
            raise ConfigError(f"unknown robustness CIFAR architecture {arch!r}; choose one of "
                              f"{robustness_cifar_archs()}")
        return getattr(cifar_models, arch.lower())(num_classes=num_classes)
    return _torchvision_arch(arch, num_classes)  # robustness' ImageNet models use torchvision's layout


def load_robustness(path: str | os.PathLike, *, arch: str = "resnet50", dataset: str = "cifar10",
                    num_classes: int | None = None, clamp: bool = True, **wrapper_kwargs) -> Classifier:
    """A MadryLab robustness checkpoint as a ``Classifier`` taking [-1, 1] images.

    Reads ``{"model": state_dict, ...}`` (also ``state_dict``, or a flat dict as written by
    ``equidiff.classifiers.convert``), with or without the ``module.`` prefix. The network gets the
    ``model.*`` weights; the ``normalizer.new_mean/new_std`` buffers become the wrapper's mean/std, and
    its input range is [0, 1], clamped, as in ``AttackerModel``'s ``InputNormalize``
    (``(clamp(x, 0, 1) - mean) / std``). ``attacker.*`` keys are copies and are ignored.

    Args:
        path: the checkpoint (``.pt``/``.ckpt`` safe-loaded, or ``.safetensors``).
        arch: architecture name: from ``robustness.cifar_models`` for ``dataset="cifar10"`` (see
            ``robustness_cifar_archs()``), a torchvision name for ``dataset="imagenet"``.
        dataset: "cifar10" (32x32) or "imagenet" (224x224): the architecture family, input size and the
            fallback normalisation.
        num_classes: number of logits; None reads it from the head's weight.
        clamp: clamp the [0, 1]-mapped input to [0, 1] as robustness does (default). ``False`` feeds
            values outside the range through unchanged: other logits there, and a classifier
            gradient on every pixel of a noisy x_t (the clamp's gradient is zero outside the range).
        **wrapper_kwargs: override ``Classifier`` arguments (``resize``, ``class_names``, ...).
    """
    if dataset not in ROBUSTNESS_DATASETS:
        raise ConfigError(f"unknown robustness dataset {dataset!r}; choose one of "
                          f"{list(ROBUSTNESS_DATASETS)}")
    info = ROBUSTNESS_DATASETS[dataset]
    path = _require_file(path, f"Download the checkpoint from the MadryLab robustness model zoo "
                               f"({ROBUSTNESS_ZOO}) to this path and convert it once in place (its files are "
                               f"dill pickles): {CONVERT_IN_PLACE.format(path=Path(path).expanduser())}")
    state = checkpoint_state_dict(safe_torch_load(path), str(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not net_state:  # a bare architecture state dict
        net_state = {k: v for k, v in state.items() if not k.startswith(("normalizer.", "attacker."))}
    mean, std = state.get("normalizer.new_mean"), state.get("normalizer.new_std")
    if mean is None or std is None:
        warnings.warn(f"{path} has no normalizer.new_mean/new_std; using the standard {dataset} "
                      f"normalisation {info['mean']} / {info['std']}", stacklevel=2)
        mean, std = info["mean"], info["std"]
    else:
        mean, std = mean.flatten().tolist(), std.flatten().tolist()
    num_classes = num_classes or _infer_num_classes(net_state) or info["num_classes"]
    net = _robustness_arch(arch, dataset, num_classes)
    _load_strict(net, net_state, path, f"robustness {dataset} {arch} with {num_classes} classes")
    return _wrap(net, {"input_range": (0.0, 1.0), "clamp": clamp, "mean": mean, "std": std, "channels": 3,
                       "image_size": info["image_size"], "num_classes": num_classes}, wrapper_kwargs)


# ---------------------------------------------------------------- torchvision
def _torchvision_arch(name: str, num_classes: int, **kwargs) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except ValueError as e:
        names = torchvision.models.list_models(module=torchvision.models)
        raise ConfigError(f"unknown torchvision classification model {name!r} ({e}); choose one of "
                          f"{names}") from e


def load_weights(net: nn.Module, weights_path, strip_prefix: str | None, what: str, how_to_get: str) -> None:
    """Load a state dict, Lightning checkpoint or ``.safetensors`` file into ``net`` (safely, strictly), with
    the key prefix detected (``strip_prefix=None``) or given; a missing file is an error saying ``how_to_get``."""
    path = _require_file(weights_path, how_to_get)
    state = checkpoint_state_dict(safe_torch_load(path), str(path))
    prefix = _detect_prefix(state, list(net.state_dict())) if strip_prefix is None else strip_prefix
    _load_strict(net, _strip(state, prefix), path, what)


def load_torchvision(name: str, *, weights_path: str | os.PathLike | None = None, num_classes: int = 1000,
                     image_size=224, strip_prefix: str | None = None, net_kwargs: dict | None = None,
                     **wrapper_kwargs) -> Classifier:
    """A torchvision classification architecture with local weights, as a ``Classifier``.

    Args:
        name: a ``torchvision.models`` name (``resnet50``, ``vit_b_16``, ...); built with ``weights=None``.
        weights_path: a state dict (``.pth``/``.pt``, or ``.safetensors``) or a Lightning checkpoint with
            the weights under ``state_dict``. None keeps the random initialisation (tests, training from
            scratch); nothing is ever downloaded.
        num_classes: logits of the head.
        image_size: the size the weights were trained at (checked, or resized to with ``resize=True``).
        strip_prefix: prefix of the network's keys in the checkpoint (``"net."`` in a LightningModule
            holding it as ``self.net``); None detects it, "" uses the keys as they are.
        net_kwargs: further arguments of the torchvision constructor (e.g. ``aux_logits``).
        **wrapper_kwargs: override ``Classifier`` arguments (``resize``, ``class_names``, ...).
    """
    net = _torchvision_arch(name, num_classes, **(net_kwargs or {}))
    if weights_path is not None:
        load_weights(net, weights_path, strip_prefix, f"torchvision {name} with {num_classes} classes", (
            f"On a machine with internet, list the official weights with "
            f"torchvision.models.get_model_weights({name!r}) (each member's .url), download the .pth file "
            f"and copy it here."))
    return _wrap(net, {"input_range": (0.0, 1.0), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channels": 3,
                       "image_size": image_size, "num_classes": num_classes}, wrapper_kwargs)


# ---------------------------------------------------------------- small nets
def load_small_net(kind: str = "cnn", weights_path: str | os.PathLike | None = None, *, image_size=None,
                   strip_prefix: str | None = None, class_names=None, dtype: str | None = None,
                   channels_last: bool = False, compile=False, **net_kwargs) -> Classifier:
    """The in-package ``SmallCNN`` ("cnn") or ``MLP`` ("mlp"), on [-1, 1] inputs without normalisation.

    ``net_kwargs`` go to the network (``in_channels``, ``num_classes``, ``width`` / ``in_features``,
    ``hidden``, ``depth``). ``weights_path``: a state dict or Lightning checkpoint written by training
    it (None: random initialisation). ``dtype``, ``channels_last``, ``compile``: see ``Classifier``.
    """
    nets = {"cnn": SmallCNN, "mlp": MLP}
    if kind not in nets:
        raise ConfigError(f"unknown small net kind {kind!r}; choose one of {list(nets)}")
    net = nets[kind](**net_kwargs)
    if weights_path is not None:
        load_weights(net, weights_path, strip_prefix, f"{type(net).__name__}({net_kwargs})",
                     "Train it first (the small nets are trained in-package on the embedded data) and point "
                     "weights_path at the checkpoint.")
    channels = net.features[0].in_channels if kind == "cnn" else None
    num_classes = (net.head if kind == "cnn" else net.layers[-1]).out_features
    return Classifier(net, input_range=(-1.0, 1.0), channels=channels, image_size=image_size,
                      num_classes=num_classes, class_names=class_names, dtype=dtype, channels_last=channels_last,
                      compile=compile)
