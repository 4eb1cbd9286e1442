"""Classifiers of tabular data (seed 001, S-CFE tables), fitted with scikit-learn and exposed as torch modules.

Logistic regression and a small ReLU MLP, fitted on a DataModule's training split (``split_arrays``), so
their scaling and split always match the data they explain. Both fit deterministically in about a second
(float64, one BLAS thread), need no training run and no weight file, and scikit-learn is the reference
implementation of both; the torch module reproduces scikit-learn's ``decision_function`` /
``predict_proba`` logits exactly (tested). Inputs are the DataModule's feature vectors as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits
from torch import nn

from equidiff.classifiers.wrapper import Classifier
from equidiff.data.tabular import split_arrays
from equidiff.errors import ConfigError


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _binary_to_two_logits(layer: nn.Linear) -> nn.Linear:
    """scikit-learn's binary models give one logit z for class 1; logits (0, z) give the same softmax."""
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    return _linear(np.concatenate([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b]))


def _wrap(net: nn.Module, num_classes: int) -> Classifier:
    # feature vectors pass through unchanged: input_range (-1, 1) is the identity map of the wrapper
    return Classifier(net.float().requires_grad_(False), input_range=(-1.0, 1.0), num_classes=num_classes)


def _train_arrays(datamodule, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = split_arrays(datamodule, split)
    if x.ndim != 2:
        x = x.flatten(1)
    return x.double().numpy(), y.numpy()


def logistic_regression(datamodule, *, C: float = 1.0, split: str = "train", max_iter: int = 5000) -> Classifier:
    """Multinomial logistic regression (scikit-learn, lbfgs) on ``datamodule``'s ``split``, as a torch Linear."""
    x, y = _train_arrays(datamodule, split)
    with threadpool_limits(limits=1):
        lr = LogisticRegression(C=C, max_iter=max_iter).fit(x, y)
    layer = _linear(lr.coef_, lr.intercept_)
    if len(lr.classes_) == 2:
        layer = _binary_to_two_logits(layer)
    return _wrap(nn.Sequential(nn.Flatten(), layer), len(lr.classes_))


def mlp(datamodule, *, hidden: Sequence[int] = (20, 20), alpha: float = 1e-4, max_iter: int = 2000,
        random_state: int = 0, split: str = "train") -> Classifier:
    """A ReLU MLP (scikit-learn ``MLPClassifier``, adam) on ``datamodule``'s ``split``, as torch layers.

    The default, two hidden layers of 20 units, is the reference's DNN for wine (``NUMNEUR = 20``).
    """
    if not hidden:
        raise ConfigError("an MLP needs at least one hidden layer; use logistic_regression for none")
    x, y = _train_arrays(datamodule, split)
    with threadpool_limits(limits=1):
        clf = MLPClassifier(hidden_layer_sizes=tuple(int(h) for h in hidden), activation="relu", alpha=alpha,
                            max_iter=max_iter, random_state=random_state).fit(x, y)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        layers.append(_linear(w.T, b))
        if i < len(clf.coefs_) - 1:
            layers.append(nn.ReLU())
    if len(clf.classes_) == 2:
        layers[-1] = _binary_to_two_logits(layers[-1])
    return _wrap(nn.Sequential(*layers), len(clf.classes_))
