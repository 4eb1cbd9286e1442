"""Thin LightningModules, one per method; they receive built objects and wire them."""

from equidiff.methods.classifier_training import ClassifierTraining
from equidiff.methods.ddpm_training import DDPMTraining
from equidiff.methods.robust_accuracy import RobustAccuracy
from equidiff.methods.robust_energy import RobustEnergyGuidance
from equidiff.methods.sampling import Sampling, draw_samples

__all__ = ["ClassifierTraining", "DDPMTraining", "RobustAccuracy", "RobustEnergyGuidance", "Sampling", "draw_samples"]
