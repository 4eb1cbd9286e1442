"""Functional forms of equidiff's metrics, on features or logits you bring yourself.

Each equals torch-fidelity 0.4 on the same inputs (tested): ``precision_recall`` its
``calculate_precision_recall_full``, ``frechet_distance*`` its ``fid_features_to_statistics`` +
``fid_statistics_to_metric``, ``inception_score`` its ``isc_features_to_metric``.
"""

from __future__ import annotations

import numpy as np
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


# --------------------------------------------------------------------------- Fréchet distance (FID)
def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (ddof=1) of features (N, D), in float64, as torch-fidelity computes them."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    return f.mean(dim=0), torch.cov(f.T, correction=1)


def statistics_from_moments(n, total: torch.Tensor, total_outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from streamed moments: n, sum_i f_i and sum_i f_i f_i^T (float64)."""
    n = float(n)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n:g}")
    mu = total.double() / n
    sigma = (total_outer.double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> torch.Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), with the trace of the matrix
    square root taken as the sum of the square roots of the eigenvalues of sigma1 @ sigma2 (real part),
    as torch-fidelity >= 0.4 and torchmetrics >= 1.0 do; no scipy ``sqrtm``. Computed on the inputs' device.
    """
    mu1, mu2 = (torch.as_tensor(m).double() for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).double().to(mu1.device) for s in (sigma1, sigma2))
    mu2 = mu2.to(mu1.device)
    d = mu1.shape[-1] if mu1.ndim == 1 else None
    if d is None or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D) with the same D on both sides, got mu1 "
                         f"{tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, "
                         f"sigma2 {tuple(sigma2.shape)}")
    diff = mu1 - mu2
    tr_covmean = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_covmean


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance (FID on Inception-2048 features) between two feature sets (N, D), in float64."""
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))


# --------------------------------------------------------------------------- Inception score
def inception_score(logits: torch.Tensor, splits: int = 10, *, shuffle: bool = True,
                    rng_seed: int = 2020) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception score (mean, std over ``splits`` chunks), exactly as torch-fidelity's ``isc_features_to_metric``.

    ``logits``: (N, C) in a canonical order (equidiff: sorted by sample seed, the order of ``samples.npz``).
    With ``shuffle`` the rows are permuted by ``numpy.random.RandomState(rng_seed).permutation(N)`` first
    (torch-fidelity's default, ``rng_seed=2020``), so the result equals torch-fidelity's bit for bit on the same
    logits in the same order. Per chunk: exp(mean_i KL(p(y|x_i) || p(y))) with p(y) the chunk's mean softmax;
    mean and std (ddof=0, ``np.std``) over chunks. torch-fidelity feeds the ``logits_unbiased`` features.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2D (N, C), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"the inception score needs at least splits={splits} samples, got {n}")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(rng_seed).permutation(n)).to(logits.device)]
    logits = logits.double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        chunk = slice(i * n // splits, (i + 1) * n // splits)
        q = p[chunk].mean(dim=0, keepdim=True)
        kl = p[chunk] * (log_p[chunk] - q.log())
        scores.append(kl.sum(dim=1).mean().exp().item())
    return (torch.tensor(float(np.mean(scores)), dtype=torch.float64),
            torch.tensor(float(np.std(scores)), dtype=torch.float64))
