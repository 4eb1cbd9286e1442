"""The low-pass filter F of seed 000 (section 3.3.1): an FFT with a radial frequency cutoff f_c.

Frequencies are measured in units of the Nyquist frequency along one axis (0.5 cycles per pixel):
a component (f_y, f_x) is kept when sqrt(f_y^2 + f_x^2) / 0.5 <= f_c. f_c = 1 keeps everything up to the
axis Nyquist frequency; a one-pixel checkerboard sits at radius sqrt(2) and is removed by any f_c < 1.41;
the constant (DC) component is always kept. The filter is linear, real and differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from equidiff.errors import ConfigError


def radial_mask(h: int, w: int, cutoff: float, device=None) -> torch.Tensor:
    """[h, w] boolean mask of the kept frequencies (in torch.fft.fftfreq order)."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.fftfreq(w, device=device)[None, :]
    return (fy.square() + fx.square()).sqrt() / 0.5 <= cutoff + 1e-9


def low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """F(x): keep the frequencies of radius <= cutoff (in axis-Nyquist units) of every channel of NCHW images."""
    if not cutoff > 0:
        raise ConfigError(f"the low-pass cutoff f_c must be > 0, got {cutoff}")
    mask = radial_mask(x.shape[-2], x.shape[-1], cutoff, device=x.device)
    spectrum = torch.fft.fft2(x.float() if x.dtype not in (torch.float32, torch.float64) else x)
    return torch.fft.ifft2(spectrum * mask).real.to(x.dtype)


class LowPass(nn.Module):
    """F as a module (``cutoff`` f_c); images only (NCHW). ``None`` cutoff means no filtering."""

    def __init__(self, cutoff: float | None = 0.5):
        super().__init__()
        if cutoff is not None and not cutoff > 0:
            raise ConfigError(f"the low-pass cutoff f_c must be > 0, got {cutoff}")
        self.cutoff = cutoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cutoff is None or x.ndim != 4:
            return x
        return low_pass(x, self.cutoff)


def check_cutoffs(cutoffs: Sequence[float]) -> list[float]:
    cutoffs = [float(c) for c in cutoffs]
    if not cutoffs or any(c <= 0 for c in cutoffs):
        raise ConfigError(f"frequency-analysis cutoffs must be a non-empty list of values > 0, got {cutoffs}")
    return cutoffs
