"""Shared pieces of the counterfactual / attack tests: small trained classifiers, one BLAS thread."""

from __future__ import annotations

import contextlib
import functools

import torch

from equidiff.classifiers.sklearn_models import digits_logistic_regression
from equidiff.classifiers.tabular import logistic_regression
from equidiff.data.embedded import digits_arrays
from equidiff.data.tabular import TabularDataModule, split_arrays


@contextlib.contextmanager
def one_thread():
    """Tiny models run ~20x faster on one thread here (two threads contend with the rest of the machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def wine():
    """(datamodule, train (x, y), test (x, y), logistic regression) for scikit-learn wine in [0, 1]."""
    dm = TabularDataModule(dataset="wine")
    return dm, split_arrays(dm, "train"), split_arrays(dm, "test"), logistic_regression(dm)


@functools.cache
def digits_images(n: int = 40):
    """(first n test digits in [-1, 1], labels, a scikit-learn logistic regression trained on digits)."""
    x, y = digits_arrays("test")
    return x[:n], y[:n], digits_logistic_regression()
