"""Invariant-set sampling, "EquiDiff" (seed 000): objectives L, the low-pass filter F, Algorithm 1."""

from equidiff.invariant.algorithm import evaluate, invariance_loss, invariant_optimize
from equidiff.invariant.filters import LowPass, low_pass, radial_mask
from equidiff.invariant.objectives import Energy, Logits, LogOdds, Neuron, Probabilities, as_vector

__all__ = [
    "Energy",
    "LogOdds",
    "Logits",
    "LowPass",
    "Neuron",
    "Probabilities",
    "as_vector",
    "evaluate",
    "invariance_loss",
    "invariant_optimize",
    "low_pass",
    "radial_mask",
]
