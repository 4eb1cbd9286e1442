"""On CUDA, the denoising loops make no host sync: ``torch.cuda.set_sync_debug_mode("error")`` from the first model
call to the end of the loop (``tests.host_sync.HostSyncWatch`` arms it), over the samplers, the differentiable
chain (forward and backward) and guided sampling, in fp32 and in bf16. ``gpu`` marker: skipped without a CUDA device
(``EQUIDIFF_TEST_DEVICE=cpu`` runs them on the CPU, a check of the tests only; tests/diffusion/test_no_host_sync.py
is the CPU check of the loops).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from equidiff.classifiers.wrapper import Classifier
from equidiff.diffusion import UNetBackbone, ddim_chain, draw_chain_noise, sample_ddim, sample_ddpm
from equidiff.guidance import ClassifierGuidance, NegLogLikelihood
from equidiff.utils import generators_for, randn_per_sample
from tests.host_sync import HostSyncWatch

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("EQUIDIFF_TEST_DEVICE", "cuda")


def _setup(tiny_unet, ddpm_scheduler, dtype):
    backbone = UNetBackbone(tiny_unet.to(dtype), ddpm_scheduler).to(DEVICE)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(256, 4))
    clf = Classifier(net, input_range=(-1, 1), channels=1, image_size=8, num_classes=4, dtype=dtype).to(DEVICE)
    gens = generators_for([1, 2, 3])
    x_T = randn_per_sample((1, 8, 8), gens, device=DEVICE)
    return backbone, clf, gens, x_T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_loops_make_no_host_sync(tiny_unet, ddpm_scheduler, dtype):
    backbone, clf, gens, x_T = _setup(tiny_unet, ddpm_scheduler, dtype)
    guided = ClassifierGuidance(NegLogLikelihood(clf), scale=2.0, start_fraction=0.2)(
        backbone, {"label": torch.tensor([0, 1, 2], device=DEVICE)}, ddpm_scheduler)
    for model_fn in (backbone, guided):
        with HostSyncWatch() as watch, torch.no_grad():
            sample_ddim(watch.arm_on_call(model_fn), x_T, ddpm_scheduler, num_steps=5, eta=1.0, generators=gens)
        with HostSyncWatch() as watch, torch.no_grad():
            sample_ddpm(watch.arm_on_call(model_fn), x_T, ddpm_scheduler, num_steps=5, generators=gens)
        assert watch.found == []
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def test_the_chain_makes_no_host_sync_forward_and_backward(tiny_unet, ddpm_scheduler):
    backbone, _, gens, x_T = _setup(tiny_unet, ddpm_scheduler, torch.float32)
    noises = draw_chain_noise((1, 8, 8), gens, 5, device=DEVICE)
    z = x_T.clone().requires_grad_(True)
    with HostSyncWatch() as watch, torch.enable_grad():
        x = ddim_chain(watch.arm_on_call(backbone), z, ddpm_scheduler, num_steps=5, eta=0.5, noises=noises)
        x.square().sum().backward()
    assert watch.found == [] and z.grad is not None
