"""Fine-tuning starts (seed 001, learning from counterfactuals): an ImageNet-pretrained torchvision network from
local weights with a fresh head for the task's classes (WaterBirds: 2, SpuCoAnimals: 4)."""

from __future__ import annotations

import os

import torch
from torch import nn

from equidiff.classifiers.loaders import load_torchvision
from equidiff.errors import ConfigError


def torchvision_finetune(name: str, weights_path: str | os.PathLike | None, num_classes: int, *,
                         pretrained_classes: int = 1000, head: str = "fc", seed: int = 0, **kwargs):
    """``load_torchvision(name, weights_path)`` with its ``head`` (a ``nn.Linear``, "fc" for ResNets) replaced by a
    new ``nn.Linear(in_features, num_classes)`` initialised from ``seed``; the rest as ``load_torchvision``."""
    clf = load_torchvision(name, weights_path=weights_path, num_classes=pretrained_classes, **kwargs)
    parent, _, attr = head.rpartition(".")
    owner = clf.net.get_submodule(parent) if parent else clf.net
    old = getattr(owner, attr, None)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"{name} has no nn.Linear head at {head!r}; set head= to the classifier layer's name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        setattr(owner, attr, nn.Linear(old.in_features, num_classes))
    clf.num_classes = num_classes
    return clf
