"""The CUDA paths (``gpu`` marker; skipped without a CUDA device, see tests/conftest.py).

Each test runs the same computation on the CPU and on the GPU and checks that a sample depends on its
seed alone on the device too (the per-sample CPU generators), that guidance and Algorithm 1 take their
gradients on the device, and that a whole predict run on the GPU writes the samples a CPU run writes.
``EQUIDIFF_TEST_DEVICE=cpu`` runs them on the CPU (a check of the tests themselves, not of CUDA).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from torch import nn

from equidiff.diffusion import UNetBackbone, sample_ddim, sample_ddpm
from equidiff.guidance import ClassifierGuidance, NegLogLikelihood
from equidiff.invariant import invariant_optimize
from equidiff.methods import draw_samples

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("EQUIDIFF_TEST_DEVICE", "cuda")


def _samples(unet, scheduler, seeds, labels, *, device, scale=None, sampler=None):
    backbone = UNetBackbone(unet, scheduler).to(device)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).to(device)
    clf.num_classes = 4
    guidance = ClassifierGuidance(NegLogLikelihood(clf), scale=scale) if scale is not None else None
    batch = {"seed": torch.tensor(seeds, device=device), "label": torch.tensor(labels, device=device)}
    sampler = sampler or functools.partial(sample_ddim, num_steps=6, eta=1.0,
                                           scheduler_overrides={"clip_sample": False})
    with torch.no_grad():
        return draw_samples(backbone, sampler, batch, guidance=guidance, device=device).cpu()


@pytest.mark.parametrize("scale", [None, 5.0])
def test_ddim_on_the_device_equals_the_cpu_and_ignores_batch_mates(tiny_unet, ddpm_scheduler, scale):
    seeds, labels = [3, 4, 5, 6], [0, 1, 2, 3]
    cpu = _samples(tiny_unet, ddpm_scheduler, seeds, labels, device="cpu", scale=scale)
    dev = _samples(tiny_unet, ddpm_scheduler, seeds, labels, device=DEVICE, scale=scale)
    alone = torch.cat([_samples(tiny_unet, ddpm_scheduler, [s], [y], device=DEVICE, scale=scale)
                       for s, y in zip(seeds, labels, strict=True)])
    # TF32/cuDNN kernels differ from the CPU's in rounding; a sample drawn from other noise differs by O(1)
    torch.testing.assert_close(dev, cpu, atol=5e-3, rtol=0)
    torch.testing.assert_close(alone, dev, atol=5e-3, rtol=0)


def test_ddpm_step_noise_on_the_device_comes_from_each_samples_seed(tiny_unet, ddpm_scheduler):
    ddpm = functools.partial(sample_ddpm, num_steps=10)
    cpu = _samples(tiny_unet, ddpm_scheduler, [7, 8], [0, 0], device="cpu", sampler=ddpm)
    dev = _samples(tiny_unet, ddpm_scheduler, [7, 8], [0, 0], device=DEVICE, sampler=ddpm)
    torch.testing.assert_close(dev, cpu, atol=5e-3, rtol=0)


def test_algorithm_1_on_the_device():
    # generate(z) = A z, L(x) = W x: the invariant set is reachable; the device run converges like the CPU's
    g = torch.Generator().manual_seed(0)
    A, W = torch.randn(6, 6, generator=g) / 6**0.5 + torch.eye(6), torch.randn(3, 6, generator=g) / 6**0.5
    z, target = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    outs = {}
    for device in ("cpu", DEVICE):
        objective = nn.Linear(6, 3, bias=False).to(device)
        objective.weight.data.copy_(W)
        objective.requires_grad_(False)
        a = A.to(device)
        out = invariant_optimize(lambda zz, active, a=a: zz @ a.T, objective, z.to(device), target.to(device),
                                 optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), budget=300,
                                 tau=1e-6)
        assert out["converged"].all()
        outs[device] = out["x"].cpu()
    torch.testing.assert_close(outs[DEVICE], outs["cpu"], atol=1e-3, rtol=0)


def test_a_predict_run_on_the_device_writes_the_cpu_run_samples(tiny_pipeline_dir, tmp_path):
    from tests.helpers import load_samples, run_cli

    runs = {}
    for name, trainer in (("cpu", "trainer=cpu"), ("dev", "trainer=gpu" if DEVICE == "cuda" else "trainer=cpu")):
        out = tmp_path / name
        r = run_cli(["predict", "experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}", trainer,
                     f"paths.output_dir={out}", "data.num_samples=6", "data.batch_size=3", "sampler.num_steps=5",
                     "metrics=none", "logger=none", "trainer.enable_progress_bar=false"])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_samples(out)
    np.testing.assert_array_equal(runs["dev"]["seeds"], runs["cpu"]["seeds"])
    # uint8 images: a rounding difference moves a pixel by at most one level
    diff = np.abs(runs["dev"]["images"].astype(int) - runs["cpu"]["images"].astype(int))
    assert diff.max() <= 1, diff.max()
