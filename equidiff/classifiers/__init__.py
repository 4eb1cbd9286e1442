"""Classifiers behind one input contract: the ``Classifier`` wrapper, loaders, safe checkpoint loading."""

from equidiff.classifiers.loaders import (
    checkpoint_state_dict,
    load_robustness,
    load_small_net,
    load_torchvision,
    robustness_cifar_archs,
)
from equidiff.classifiers.nets import MLP, SmallCNN
from equidiff.classifiers.safe_load import UnsafeCheckpointError, safe_torch_load
from equidiff.classifiers.wrapper import Classifier

__all__ = [
    "MLP",
    "Classifier",
    "SmallCNN",
    "UnsafeCheckpointError",
    "checkpoint_state_dict",
    "load_robustness",
    "load_small_net",
    "load_torchvision",
    "robustness_cifar_archs",
    "safe_torch_load",
]
