"""Guidance-strength schedules w(t) (seed 002, sections 4.5 and 4.7).

Guided noise prediction: eps_hat = eps_theta(x_t, t) - s * w(t) * g(x_t), with g the guidance
direction (e.g. grad log p(y | x_t)). ``Standard`` (w = sqrt(1 - alpha_bar_t)) is classifier
guidance as in Algorithm 6; the other schedules replace that factor ("distinguishing the
classifier-score scheduler from the denoising scheduler", section 4.7).

A schedule is called as ``w(t, alpha_bar_t, T)`` with t the training timestep (T-1 ... 0 along the
reverse process) and returns a float. "Progress" along the reverse process is p = 1 - t / T, so
"the first 50% of the steps" is p < 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from equidiff.errors import ConfigError


def _f(v) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def progress(t, T: int) -> float:
    """Fraction of the reverse process already done at timestep t: 1 - t / T."""
    return 1.0 - _f(t) / T


def before(t, T: int, fraction: float) -> bool:
    """Whether timestep t lies in the first ``fraction`` of the reverse process (progress < fraction).

    Compared on timesteps, t > (1 - fraction) T, with a tolerance of 1e-6 timesteps: in floating point
    1 - 800/1000 < 0.2, so a plain ``progress(t, T) < fraction`` would leave t = 800 out of the 20% mark.
    """
    return _f(t) > (1.0 - fraction) * T + 1e-6


class Constant:
    """w(t) = value."""

    def __init__(self, value: float = 1.0):
        if value < 0:
            raise ConfigError(f"Constant schedule: value must be >= 0, got {value}")
        self.value = float(value)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        return self.value


class Power:
    """w(t) = (1 - alpha_bar_t) ** p (Fig. 4.10: p = 0.5, 2, 8)."""

    def __init__(self, p: float = 0.5):
        if not p > 0:
            raise ConfigError(f"Power schedule: the exponent p must be > 0, got {p}")
        self.p = float(p)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        return (1.0 - _f(alpha_bar_t)) ** self.p


class Standard(Power):
    """w(t) = sqrt(1 - alpha_bar_t): classifier guidance as in Algorithm 6 (and Dhariwal & Nichol)."""

    def __init__(self):
        super().__init__(0.5)


class Sigmoid:
    """w(t) = (1 - y0) / (1 + exp(-k (t - t0))) + y0 (eq. 4.4): strong early (large t), y0 late.

    y0 is the value the schedule tends to at the end of sampling, t0 the midpoint (a training
    timestep) and k the steepness. Figs. 4.11, 4.13, 4.14 use (t0, y0, k) = (650, 0.1, 0.01) and
    (500, 0.05, 0.02).
    """

    def __init__(self, t0: float = 500.0, y0: float = 0.05, k: float = 0.02):
        if not 0.0 <= y0 <= 1.0:
            raise ConfigError(f"Sigmoid schedule: y0 must be in [0, 1], got {y0}")
        if not k > 0:
            raise ConfigError(f"Sigmoid schedule: the steepness k must be > 0, got {k}")
        if t0 < 0:
            raise ConfigError(f"Sigmoid schedule: t0 is a timestep and must be >= 0, got {t0}")
        self.t0, self.y0, self.k = float(t0), float(y0), float(k)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        return (1.0 - self.y0) / (1.0 + math.exp(-self.k * (_f(t) - self.t0))) + self.y0


class TwoStage:
    """w = first for the first ``fraction`` of the reverse process, then second (Fig. 4.7: 30 then 11)."""

    def __init__(self, first: float = 30.0, second: float = 11.0, fraction: float = 0.5):
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"TwoStage schedule: fraction must be in (0, 1), got {fraction}")
        if first < 0 or second < 0:
            raise ConfigError(f"TwoStage schedule: strengths must be >= 0, got {first}, {second}")
        self.first, self.second, self.fraction = float(first), float(second), float(fraction)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        return self.first if before(t, T, self.fraction) else self.second


class Linear:
    """w goes linearly from ``start`` (beginning of sampling) to ``end`` (last step) (Fig. 4.17)."""

    def __init__(self, start: float = 1.0, end: float = 0.0):
        if start < 0 or end < 0:
            raise ConfigError(f"Linear schedule: start and end must be >= 0, got {start}, {end}")
        self.start, self.end = float(start), float(end)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        return self.start + (self.end - self.start) * progress(t, T)


class Product:
    """The product of several schedules (e.g. TwoStage x Standard for Fig. 4.7 inside Algorithm 6)."""

    def __init__(self, factors: Sequence):
        if not factors:
            raise ConfigError("Product schedule needs at least one factor")
        self.factors = list(factors)

    def __call__(self, t, alpha_bar_t, T: int) -> float:
        out = 1.0
        for f in self.factors:
            out *= f(t, alpha_bar_t, T)
        return out
