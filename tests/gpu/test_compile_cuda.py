"""``torch.compile`` (inductor) of the backbone and the classifier on CUDA gives the eager samples (``gpu`` marker)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from equidiff.diffusion import UNetBackbone
from tests.diffusion.test_compile import guided_samples, tiny_classifier

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("EQUIDIFF_TEST_DEVICE", "cuda")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_inductor_on_the_device_gives_the_eager_samples(tiny_unet, ddpm_scheduler, dtype, tol):
    # fp32: cuDNN may use TF32 in either run (10 significant bits); bf16: tests/utils/test_precision.py's tolerance
    torch._dynamo.reset()
    eager = UNetBackbone(copy.deepcopy(tiny_unet).to(dtype), ddpm_scheduler).to(DEVICE)
    compiled = UNetBackbone(copy.deepcopy(tiny_unet).to(dtype), ddpm_scheduler, compile=True).to(DEVICE)
    ref = guided_samples(eager, tiny_classifier().to(DEVICE))
    out = guided_samples(compiled, tiny_classifier(compile=True).to(DEVICE))
    assert ((out - ref).abs().max() / ref.abs().max()) < tol
