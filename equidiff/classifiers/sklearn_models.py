"""Classifiers fitted with scikit-learn on the embedded data, exposed as torch modules.

They fit in about a second, deterministically, so the embedded demos have a judge
classifier without any training run or weight file.
"""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

from equidiff.classifiers.wrapper import Classifier
from equidiff.data.embedded import digits_arrays


def digits_logistic_regression(C: float = 1.0, split_seed: int = 0) -> Classifier:
    """Multinomial logistic regression on the digits training split (8x8 pixels in [-1, 1])."""
    images, labels = digits_arrays("train", split_seed=split_seed)
    # float64 and one BLAS thread: the same coefficients in every process (and 20x faster here)
    with threadpool_limits(limits=1):
        lr = LogisticRegression(C=C, max_iter=5000).fit(images.flatten(1).double().numpy(), labels.numpy())
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(lr.coef_).float())
        linear.bias.copy_(torch.from_numpy(lr.intercept_).float())
    net = nn.Sequential(nn.Flatten(), linear)
    return Classifier(net.requires_grad_(False), input_range=(-1.0, 1.0), channels=1, image_size=8,
                      num_classes=10, class_names=[str(i) for i in range(10)])
