"""Adversarial attacks and counterfactual solvers (maintained libraries where they run here)."""

from equidiff.attacks.pgd import pgd_attack

__all__ = ["pgd_attack"]
