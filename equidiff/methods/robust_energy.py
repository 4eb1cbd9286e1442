"""Robust-energy guidance (seed 002): an unconditional DDPM/DDIM guided by a robust classifier."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, marginal_energy
from equidiff.guidance.guided import ClassifierGuidance
from equidiff.methods.common import require_grad_mode
from equidiff.methods.sampling import draw_samples
from equidiff.utils.precision import full_precision

log = logging.getLogger(__name__)


def _warn_if_clipping(sampler, scheduler) -> None:
    """Algorithm 6 uses x0_hat unclipped; diffusers' clip_sample clips the guidance term on x0_hat only."""
    kw = getattr(sampler, "keywords", {}) or {}
    clip = {**dict(scheduler.config), **(kw.get("scheduler_overrides") or {})}.get("clip_sample", False)
    if clip and not kw.get("use_clipped_model_output"):
        log.warning("guided sampling with clip_sample=true and use_clipped_model_output unset: the guidance term on "
                    "x0_hat is clipped away while the one on eps is not, which can push samples away from the target "
                    "class (seen with eta=0). Set sampler.scheduler_overrides.clip_sample=false (Algorithm 6) or "
                    "sampler.use_clipped_model_output=true.")


class RobustEnergyGuidance(L.LightningModule):
    """``predict_step``: sample toward each seed's label with classifier guidance (Algorithm 6 and variants).

    Args:
        backbone: the unconditional diffusion model (e.g. google/ddpm-cifar10-32).
        sampler: a partial of ``sample_ddim`` (eta, respaced steps) or ``sample_ddpm``.
        guidance: a ``ClassifierGuidance`` (objective, scale, schedule, accumulation, PGD, input).
        classifier: the classifier whose energies E(x) and E(x, y) of the final samples are recorded
            (normally the guiding one).

    The record carries per sample: ``image``, ``label`` (the target), ``seed``, ``index``,
    ``pred`` (the classifier's class for the sample), ``energy`` E(x) and ``joint_energy`` E(x, y).
    """

    def __init__(self, backbone: DiffusionBackbone, sampler: Callable, guidance: ClassifierGuidance,
                 classifier: torch.nn.Module):
        super().__init__()
        self.backbone, self.sampler, self.guidance, self.classifier = backbone, sampler, guidance, classifier
        classifier.check_compatible(backbone.image_shape)
        _warn_if_clipping(sampler, backbone.scheduler)
        self.num_classes = getattr(classifier, "num_classes", None) or guidance.num_classes

    def on_predict_start(self) -> None:
        # a label outside the classifier's classes is an error before any sample is drawn
        dm = self.trainer.datamodule
        ds = dm.dataset(dm.predict_split) if hasattr(dm, "dataset") else None
        if ds is not None and hasattr(ds, "dataset") and hasattr(ds.dataset, "label") and self.num_classes:
            labels = {ds.dataset.label(i) for i in range(len(ds))}
            bad = sorted(lab for lab in labels if not 0 <= lab < self.num_classes)
            if bad:
                raise ConfigError(f"target labels {bad[:10]} are outside the classifier's {self.num_classes} classes; "
                                  f"set data.labels (cycle|random|<int>) and data.num_classes={self.num_classes}")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        x_0 = draw_samples(self.backbone, self.sampler, batch, guidance=self.guidance, device=self.device)
        with torch.no_grad(), full_precision():  # the recorded decision and energies in fp32
            logits = self.classifier(x_0.float())
        labels = batch["label"]
        return {"seed": batch["seed"], "index": batch["index"], "label": labels, "image": x_0,
                "pred": logits.argmax(-1), "energy": marginal_energy(logits),
                "joint_energy": joint_energy(logits, labels)}
