"""Explanation algorithms as plain functions (ACE, seed 003), used by thin LightningModules in ``equidiff.methods``."""
