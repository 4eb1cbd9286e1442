"""The guided model function reads no tensor on the host per step (tests.host_sync, on the meta device).

``ClassifierGuidance`` checks the labels against the classifier's classes once, when it wraps the model function
(one host read per batch, before the loop); a meta tensor cannot be read at all, so the classifier here does not
declare its classes and the check is left to tests/guidance/test_objectives_and_guidance.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from equidiff.classifiers.wrapper import Classifier
from equidiff.diffusion import UNetBackbone, sample_ddim, sample_ddpm
from equidiff.guidance import (
    ClassifierGuidance,
    DualEnergy,
    JointEnergy,
    NegLogLikelihood,
    Sigmoid,
    TwoStage,
    WeightedSum,
)
from equidiff.utils import generators_for, randn_per_sample
from tests.host_sync import HostSyncWatch

META = torch.device("meta")


def _classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(256, 4))
    return Classifier(net, input_range=(-1, 1), clamp=True, mean=[0.5], std=[0.5], channels=1, image_size=8)


OBJECTIVES = {
    "nll": lambda c: NegLogLikelihood(c),
    "joint": lambda c: JointEnergy(c),
    "dual": lambda c: DualEnergy(c, lam=0.3, class_means=[-1.0, -2.0, -3.0, -4.0]),
    "sum": lambda c: WeightedSum({"a": NegLogLikelihood(c), "b": JointEnergy(c)}, {"a": 1.0, "b": 0.5}),
}
OPTIONS = {
    "plain": {},
    "x0_hat": {"input": "x0_hat"},
    "x0_hat_detached": {"input": "x0_hat_detached"},
    "accumulate": {"accumulate_steps": 3},
    "pgd": {"pgd_steps": 2},
    "start_fraction": {"start_fraction": 0.3},
    "sigmoid": {"schedule": Sigmoid(650, 0.1, 0.01)},
    "two_stage": {"schedule": TwoStage(30.0, 11.0, 0.5)},
}


CASES = [("nll", option) for option in OPTIONS] + [(obj, "plain") for obj in OBJECTIVES if obj != "nll"]


@pytest.mark.parametrize("objective, option", CASES)
def test_guided_sampling_reads_nothing_on_the_host(tiny_unet, ddpm_scheduler, objective, option):
    labels = torch.tensor([0, 3])
    guidance = ClassifierGuidance(OBJECTIVES[objective](_classifier()), scale=2.0, **OPTIONS[option]).to(META)
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler).to(META)
    gens = generators_for([1, 2])
    x_T = randn_per_sample((1, 8, 8), gens, device=META)
    model_fn = guidance(backbone, {"label": labels.to(META)}, ddpm_scheduler)
    with HostSyncWatch() as watch, torch.no_grad():
        sample_ddim(watch.arm_on_call(model_fn), x_T, ddpm_scheduler, num_steps=3, eta=1.0, generators=gens)
    assert watch.found == []
    if option == "plain":
        with HostSyncWatch() as watch, torch.no_grad():
            sample_ddpm(watch.arm_on_call(model_fn), x_T, ddpm_scheduler, num_steps=3, generators=gens)
        assert watch.found == []
