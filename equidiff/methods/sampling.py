"""Sampling: draw images from a diffusion backbone, optionally guided (a thin LightningModule)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning as L
import torch

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.errors import ConfigError
from equidiff.methods.common import require_grad_mode
from equidiff.utils.rng import generators_for, randn_per_sample


def draw_samples(backbone: DiffusionBackbone, sampler: Callable, batch: dict, *, guidance: Callable | None = None,
                 device=None) -> torch.Tensor:
    """seeds -> x_T -> sampler(model_fn) -> decode: images in [-1, 1], one per seed of the batch.

    ``guidance(model_fn, batch, scheduler) -> model_fn`` wraps the model function when given.
    """
    seeds = batch["seed"]
    # 1. one generator per sample seed; x_T ~ N(0, I) drawn from it
    generators = generators_for(seeds)
    x_T = randn_per_sample(backbone.sample_shape, generators, device=device)
    # 2. the model function, conditioned and guided per sample
    model_fn = backbone
    if backbone.num_classes is not None:
        labels = batch["label"]
        if (labels < 0).any():
            raise ConfigError("this backbone is class-conditional: give every seed a label "
                              "(data.labels=cycle|random|<int>, data.num_classes=...)")
        model_fn = functools.partial(backbone, class_labels=labels)
    if guidance is not None:
        model_fn = guidance(model_fn, batch, backbone.scheduler)
    # 3. sample and decode
    z_0 = sampler(model_fn, x_T, backbone.scheduler, generators=generators)
    return backbone.decode(z_0).clamp(-1, 1)


class Sampling(L.LightningModule):
    """``predict_step``: seeds -> x_T -> sampler(model_fn) -> decode -> record.

    Args:
        backbone: a ``DiffusionBackbone`` (model_fn protocol: eps = backbone(x_t, t)).
        sampler: ``sampler(model_fn, x_T, scheduler, generators=...) -> x_0`` (e.g. a partial of
            ``equidiff.diffusion.sample_ddim``).
        guidance: optional ``guidance(model_fn, batch, scheduler) -> model_fn`` wrapper.
        classifier: optional classifier the guidance or metrics use; checked against the
            backbone's image size and channels when the module is built.
    """

    def __init__(self, backbone: DiffusionBackbone, sampler: Callable, guidance: Callable | None = None,
                 classifier: torch.nn.Module | None = None):
        super().__init__()
        self.backbone, self.sampler, self.guidance, self.classifier = backbone, sampler, guidance, classifier
        if guidance is not None and getattr(backbone, "is_flow", False):
            raise ConfigError("the guidance wrappers are written for DDPM backbones (eps, alpha_bar); a flow "
                              "backbone (LightningDiT) samples with its own classifier-free guidance "
                              "(diffusion.guidance_scale): set guidance=null")
        if classifier is not None and hasattr(classifier, "check_compatible"):
            classifier.check_compatible(backbone.image_shape)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        x_0 = draw_samples(self.backbone, self.sampler, batch, guidance=self.guidance, device=self.device)
        return {"seed": batch["seed"], "index": batch["index"], "label": batch["label"], "image": x_0}
