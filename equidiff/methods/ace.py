"""ACE (seed 003): adversarial counterfactual explanations through a DDPM, as a thin LightningModule."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.errors import ConfigError
from equidiff.explain.ace import (
    PostProcessing,
    PreExplanation,
    explanation_target,
    image_distance,
    predicted_class,
)
from equidiff.methods.common import require_grad_mode
from equidiff.utils.images import to_uint8, uint8_to_float
from equidiff.utils.precision import full_precision
from equidiff.utils.rng import generators_for


def _plain(rule):
    return OmegaConf.to_container(rule, resolve=True) if isinstance(rule, DictConfig | ListConfig) else rule


def _subset(generators, keep: torch.Tensor):
    return [g for g, k in zip(generators, keep.tolist(), strict=True) if k]


class ACE(L.LightningModule):
    """``predict_step``: input -> pre-explanation (Algorithm 1) -> mask + inpainting (Algorithm 2) -> record.

    Args:
        backbone: a pixel-space diffusion backbone (``model_fn(x_t, t) -> eps``) trained on the data.
        classifier: the classifier to explain, taking [-1, 1] images (one logit = binary).
        pre_explanation: ``PreExplanation`` (tau, iterations, PGD step and budget, distance, lambda_d).
        post_processing: ``PostProcessing`` (dilation, threshold); the same chain (``num_steps``, ``tau``,
            ``spacing``, ``clip_denoised``, ``learned_variance``).
        target: ``"flip"`` (binary), a class index, or a label -> target mapping (``explanation_target``).
        misclassified_to_label: inputs the classifier gets wrong target their true label (the reference).

    Inputs the classifier already assigns to their target are reported as already flipped (success,
    no attack): their counterfactual is the input itself.

    The record, per sample: ``image`` (the counterfactual), ``input_uint8``, ``pre_explanation_uint8``,
    ``mask`` (uint8 0/1, 1 x H x W), ``label``, ``source`` (the classifier's class on the input),
    ``target``, ``pred`` and ``pre_explanation_pred`` (its class on the counterfactual and the
    pre-explanation), ``success`` (pred == target), ``already_flipped``, ``correct`` (source == label),
    ``l1`` (mean |.| per pixel), ``l2`` (norm), ``linf`` (in [0, 1] units, counterfactual vs input, on the
    stored uint8 images) and ``mask_area`` (fraction of pixels inside the mask).
    """

    def __init__(self, backbone: DiffusionBackbone, classifier: nn.Module, pre_explanation: PreExplanation,
                 post_processing: PostProcessing, target="flip", misclassified_to_label: bool = True):
        super().__init__()
        if getattr(backbone, "is_latent", False):
            raise ConfigError("ACE works on pixel-space diffusion models (the mask and the inpainting are in pixel "
                              "space); pick a pixel UNet backbone (diffusion=local / ddpm_cifar10 / digits_ddpm)")
        if pre_explanation.chain != post_processing.chain:
            raise ConfigError("ACE: the pre-explanation and the post-processing must use the same DDPM chain: got "
                              f"{pre_explanation.chain} and {post_processing.chain}")
        self.backbone = backbone
        self.classifier = classifier.eval().requires_grad_(False)  # gradients w.r.t. the images only
        if hasattr(classifier, "check_compatible"):
            classifier.check_compatible(backbone.image_shape)
        self.pre_explanation, self.post_processing = pre_explanation, post_processing
        self.target, self.misclassified_to_label = _plain(target), bool(misclassified_to_label)
        self.num_classes = getattr(classifier, "num_classes", None)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        x, label, seeds = batch["image"], batch["label"], batch["seed"]
        generators = generators_for(seeds)  # every noise of a sample comes from its own seed
        # 0. the classifier's decision and the class the explanation should reach (in fp32 whatever the precision)
        with torch.no_grad(), full_precision():
            source = predicted_class(self.classifier(x))
        target = explanation_target(self.target, source, label, num_classes=self.num_classes,
                                    misclassified_to_label=self.misclassified_to_label)
        attack = source != target  # already flipped: reported as a success, not attacked
        x_pe, ce, mask = x.clone(), x.clone(), torch.zeros_like(x[:, :1], dtype=torch.bool)
        if attack.any():
            gens, xa = _subset(generators, attack), x[attack]
            # 1. Algorithm 1: the pre-explanation, PGD through the tau-step DDPM filter
            x_pe[attack] = self.pre_explanation(self.backbone, self.classifier, xa, target[attack], generators=gens)
            # 2. Algorithm 2: mask from |x - x_pe|, dilated and thresholded; RePaint inpainting inside it
            with torch.no_grad():
                mask[attack], ce[attack] = self.post_processing(self.backbone, xa, x_pe[attack], generators=gens)
        return self.record(batch, x, x_pe, ce, mask, source, target, attack)

    @torch.no_grad()
    def record(self, batch, x, x_pe, ce, mask, source, target, attack) -> dict:
        x_u8, pe_u8, ce_u8 = to_uint8(x), to_uint8(x_pe), to_uint8(ce)
        with full_precision():  # the recorded decisions in fp32 whatever the run's precision
            pred = predicted_class(self.classifier(uint8_to_float(ce_u8).to(x)))
            pe_pred = predicted_class(self.classifier(uint8_to_float(pe_u8).to(x)))
        xs, cs = uint8_to_float(x_u8), uint8_to_float(ce_u8)
        n_pix = x[0].numel()
        return {
            "seed": batch["seed"], "index": batch["index"], "label": batch["label"], "image": ce,
            "input_uint8": x_u8, "pre_explanation_uint8": pe_u8, "mask": mask.to(torch.uint8),
            "source": source, "target": target, "pred": pred, "pre_explanation_pred": pe_pred,
            "success": (pred == target) | ~attack, "already_flipped": ~attack, "correct": source == batch["label"],
            "l1": image_distance(cs, xs, "l1") / n_pix, "l2": image_distance(cs, xs, "l2"),
            "linf": ((cs - xs).abs().flatten(1).amax(1) / 2), "mask_area": mask.flatten(1).float().mean(1),
        }
