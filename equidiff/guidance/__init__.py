"""Guidance: energies of a classifier, per-sample objectives, strength schedules, model_fn wrappers."""

from equidiff.guidance.energies import joint_energy, log_p_y_given_x, marginal_energy
from equidiff.guidance.guided import ClassifierGuidance
from equidiff.guidance.objectives import DualEnergy, JointEnergy, NegLogLikelihood, WeightedSum
from equidiff.guidance.schedules import Constant, Linear, Power, Product, Sigmoid, Standard, TwoStage

__all__ = [
    "ClassifierGuidance",
    "Constant",
    "DualEnergy",
    "JointEnergy",
    "Linear",
    "NegLogLikelihood",
    "Power",
    "Product",
    "Sigmoid",
    "Standard",
    "TwoStage",
    "WeightedSum",
    "joint_energy",
    "log_p_y_given_x",
    "marginal_energy",
]
