"""Thin LightningModules, one per method; they receive built objects and wire them."""

from equidiff.methods.ddpm_training import DDPMTraining
from equidiff.methods.sampling import Sampling

__all__ = ["DDPMTraining", "Sampling"]
