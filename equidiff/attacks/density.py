"""Plausibility terms q(x', y~) of S-CFE (seed 001, eq. 12): per-class densities fitted with scikit-learn,
evaluated differentiably in torch.

* ``KDEDensity``: a Gaussian kernel density per class (scikit-learn ``KernelDensity``), the bandwidth chosen
  per class by 5-fold cross-validated log-likelihood (the reference grid-searches it the same way).
* ``GMMDensity``: a Gaussian mixture per class (scikit-learn ``GaussianMixture``, k-means initialisation,
  diagonal covariances as in the reference, or full ones).
* ``KNNDensity``: the reference's "density gravity": the anchor g is the convex combination of the k nearest
  target-class training points of the original x, weighted by their local densities k / sum of distances
  to their own k nearest neighbours, and q(x') = -||x' - g||^2.

All three work in input space (tabular data) or in a feature space: ``features`` maps inputs to features
(e.g. ``ClassifierFeatures``, the input of the classifier's last layer) before fitting and evaluating.
``forward(x, y)`` is log q(x, y) per sample; ``bind(x0, y)`` gives the function x' -> q(x', y) a solver
optimises for the problem (x0, y) (only the kNN anchor depends on x0). Evaluation is per sample: a
sample's value does not depend on its batch-mates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
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
        with threadpool_limits(limits=1):  # deterministic and faster on small data
            for c in range(self.num_classes):
                pts = feats[y == c]
                if len(pts) < 2:
                    raise ConfigError(f"class {c} has {len(pts)} training point(s); a density needs at least 2")
                per_class.append(self._fit_class(c, pts))
        self._register(per_class)
        return self

    def _fit_class(self, c: int, points: np.ndarray) -> dict:
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


class KDEDensity(Density):
    """Gaussian KDE per class: log q(x) = logsumexp_i(-||x - p_i||^2 / (2 h^2)) - log n - d/2 log(2 pi h^2).

    Args:
        bandwidth: a fixed bandwidth h, or None to choose it per class by ``cv``-fold cross-validated
            log-likelihood over ``bandwidths`` (default: 31 values from 0.01 to 10 times the class's
            root-mean feature variance).
    """

    def __init__(self, bandwidth: float | None = None, bandwidths=None, cv: int = 5,
                 features: nn.Module | None = None):
        super().__init__(features)
        self.bandwidth, self.bandwidths, self.cv = bandwidth, bandwidths, int(cv)
        self.h: dict[int, float] = {}

    def _fit_class(self, c: int, points: np.ndarray) -> dict:
        if self.bandwidth is not None:
            h = float(self.bandwidth)
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
        return torch.logsumexp(logits, dim=1) - self.count.to(f.dtype)[y].log() - d / 2 * torch.log(2 * math.pi * h * h)


class GMMDensity(Density):
    """Gaussian mixture per class (scikit-learn ``GaussianMixture``, k-means init), log-likelihood in torch.

    Args:
        n_components: components per class (at most the class's number of points).
        covariance_type: "diag" (the reference's choice) or "full".
        reg_covar: added to the variances; keeps a feature that is constant within a class from making the
            density (and its gradient) explode.
    """

    def __init__(self, n_components: int = 5, covariance_type: str = "diag", reg_covar: float = 1e-3,
                 random_state: int = 0, features: nn.Module | None = None):
        super().__init__(features)
        if covariance_type not in ("diag", "full"):
            raise ConfigError(f"covariance_type must be 'diag' or 'full', got {covariance_type!r}")
        self.n_components, self.covariance_type = int(n_components), covariance_type
        self.reg_covar, self.random_state = float(reg_covar), int(random_state)

    def _fit_class(self, c: int, points: np.ndarray) -> dict:
        gmm = GaussianMixture(n_components=min(self.n_components, len(points)), covariance_type=self.covariance_type,
                              reg_covar=self.reg_covar, random_state=self.random_state).fit(points)
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

    def _fit_class(self, c: int, points: np.ndarray) -> dict:
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


def fitted(density: Density | str, datamodule, split: str = "train", key: str | None = None, **kwargs) -> Density:
    """``density`` (an object, or a name for ``make_density`` with ``kwargs``) fitted on a DataModule split.

    Hydra: ``{_target_: equidiff.attacks.density.fitted, density: kde, datamodule: ${data}}``.
    """
    from equidiff.data.tabular import split_arrays

    if isinstance(density, str):
        density = make_density(density, **kwargs)
    elif kwargs:
        raise ConfigError(f"density settings {sorted(kwargs)} are only used with a density name")
    x, y = split_arrays(datamodule, split, key)
    return density.fit(x, y)
