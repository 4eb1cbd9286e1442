"""ResNet-20 for CIFAR-10 (He et al. 2016, section 4.2), the classifier of GSE's CIFAR-10 table (seed 001).

3 stages of 3 basic blocks (16, 32, 64 channels), 0.27 M parameters, "option A" shortcuts (stride-2
subsampling and zero channel padding, no parameters), global average pooling and a linear head. This is
the architecture of the GSE reference (wagnermoritz/GSE ``models.ResNet20``) and of the widely used
akamaster/pytorch_resnet_cifar10 checkpoints; parameter names follow theirs (``conv1``, ``bn1``,
``layer{1,2,3}.{0,1,2}.conv1/bn1/conv2/bn2``, ``linear``), so those state dicts load (a ``module.``
prefix is detected and stripped). PyPI's ``pytorchcv`` has a ``resnet20_cifar10`` too, but with
projection ("option B") shortcuts and other parameter names, so GSE's weights do not fit it.

``load_resnet20`` wraps it in ``Classifier``; GSE feeds it images in [-1, 1] (Normalize(0.5, 0.5)), the
default here; set ``input_range``/``mean``/``std`` for weights trained with another normalisation.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from equidiff.classifiers.loaders import load_weights
from equidiff.classifiers.wrapper import Classifier


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # option A: subsample, zero-pad channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-(6n+2) with option-A shortcuts; ``depth=20`` is ResNet-20."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNetCIFAR:
    return ResNetCIFAR(20, num_classes)


def load_resnet20(weights_path: str | os.PathLike | None = None, *, num_classes: int = 10,
                  strip_prefix: str | None = None, input_range=(-1.0, 1.0), mean=None, std=None,
                  **wrapper_kwargs) -> Classifier:
    """ResNet-20 as a ``Classifier`` on 3x32x32 images in [-1, 1]; ``weights_path``: a state dict, a Lightning
    checkpoint or ``model.safetensors`` written by ``ClassifierTraining.save_pretrained`` (None: random init)."""
    net = resnet20(num_classes)
    if weights_path is not None:
        load_weights(net, weights_path, strip_prefix, f"ResNet-20 with {num_classes} classes",
                     "Train it with `equidiff fit experiment=counterfactual/cifar10_resnet20` or copy a ResNet-20 "
                     "state dict (GSE's / akamaster's layout) here.")
    kwargs = {"input_range": tuple(input_range), "mean": mean, "std": std, "channels": 3, "image_size": 32,
              "num_classes": num_classes, **wrapper_kwargs}
    return Classifier(net, **kwargs)
