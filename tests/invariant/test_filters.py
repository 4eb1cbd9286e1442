"""The low-pass filter F of seed 000 (section 3.3.1): FFT radial cutoff, linear and differentiable."""

import math

import pytest
import torch

from equidiff.errors import ConfigError
from equidiff.invariant import LowPass, low_pass, radial_mask
from equidiff.invariant.filters import check_cutoffs


@pytest.mark.parametrize("cutoff", [0.1, 0.5, 1.0])
def test_filter_keeps_a_constant_image(cutoff):
    x = torch.full((2, 3, 16, 16), 0.37)
    torch.testing.assert_close(low_pass(x, cutoff), x)


@pytest.mark.parametrize("cutoff", [0.25, 0.5, 1.0, 1.4])
def test_filter_removes_a_checkerboard(cutoff):
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = ((i + j) % 2 * 2 - 1).float()[None, None].repeat(1, 3, 1, 1)  # at radius sqrt(2) x Nyquist
    background = torch.full_like(board, 0.2)
    torch.testing.assert_close(low_pass(background + board, cutoff), background, atol=1e-5, rtol=0)


def test_a_cutoff_beyond_the_checkerboard_keeps_everything():
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(low_pass(x, 1.5), x, atol=1e-5, rtol=0)


def test_filter_keeps_low_and_removes_high_frequencies():
    n = 32
    k = torch.arange(n).float()
    low = torch.cos(2 * torch.pi * 2 * k / n)[None, :].expand(n, n)  # 2 cycles: radius 0.125 x Nyquist
    high = torch.cos(2 * torch.pi * 12 * k / n)[:, None].expand(n, n)  # 12 cycles: radius 0.75
    out = low_pass((low + high)[None, None], 0.5)[0, 0]
    torch.testing.assert_close(out, low, atol=1e-5, rtol=0)
    assert radial_mask(n, n, 0.5).sum() < n * n


def test_filter_passes_gradients_as_its_adjoint():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    (low_pass(x, 0.5) * w).sum().backward()
    # F is a real, symmetric projection: its adjoint is itself, so d<F(x), w>/dx = F(w)
    torch.testing.assert_close(x.grad, low_pass(w, 0.5))
    assert torch.autograd.gradcheck(lambda v: low_pass(v, 0.3), (x,))


def test_module_without_cutoff_or_on_points_is_the_identity():
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(LowPass(None)(x), x)
    pts = torch.randn(5, 2)
    assert torch.equal(LowPass(0.5)(pts), pts)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_cutoffs_are_errors(bad):
    with pytest.raises(ConfigError, match="cutoff"):
        LowPass(bad)
    with pytest.raises(ConfigError, match="cutoff"):
        low_pass(torch.zeros(1, 1, 4, 4), bad)
    with pytest.raises(ConfigError, match="cutoffs"):
        check_cutoffs([0.5, bad])
    with pytest.raises(ConfigError, match="cutoffs"):
        check_cutoffs([])


def test_non_square_images_measure_each_axis_in_its_own_frequencies():
    """An 8 x 16 image: a vertical cosine of 1/4 cycle per pixel (radius 0.5 in axis-Nyquist units) is kept by
    f_c = 0.6, a horizontal one of 7/16 cycle per pixel (radius 0.875) is removed, whatever the aspect ratio."""
    y = torch.arange(8, dtype=torch.float64)[:, None].expand(8, 16)
    x = torch.arange(16, dtype=torch.float64)[None, :].expand(8, 16)
    low, high = torch.cos(2 * math.pi * 0.25 * y), torch.cos(2 * math.pi * 7 / 16 * x)
    out = low_pass((low + high)[None, None], 0.6)
    torch.testing.assert_close(out[0, 0], low, rtol=0, atol=1e-12)
