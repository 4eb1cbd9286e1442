"""Tiny stand-ins, built by Hydra from overrides, so that the CIFAR-10 experiments run offline in seconds.

``tests/test_experiments.py`` formats only ``{tmp}`` (and ``{pipeline}``) into its overrides, so the
stand-ins write what they need themselves (once, atomically) and then build the real objects:

    data._target_=tests.analysis.standins.fake_cifar10 data.root={tmp}/cifar10
    method.classifiers.<name>._target_=tests.analysis.standins.tiny_robustness_classifier
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from robustness import cifar_models

from equidiff.classifiers import Classifier, load_robustness
from equidiff.data import CIFAR10DataModule
from tests.classifiers.test_loaders import robustness_checkpoint
from tests.data.fakes import write_fake_cifar10


def write_tiny_robustness_checkpoint(path: str | os.PathLike, arch: str = "resnet18", seed: int = 0,
                                     num_classes: int = 10) -> Path:
    """A random ``robustness.cifar_models`` net saved in the MadryLab checkpoint format (as the zoo files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = getattr(cifar_models, arch)(num_classes=num_classes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(robustness_checkpoint(net, momentum=0), tmp)
    os.replace(tmp, path)
    return path


def tiny_robustness_classifier(path: str, arch: str = "resnet50", dataset: str = "cifar10", *,
                               standin_arch: str = "resnet18", **kwargs) -> Classifier:
    """Stand-in for ``load_robustness(path, arch=...)``: writes a random ``standin_arch`` checkpoint at
    ``path`` (seeded by the file name, so each classifier differs) unless one is there, and loads it."""
    if not Path(path).exists():
        write_tiny_robustness_checkpoint(path, standin_arch, seed=sum(Path(path).name.encode()))
    return load_robustness(path, arch=standin_arch, dataset=dataset, **kwargs)


def fake_cifar10(root: str, *, n_train: int = 20, n_test: int = 6, **kwargs) -> CIFAR10DataModule:
    """Stand-in for ``CIFAR10DataModule(root, ...)``: writes a fake CIFAR-10 (real file format) unless one is there."""
    if not (Path(root) / "cifar-10-batches-py" / "batches.meta").exists():
        write_fake_cifar10(root, n_train=n_train, n_test=n_test)
    kwargs["val_size"] = min(kwargs.get("val_size", 0), n_train - 1)
    return CIFAR10DataModule(root, **kwargs)


def fake_imagenet(root: str, **kwargs):
    """Stand-in for ``ImageNetDataModule(root, ...)``: writes a fake ImageNet (class folders of JPEGs) unless
    one is there, and reads it with the real DataModule."""
    from equidiff.data import ImageNetDataModule
    from tests.data.fakes import write_fake_imagenet

    if not (Path(root) / "val").is_dir():
        write_fake_imagenet(root, n_train=1, n_val=2)
    return ImageNetDataModule(root, **kwargs)


def random_point_diffusion(path: str | None = None, dim: int = 2, hidden: int = 16, depth: int = 2):
    """Stand-in for ``load_point_diffusion(path)``: an untrained point denoiser (seeded) with a DDPM scheduler."""
    from diffusers import DDPMScheduler

    from equidiff.diffusion.toy import PointBackbone, PointDenoiser

    torch.manual_seed(0)
    return PointBackbone(PointDenoiser(dim=dim, hidden=hidden, depth=depth, time_embed_dim=8),
                         DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
