"""Functional forms of equidiff's metrics, on features or logits you bring yourself."""

from __future__ import annotations

import torch


def _kth_nn_radius(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (k+1-th counting itself)."""
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)]
    return torch.cat(radii)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """For each query row: does it lie in some centre's ball (distance <= that centre's radius)?"""
    out = [(torch.cdist(chunk, centres) <= radii[None, :]).any(dim=1) for chunk in queries.split(batch_size)]
    return torch.cat(out)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     batch_size: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls, k = 3 by default.

    precision: fraction of fake samples inside the union of real k-NN balls;
    recall: fraction of real samples inside the union of fake k-NN balls.
    Same definition as torch-fidelity >= 0.4 (``prc_neighborhood=3``, input1 = generated).
    """
    for name, f in (("real_features", real_features), ("fake_features", fake_features)):
        if f.ndim != 2:
            raise ValueError(f"{name} must be 2D (N, D), got shape {tuple(f.shape)}")
        if f.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} rows for k-NN radii, got {f.shape[0]}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature sizes differ: real {real_features.shape[1]} vs fake {fake_features.shape[1]}")
    real, fake = real_features.double(), fake_features.double()
    precision = _covered(fake, real, _kth_nn_radius(real, k, batch_size), batch_size).double().mean()
    recall = _covered(real, fake, _kth_nn_radius(fake, k, batch_size), batch_size).double().mean()
    return precision, recall
