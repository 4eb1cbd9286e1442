"""Plausibility terms q(x', y~) of S-CFE (seed 001, eq. 12): per-class densities, fitted once, evaluated
differentiably in torch, per sample.

* ``KDEDensity``: a Gaussian kernel density per class. By default it is fitted as the reference
  (wagnermoritz/SCFE ``train_n_kdes``) fits it: 5-fold CV over the whole training set (``KFold(5,
  shuffle=True, random_state=42)``), in each fold and for each class the bandwidth with the best mean
  validation log-density on the grid (0.01, 1, 5, 10, 20, 50, 100, 200, 500), refined on 20 points from
  half to twice it, then the mean of the five fold winners. Its log-density is the reference's:
  logsumexp_i(-||x - p_i||^2 / (2 h^2)) - log(n h sqrt(2 pi)), a one-dimensional normaliser whatever the
  dimension d (``normaliser="reference"``; ``"density"`` gives the true density, n (2 pi h^2)^(d/2), as
  scikit-learn's ``KernelDensity``). The two differ by the constant (d - 1) log(h sqrt(2 pi)) per class, so
  the solver's gradients agree; the CV winner and the reported values do not. ``rule="gridsearch"`` is the
  other choice: scikit-learn ``GridSearchCV`` over a log grid with the true density.
* ``GMMDensity``: a diagonal Gaussian mixture per class. By default the reference's (``GaussianMixture`` of
  its Models.py): k-means picks the number of components among round(linspace(ceil(K/2), ceil(3K/2), 10))
  (the K-means run with the lowest mean squared distance to the nearest centroid wins, first on ties), its
  centroids start EM with variances 5 and equal weights; EM (at most 100 steps, stopped when the mean
  log-likelihood gains less than 1e-9) resets a component whose variance falls to 1e-6 or below to a random
  training point with variance 2. ``fit="sklearn"``: scikit-learn ``GaussianMixture`` instead.
* ``KNNDensity``: the reference's "density gravity": the anchor g is the convex combination of the k nearest
  target-class training points of the original x, weighted by their local densities k / sum of distances
  to their own k nearest neighbours, and q(x') = -||x' - g||^2.

The reference evaluates its KDE and GMM on the data as the classifier sees it (z-scored tabular features,
MNIST in [-1, 1]) and its kNN term in the solver's [0, 1] box coordinates: ``fitted(..., space="unit")``
maps the data through the box (``BoxToUnit``) for that. More generally ``features`` maps inputs to
features (e.g. ``ClassifierFeatures``, the input of the classifier's last layer) before fitting and
evaluating. ``forward(x, y)`` is log q(x, y) per sample; ``bind(x0, y)`` gives the function x' -> q(x', y) a
solver optimises for the problem (x0, y) (only the kNN anchor depends on x0).

The reference's k-means and EM draw from torch's and Python's global generators, unseeded; here they draw
from a ``torch.Generator`` and a ``random.Random`` seeded with ``random_state``, in the reference's order
(classes in turn, each candidate K in turn), so the reference seeded with ``torch.manual_seed(s)`` and
``random.seed(s)`` draws the same numbers. The reference works in float32; equidiff fits in float64.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KernelDensity, NearestNeighbors
from threadpoolctl import threadpool_limits
from torch import nn

from equidiff.errors import ConfigError


class ClassifierFeatures(nn.Module):
    """The input of ``classifier``'s module ``layer`` (default: its last ``nn.Linear``, the penultimate features)."""

    def __init__(self, classifier: nn.Module, layer: str | None = None):
        super().__init__()
        self.classifier = classifier
        names = dict(classifier.named_modules())
        if layer is None:
            linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise ConfigError("the classifier has no nn.Linear layer; name the feature layer with layer=...")
            layer = linears[-1]
        if layer not in names:
            raise ConfigError(f"unknown layer {layer!r}; the classifier's modules are {list(names)[:20]} ...")
        self.layer = layer
        self._module = names[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = {}

        def hook(_module, inputs):
            store["features"] = inputs[0]

        handle = self._module.register_forward_pre_hook(hook)
        try:
            self.classifier(x)
        finally:
            handle.remove()
        return store["features"].flatten(1)


class BoxToUnit(nn.Module):
    """x -> (x - low) / (high - low) per feature: the box [low, high] onto [0, 1] (the reference's solver space).

    A feature with high == low (constant in the data) is only shifted, so nothing divides by zero.
    """

    def __init__(self, low, high):
        super().__init__()
        low, high = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
        if (high < low).any():
            raise ConfigError("the box has low > high somewhere")
        self.register_buffer("low", low)
        self.register_buffer("width", torch.where(high > low, high - low, torch.ones_like(high)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return (x - self.low.to(x)) / self.width.to(x)


def _stack(arrays: list[np.ndarray], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class arrays (n_c, ...) padded into one (K, n_max, ...) tensor, and the (K, n_max) mask of real rows."""
    n_max = max(len(a) for a in arrays)
    out = np.full((len(arrays), n_max, *arrays[0].shape[1:]), fill, dtype=np.float64)
    mask = np.zeros((len(arrays), n_max), dtype=bool)
    for c, a in enumerate(arrays):
        out[c, :len(a)], mask[c, :len(a)] = a, True
    return torch.from_numpy(out), torch.from_numpy(mask)


class Density(nn.Module):
    """Base class: per-class density models, fitted once (``fit``), evaluated per sample in torch.

    The per-class parameters are stacked (padded) into tensors indexed by class, so a batch is evaluated
    without a loop over classes: each sample gathers its own class's parameters.
    """

    def __init__(self, features: nn.Module | None = None):
        super().__init__()
        self.features = features
        self.num_classes = 0

    # -- fitting ------------------------------------------------------------------------
    def _feats(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        if self.features is None:
            return x.flatten(1)
        with torch.no_grad():
            return torch.cat([self.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1) if self.features is not None else x.flatten(1)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> Density:
        """Fit one model per class on the training points ``x`` (N, ...) with labels ``y`` (N,)."""
        x = torch.as_tensor(x)
        feats = self._feats(x if x.is_floating_point() else x.float()).detach().double().cpu().numpy()
        y = torch.as_tensor(y).long().cpu().numpy()
        self.num_classes = int(y.max()) + 1
        per_class = []
        self._start_fit(len(y))
        with threadpool_limits(limits=1):  # deterministic and faster on small data
            for c in range(self.num_classes):
                rows = np.flatnonzero(y == c)
                if len(rows) < 2:
                    raise ConfigError(f"class {c} has {len(rows)} training point(s); a density needs at least 2")
                per_class.append(self._fit_class(c, feats[rows], rows))
        self._register(per_class)
        return self

    def _start_fit(self, n_rows: int) -> None:
        """Called once before the classes are fitted in turn (state shared by the classes: folds, generators)."""

    def _fit_class(self, c: int, points: np.ndarray, rows: np.ndarray) -> dict:
        """Fit class ``c`` on its ``points``, rows ``rows`` of the training set."""
        raise NotImplementedError

    def _register(self, per_class: list[dict]) -> None:
        raise NotImplementedError

    def _check(self, y: torch.Tensor) -> None:
        if not self.num_classes:
            raise ConfigError(f"{type(self).__name__} is not fitted; call .fit(x, y) (or build it with "
                              f"equidiff.attacks.density.fitted)")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(f"class {int(y.max())} has no density model (fitted classes: 0..{self.num_classes - 1})")

    # -- evaluation ---------------------------------------------------------------------
    def _log_density(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(x_b, y_b) for every sample b (differentiable in x)."""
        self._check(y)
        return self._log_density(self._features(x), y.long())

    def bind(self, x0: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x' -> log q(x', y), the plausibility of the problem (x0, y) that a solver optimises."""
        self._check(y)
        return lambda x: self(x, y)


REFERENCE_BANDWIDTHS = (0.01, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)  # SCFE Models.train_kde
KDE_RULES, NORMALISERS, GMM_FITS = ("reference", "gridsearch"), ("reference", "density"), ("reference", "sklearn")


def kde_log_density(points: torch.Tensor, query: torch.Tensor, h: float, normaliser: str = "reference",
                    chunk: int = 2 ** 22) -> torch.Tensor:
    """log q(query) of the Gaussian KDE on ``points`` (n, d), from the direct differences, as the reference.

    normaliser "reference": - log(n h sqrt(2 pi)) (SCFE ``GaussianKDE``); "density": - log n - d/2 log(2 pi h^2).
    """
    n, d = points.shape
    rows = max(1, chunk // max(1, n * d))  # query rows per block: bounded memory for big feature spaces
    out = []
    for i in range(0, len(query), rows):
        norms = torch.sum((query[i:i + rows, None, :] - points[None]) ** 2, dim=-1)
        out.append(torch.logsumexp(-1. * norms / (2 * h ** 2), dim=-1))
    lse = torch.cat(out) if out else query.new_zeros(0)
    if normaliser == "reference":
        return lse - math.log(n * h * math.sqrt(2 * math.pi))
    return lse - math.log(n) - d / 2 * math.log(2 * math.pi * h * h)


def _best(points: torch.Tensor, val: torch.Tensor, grid: Sequence[float], normaliser: str) -> float:
    """The first grid bandwidth with the highest mean validation log-density (the reference's grid_search)."""
    scores = [kde_log_density(points, val, float(h), normaliser).mean().item() for h in grid]
    return float(grid[scores.index(max(scores))])


def reference_bandwidth(points: torch.Tensor, rows: np.ndarray, n_rows: int, *, n_folds: int = 5, steps: int = 20,
                        seed: int = 42, grid: Sequence[float] = REFERENCE_BANDWIDTHS,
                        normaliser: str = "reference") -> float:
    """The reference's cross-validated bandwidth of one class (SCFE ``train_n_kdes`` / ``train_kde``).

    The folds split all ``n_rows`` training rows (every class), and ``points`` are the rows ``rows`` of this
    class. In each fold: the best of ``grid`` on the class's validation rows, then the best of
    ``steps`` evenly spaced values from half to twice it; the bandwidth is the mean of the fold winners.
    """
    winners = []
    for fold, (train, val) in enumerate(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros(n_rows))):
        tr, va = np.isin(rows, train), np.isin(rows, val)
        if tr.sum() == 0 or va.sum() == 0:
            part = "training" if tr.sum() == 0 else "validation"
            raise ConfigError(f"a class with {len(rows)} training rows has no {part} row in cross-validation fold "
                              f"{fold + 1}/{n_folds}; give the class more rows or set a fixed bandwidth")
        coarse = _best(points[tr], points[va], grid, normaliser)
        fine = torch.linspace(coarse / 2, coarse * 2, steps, dtype=torch.float64).tolist()
        winners.append(_best(points[tr], points[va], fine, normaliser))
    return sum(winners) / n_folds


class KDEDensity(Density):
    """Gaussian KDE per class (normaliser and bandwidth rule: see the module docstring).

    Args:
        bandwidth: a fixed bandwidth h, or None to choose it per class by ``rule``.
        rule: "reference" (SCFE's fold-wise grid, the default) or "gridsearch" (``GridSearchCV`` with the true
            density over ``bandwidths``, default 31 values from 0.01 to 10 times the class's root-mean feature
            variance).
        normaliser: "reference" (log(n h sqrt(2 pi)), SCFE's) or "density" (the true density).
        cv, steps, cv_seed: folds, fine-grid points and the KFold seed of the reference rule.
    """

    def __init__(self, bandwidth: float | None = None, rule: str = "reference", normaliser: str = "reference",
                 bandwidths=None, cv: int = 5, steps: int = 20, cv_seed: int = 42, features: nn.Module | None = None):
        super().__init__(features)
        if rule not in KDE_RULES:
            raise ConfigError(f"unknown KDE bandwidth rule {rule!r}; choose one of {list(KDE_RULES)}")
        if normaliser not in NORMALISERS:
            raise ConfigError(f"unknown KDE normaliser {normaliser!r}; choose one of {list(NORMALISERS)}")
        if rule == "gridsearch" and normaliser != "density":
            raise ConfigError("rule=gridsearch scores bandwidths by scikit-learn's true density; "
                              "set normaliser=density")
        self.bandwidth, self.rule, self.normaliser, self.bandwidths = bandwidth, rule, normaliser, bandwidths
        self.cv, self.steps, self.cv_seed = int(cv), int(steps), int(cv_seed)
        self.h: dict[int, float] = {}

    def _start_fit(self, n_rows: int) -> None:
        self._n_rows = n_rows

    def _fit_class(self, c: int, points: np.ndarray, rows: np.ndarray) -> dict:
        if self.bandwidth is not None:
            h = float(self.bandwidth)
        elif self.rule == "reference":
            grid = self.bandwidths if self.bandwidths is not None else REFERENCE_BANDWIDTHS
            h = reference_bandwidth(torch.from_numpy(points), rows, self._n_rows, n_folds=self.cv, steps=self.steps,
                                    seed=self.cv_seed, grid=grid, normaliser=self.normaliser)
        else:
            scale = float(np.sqrt(points.var(0).mean())) or 1.0
            grid = np.asarray(self.bandwidths if self.bandwidths is not None else np.logspace(-2, 1, 31) * scale)
            search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": grid},
                                  cv=min(self.cv, len(points)))
            h = float(search.fit(points).best_params_["bandwidth"])
        self.h[c] = h
        return {"points": points, "h": h}

    def _register(self, per_class: list[dict]) -> None:
        points, mask = _stack([p["points"] for p in per_class])
        self.register_buffer("points", points)
        self.register_buffer("mask", mask)
        self.register_buffer("bw", torch.tensor([p["h"] for p in per_class], dtype=torch.float64))
        self.register_buffer("count", mask.sum(1).double())

    def _log_density(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pts = self.points.to(f.dtype)  # (K, n, d)
        k, n, d = pts.shape
        cross = (f @ pts.reshape(k * n, d).T).reshape(len(f), k, n)[torch.arange(len(f)), y]  # f . p for p in class y
        d2 = (f * f).sum(1, keepdim=True) - 2 * cross + (pts * pts).sum(-1)[y]
        h = self.bw.to(f.dtype)[y]
        logits = (-d2.clamp_min(0) / (2 * h * h)[:, None]).masked_fill(~self.mask[y], float("-inf"))
        log_norm = torch.log(h * math.sqrt(2 * math.pi)) if self.normaliser == "reference" else \
            d / 2 * torch.log(2 * math.pi * h * h)
        return torch.logsumexp(logits, dim=1) - self.count.to(f.dtype)[y].log() - log_norm


def gmm_candidates(k: int) -> list[int]:
    """The numbers of components the reference's k-means tries: round(linspace(ceil(k/2), ceil(3k/2), 10))."""
    return torch.unique(torch.linspace(math.ceil(k * 0.5), math.ceil(k * 1.5), 10).round().int()).tolist()


def reference_kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50
                     ) -> tuple[torch.Tensor, int]:
    """(centroids, K) of the reference's k-means (SCFE ``GaussianMixture.K_means``).

    For every K in round(linspace(ceil(k/2), ceil(3k/2), 10)) (distinct values, ascending): ``iters`` Lloyd
    steps from K distinct training points drawn by ``randperm``, a centroid without points staying put;
    its score is the mean squared distance to the nearest centroid in the last step (before its update).
    The lowest score wins, the smaller K on ties.
    """
    n, d = x.shape
    candidates = gmm_candidates(k)
    if candidates[-1] > n:
        raise ConfigError(f"a class has {n} training points, fewer than the largest candidate number of GMM "
                          f"components {candidates[-1]} (ceil(1.5 n_components)); lower n_components")
    best, best_score = None, float("inf")
    for kk in candidates:
        centroids = x[torch.randperm(n, generator=generator)[:kk], :].clone()
        for _ in range(iters):
            dists = ((x.view(n, 1, d) - centroids.view(1, kk, d)) ** 2).sum(-1)
            closest = dists.argmin(dim=1).view(-1)
            for j in range(kk):
                members = x[closest == j]
                if len(members):
                    centroids[j] = members.mean(0)
        score = dists.min(dim=1).values.mean().item()
        if score < best_score:
            best, best_score = (centroids, kk), score
    return best


def diag_gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x_n; mu_k, diag var_k) as (N, K): -1/2 (d log 2 pi + sum log var + sum (mu - x)^2 / var)."""
    log_det = torch.sum(torch.log(var), dim=-1)
    log_p = torch.sum((mu[None] - x[:, None, :]) ** 2 / var[None], dim=-1)
    return -.5 * (x.shape[1] * np.log(2 * np.pi) + log_det + log_p)


def reference_em(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, pi: torch.Tensor, rand: random.Random, *,
                 iters: int = 100, eps: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(mu, var, pi, steps) after the reference's EM (SCFE ``GaussianMixture.fit``) from (mu, var, pi).

    Each step: E step, then pi_k = N_k / N (N_k below 1e-6 read as 1e-6), mu_k, var_k = E[x^2] - mu_k^2 under
    the responsibilities; a component with a variance <= 1e-6 restarts at a training point drawn by
    ``rand.randint`` with variances 2; the loop stops after the first step whose mean log-likelihood gains
    less than ``eps`` (so at least two steps), or after ``iters``.
    """
    n = len(x)
    ll, steps = -math.inf, 0
    for _ in range(iters):
        steps += 1
        weighted = diag_gaussian_log_prob(x, mu, var) + torch.log(pi)  # 1. E step
        belief = torch.exp(weighted - torch.logsumexp(weighted, dim=1, keepdim=True))
        nk = belief.sum(0)  # 2. M step
        nk = torch.where(nk.abs() < 1e-6, torch.full_like(nk, 1e-6), nk)
        pi = nk / n
        mu = torch.sum(belief[:, :, None] * x[:, None, :], dim=0) / nk[:, None]
        x2 = torch.sum(belief[:, :, None] * x[:, None, :] ** 2, dim=0)
        xmu = torch.sum(belief[:, :, None] * x[:, None, :] * mu[None], dim=0)
        var = (x2 - 2 * xmu) / nk[:, None] + mu ** 2
        for j in torch.nonzero((var <= 1e-6).any(1))[:, 0].tolist():  # 3. restart collapsed components
            mu[j] = x[rand.randint(0, n - 1)]
            var[j] = 2.0
        new = torch.logsumexp(diag_gaussian_log_prob(x, mu, var) + torch.log(pi), dim=1).mean().item()
        gain, ll = new - ll, new
        if gain < eps:
            break
    return mu, var, pi, steps


class GMMDensity(Density):
    """Gaussian mixture per class, log-likelihood in torch (fitting: see the module docstring).

    Args:
        n_components: "reference": the centre K of the candidate numbers of components (5 in the reference's
            tabular runs, 10 for MNIST); "sklearn": the number of components (at most the class's points).
        fit: "reference" (SCFE's k-means + EM, diagonal) or "sklearn" (``GaussianMixture``).
        covariance_type: "diag" or "full" (sklearn only; the reference's is diagonal).
        reg_covar: added to the variances (sklearn only); keeps a feature that is constant within a class from
            making the density (and its gradient) explode.
        random_state: the seed of the k-means draws and restarts (reference) or of scikit-learn's k-means.
    """

    def __init__(self, n_components: int = 5, fit: str = "reference", covariance_type: str = "diag",
                 reg_covar: float = 1e-3, random_state: int = 0, features: nn.Module | None = None):
        super().__init__(features)
        if fit not in GMM_FITS:
            raise ConfigError(f"unknown GMM fit {fit!r}; choose one of {list(GMM_FITS)}")
        if covariance_type not in ("diag", "full"):
            raise ConfigError(f"covariance_type must be 'diag' or 'full', got {covariance_type!r}")
        if fit == "reference" and covariance_type != "diag":
            raise ConfigError("the reference's GMM is diagonal; use fit=sklearn for covariance_type=full")
        if int(n_components) < 1:
            raise ConfigError(f"n_components must be >= 1, got {n_components}")
        self.n_components, self.fit_rule, self.covariance_type = int(n_components), fit, covariance_type
        self.reg_covar, self.random_state = float(reg_covar), int(random_state)
        self.components: dict[int, int] = {}

    def _start_fit(self, n_rows: int) -> None:
        self._generator = torch.Generator().manual_seed(self.random_state)
        self._rand = random.Random(self.random_state)

    def _fit_class(self, c: int, points: np.ndarray, rows: np.ndarray) -> dict:
        if self.fit_rule == "reference":
            x = torch.from_numpy(points)
            mu, k = reference_kmeans(x, self.n_components, self._generator)
            var = torch.full((k, x.shape[1]), 5.0, dtype=x.dtype)
            pi = torch.full((k,), 1.0 / k, dtype=x.dtype)
            mu, var, pi, _ = reference_em(x, mu, var, pi, self._rand)
            self.components[c] = k
            return {"log_w": torch.log(pi).numpy(), "means": mu.numpy(), "prec_chol": (1 / var.sqrt()).numpy()}
        gmm = GaussianMixture(n_components=min(self.n_components, len(points)), covariance_type=self.covariance_type,
                              reg_covar=self.reg_covar, random_state=self.random_state).fit(points)
        self.components[c] = gmm.n_components
        # precisions_cholesky_ P: (C, d) diag, (C, d, d) full; log N = -d/2 log 2pi + log|P| - 1/2 ||P^T (x - mu)||^2
        return {"log_w": np.log(gmm.weights_), "means": gmm.means_, "prec_chol": gmm.precisions_cholesky_}

    def _register(self, per_class: list[dict]) -> None:
        log_w, _ = _stack([p["log_w"] for p in per_class], fill=-np.inf)  # padded components weigh nothing
        means, _ = _stack([p["means"] for p in per_class])
        d = means.shape[-1]
        fill = np.ones(d) if self.covariance_type == "diag" else np.eye(d)
        n_max = log_w.shape[1]
        prec = [np.concatenate([p["prec_chol"], np.broadcast_to(fill, (n_max - len(p["log_w"]), *fill.shape))])
                for p in per_class]
        self.register_buffer("log_w", log_w)
        self.register_buffer("means", means)
        self.register_buffer("prec_chol", torch.from_numpy(np.stack(prec)))

    def _log_density(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_w, mu, pc = (t.to(f.dtype)[y] for t in (self.log_w, self.means, self.prec_chol))
        d = f.shape[1]
        diff = f[:, None, :] - mu  # (B, C, d)
        if self.covariance_type == "diag":
            maha = ((diff * pc) ** 2).sum(-1)
            log_det = pc.log().sum(-1)
        else:
            maha = (torch.einsum("bkd,bkde->bke", diff, pc) ** 2).sum(-1)
            log_det = torch.diagonal(pc, dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * d * math.log(2 * math.pi) + log_det - 0.5 * maha
        return torch.logsumexp(log_w + log_n, dim=1)


class KNNDensity(Density):
    """Density gravity (the reference's S-CFE kNN variant): q(x') = -||x' - g(x0, y)||^2.

    g(x0, y) = sum_j a_j p_j over the k nearest class-y training points p_j of the original x0, with
    a_j proportional to the local density of p_j, k / (sum of distances to its k nearest class-y points).
    ``forward(x, y)`` anchors at x itself (the plausibility of a finished counterfactual).
    """

    def __init__(self, k: int = 3, features: nn.Module | None = None):
        super().__init__(features)
        self.k = int(k)
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.nn: dict[int, NearestNeighbors] = {}

    def _fit_class(self, c: int, points: np.ndarray, rows: np.ndarray) -> dict:
        if len(points) < self.k:
            raise ConfigError(f"class {c} has {len(points)} training points, fewer than k={self.k}; lower k")
        nbrs = NearestNeighbors(n_neighbors=self.k).fit(points)
        dist = nbrs.kneighbors(points)[0]  # the point itself is its first neighbour, as in the reference
        self.nn[c] = nbrs
        return {"points": points, "local_density": self.k / np.maximum(dist.sum(1), 1e-12)}

    def _register(self, per_class: list[dict]) -> None:
        points, _ = _stack([p["points"] for p in per_class])
        dens, _ = _stack([p["local_density"] for p in per_class])
        self.register_buffer("points", points)
        self.register_buffer("local_density", dens)

    def anchors(self, f0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g for every sample, from its features ``f0`` (B, d) and class ``y``."""
        rows = np.zeros((len(f0), self.k), dtype=np.int64)
        f_np, y_np = f0.detach().double().cpu().numpy(), y.cpu().numpy()
        with threadpool_limits(limits=1):
            for c in np.unique(y_np):  # scikit-learn's neighbour search, one tree per class
                sel = y_np == c
                rows[sel] = self.nn[int(c)].kneighbors(f_np[sel], return_distance=False)
        idx = torch.from_numpy(rows).to(f0.device)
        pts, dens = self.points.to(f0)[y[:, None], idx], self.local_density.to(f0)[y[:, None], idx]  # (B, k, d)
        a = dens / dens.sum(1, keepdim=True)
        return (pts * a[..., None]).sum(1)

    def _log_density(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -((f - self.anchors(f, y)) ** 2).sum(1)

    def bind(self, x0: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        self._check(y)
        with torch.no_grad():
            g = self.anchors(self._features(x0), y.long())
        return lambda x: -((self._features(x) - g) ** 2).sum(1)


DENSITIES = {"kde": KDEDensity, "gmm": GMMDensity, "knn": KNNDensity}


def make_density(kind: str, **kwargs) -> Density:
    """A density by name: "kde", "gmm" or "knn" (unfitted)."""
    if kind not in DENSITIES:
        raise ConfigError(f"unknown density {kind!r}; choose one of {list(DENSITIES)}")
    return DENSITIES[kind](**kwargs)


SPACES = ("data", "unit")


def fitted(density: Density | str, datamodule, split: str = "train", key: str | None = None, space: str = "data",
           **kwargs) -> Density:
    """``density`` (an object, or a name for ``make_density`` with ``kwargs``) fitted on a DataModule split.

    ``space``: "data" fits and evaluates the density on the inputs as they are; "unit" on the inputs mapped
    through the DataModule's ``box`` onto [0, 1] (``BoxToUnit``; the reference's kNN term).
    Hydra: ``{_target_: equidiff.attacks.density.fitted, density: kde, datamodule: ${data}}``.
    """
    from equidiff.data.tabular import split_arrays

    if space not in SPACES:
        raise ConfigError(f"unknown density space {space!r}; choose one of {list(SPACES)}")
    if space == "unit":
        if not isinstance(density, str) or "features" in kwargs:
            raise ConfigError("space=unit sets the features itself (BoxToUnit); give a density name and no features")
        if getattr(datamodule, "box", None) is None:
            raise ConfigError(f"space=unit needs a DataModule with a box; {type(datamodule).__name__} has none")
        kwargs["features"] = BoxToUnit(*datamodule.box)
    if isinstance(density, str):
        density = make_density(density, **kwargs)
    elif kwargs:
        raise ConfigError(f"density settings {sorted(kwargs)} are only used with a density name")
    x, y = split_arrays(datamodule, split, key)
    return density.fit(x, y)
