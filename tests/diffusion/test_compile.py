"""``torch.compile`` of the denoising network and the classifier (an option, off by default): the same samples.

Inductor compiles the tiny UNet in about 90 s on 2 CPU cores, so the sample comparison with inductor is ``slow``;
the default suite checks the option's wiring and traces the classifier with dynamo's ``eager`` backend (graph
capture without code generation). tests/gpu/test_compile_cuda.py compares inductor on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from equidiff.classifiers import load_small_net
from equidiff.classifiers.wrapper import Classifier
from equidiff.diffusion import UNetBackbone, load_unet, sample_ddim
from equidiff.guidance import ClassifierGuidance, NegLogLikelihood
from equidiff.utils import generators_for, randn_per_sample


def _compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def guided_samples(backbone, classifier, steps=5):
    guidance = ClassifierGuidance(NegLogLikelihood(classifier), scale=3.0)
    gens = generators_for([1, 2, 3])
    x_T = randn_per_sample(backbone.sample_shape, gens, device=next(backbone.parameters()).device)
    model_fn = guidance(backbone, {"label": torch.tensor([0, 1, 2], device=x_T.device)}, backbone.scheduler)
    with torch.no_grad():
        return sample_ddim(model_fn, x_T, backbone.scheduler, num_steps=steps, eta=1.0, generators=gens,
                           scheduler_overrides={"clip_sample": False})


def tiny_classifier(compile=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(512, 4))
    return Classifier(net, input_range=(-1, 1), channels=1, image_size=8, num_classes=4, compile=compile)


def test_compile_is_off_by_default_and_applies_in_place(tiny_pipeline_dir):
    assert not _compiled(load_unet(str(tiny_pipeline_dir)).unet)
    assert not _compiled(tiny_classifier().net)
    backbone = load_unet(str(tiny_pipeline_dir), compile={"backend": "eager"})
    assert _compiled(backbone.unet) and type(backbone.unet).__name__ == "UNet2DModel"  # the module itself, compiled
    assert _compiled(tiny_classifier(compile=True).net)
    assert _compiled(load_small_net("cnn", None, in_channels=1, num_classes=10, width=8, image_size=8,
                                    compile=True).net)


def test_a_compiled_classifier_guides_to_the_same_samples(tiny_unet, ddpm_scheduler):
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    torch._dynamo.reset()
    ref = guided_samples(backbone, tiny_classifier())
    torch._dynamo.utils.counters.clear()
    out = guided_samples(backbone, tiny_classifier(compile={"backend": "eager"}))  # guidance gradients traced too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the classifier
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_backbone_and_classifier_give_the_same_samples(tiny_unet, ddpm_scheduler):
    torch._dynamo.reset()
    ref = guided_samples(UNetBackbone(tiny_unet, ddpm_scheduler), tiny_classifier())
    out = guided_samples(UNetBackbone(copy.deepcopy(tiny_unet), ddpm_scheduler, compile=True),
                         tiny_classifier(compile=True))
    # generated kernels fuse and reorder float operations: equal up to rounding (measured max 2.5e-7 relative)
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
