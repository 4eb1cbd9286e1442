"""Plausibility densities: the reference's (wagnermoritz/SCFE) bandwidth rule, GMM fit and normaliser, pinned
against scikit-learn and hand derivations; per sample, differentiable; bad input."""

import math
import random

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KernelDensity, NearestNeighbors
from threadpoolctl import threadpool_limits

from equidiff.attacks.density import (
    BoxToUnit,
    ClassifierFeatures,
    GMMDensity,
    KDEDensity,
    KNNDensity,
    fitted,
    gmm_candidates,
    make_density,
    reference_em,
    reference_kmeans,
)
from equidiff.classifiers import load_small_net
from equidiff.data.tabular import TabularDataModule, split_arrays
from equidiff.errors import ConfigError
from tests.attacks.common import wine


def _data(n=90, d=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 2 * y[:, None].double()
    return x, y


@pytest.mark.parametrize("normaliser", ["density", "reference"])
def test_kde_equals_scikit_learn(normaliser):
    """"density" is scikit-learn's KernelDensity; "reference" is SCFE's GaussianKDE, whose normaliser
    log(n h sqrt(2 pi)) is one-dimensional: it exceeds the true log-density by (d - 1) log(h sqrt(2 pi))."""
    x, y = _data()
    h, d = 0.7, x.shape[1]
    dens = KDEDensity(bandwidth=h, normaliser=normaliser).fit(x, y)
    q, yq = _data(12, seed=1)
    ours = dens(q, yq)
    offset = (d - 1) * math.log(h * math.sqrt(2 * math.pi)) if normaliser == "reference" else 0.0
    for c in range(3):
        ref = KernelDensity(bandwidth=h).fit(x[y == c].numpy()).score_samples(q[yq == c].numpy()) + offset
        np.testing.assert_allclose(ours[yq == c].numpy(), ref, rtol=1e-6, atol=1e-6)  # sklearn: KD-tree sums


COARSE = [0.01, 1, 5, 10, 20, 50, 100, 200, 500]  # SCFE Models.train_kde


def _fold_winner(points, train, val, grid, d):
    """GridSearchCV on one (train, val) split of one class, scored by the mean SCFE log-density."""
    def score(est, xv, _y=None):
        return est.score_samples(xv).mean() + (d - 1) * np.log(est.bandwidth * np.sqrt(2 * np.pi))

    search = GridSearchCV(KernelDensity(), {"bandwidth": list(grid)}, cv=[(train, val)], scoring=score, refit=False)
    return search.fit(points).best_params_["bandwidth"]  # ties: the first grid value, as SCFE's list.index(max)


def test_kde_bandwidth_is_the_reference_fold_wise_grid_search():
    """The rule of SCFE ``train_n_kdes``, written out with scikit-learn: KFold(5, shuffle, random_state=42) over
    all training rows; per fold and class, the best of the coarse grid, then of 20 points from half to twice it
    (the class's rows of the fold's validation part score); the bandwidth is the mean of the 5 fold winners."""
    x, y = _data(120, d=3)
    x[y == 1] *= 3
    xn, yn = x.numpy(), y.numpy()
    dens = KDEDensity().fit(x, y)
    folds = list(KFold(5, shuffle=True, random_state=42).split(xn))
    for c in range(3):
        rows = np.flatnonzero(yn == c)
        winners = []
        for train, val in folds:
            tr, va = np.flatnonzero(np.isin(rows, train)), np.flatnonzero(np.isin(rows, val))
            best = _fold_winner(xn[rows], tr, va, COARSE, 3)
            winners.append(_fold_winner(xn[rows], tr, va, np.linspace(best / 2, best * 2, 20), 3))
        assert dens.h[c] == pytest.approx(np.mean(winners), rel=1e-12)
    assert dens.h[1] > dens.h[0]  # the wider class gets the wider kernel


def test_kde_bandwidth_by_cross_validation_is_per_class():
    x, y = _data()
    x[y == 2] *= 5  # a wider class needs a wider kernel
    dens = KDEDensity().fit(x, y)
    assert dens.h[2] > dens.h[0]


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_gmm_equals_scikit_learn(cov):
    x, y = _data(150)
    dens = GMMDensity(n_components=3, fit="sklearn", covariance_type=cov, reg_covar=1e-3).fit(x, y)
    q, yq = _data(12, seed=1)
    ours = dens(q, yq)
    for c in range(3):
        with threadpool_limits(limits=1):  # as in GMMDensity.fit: the same EM iterates
            gmm = GaussianMixture(3, covariance_type=cov, reg_covar=1e-3, random_state=0).fit(x[y == c].numpy())
        np.testing.assert_allclose(ours[yq == c].numpy(), gmm.score_samples(q[yq == c].numpy()), rtol=1e-9, atol=1e-9)


def test_gmm_component_candidates_are_the_reference_range():
    # round(linspace(ceil(K / 2), ceil(3 K / 2), 10)) by hand: K = 5 -> 3, 3.56, 4.11, ..., 7.44, 8
    assert gmm_candidates(5) == [3, 4, 5, 6, 7, 8]
    # K = 10 -> 5, 6.11, 7.22, 8.33, 9.44, 10.56, 11.67, 12.78, 13.89, 15
    assert gmm_candidates(10) == [5, 6, 7, 8, 9, 11, 12, 13, 14, 15]
    assert gmm_candidates(1) == [1, 2]


def test_gmm_components_by_the_reference_kmeans_rule():
    """Written out: for each candidate K in turn, K training points drawn by randperm from one generator, 50
    Lloyd steps (an empty cluster keeps its centroid), score = mean squared distance to the nearest centroid of
    the last step's assignment; the lowest score wins (the smaller K on ties)."""
    x, _ = _data(40, d=2)
    gen = torch.Generator().manual_seed(3)
    ours, k = reference_kmeans(x, 4, gen)
    gen = torch.Generator().manual_seed(3)
    best = (math.inf, None, None)
    for kk in (2, 3, 4, 5, 6):  # gmm_candidates(4)
        c = x[torch.randperm(len(x), generator=gen)[:kk]].numpy().copy()
        pts = x.numpy()
        for _ in range(50):
            dist = ((pts[:, None, :] - c[None]) ** 2).sum(-1)
            near = dist.argmin(1)
            for j in range(kk):
                if (near == j).any():
                    c[j] = pts[near == j].mean(0)
        score = dist.min(1).mean()
        if score < best[0]:
            best = (score, kk, c)
    assert k == best[1]
    np.testing.assert_allclose(ours.numpy(), best[2], rtol=0, atol=1e-12)


def test_reference_em_equals_scikit_learn_em_from_the_same_start():
    """SCFE's EM steps are scikit-learn's diagonal EM without reg_covar, from the same start (means, variances
    5, equal weights), as long as no component collapses."""
    x, y = _data(120)
    pts = x[y == 0]
    mu0 = pts[:3].clone()
    var0, pi0 = torch.full((3, 4), 5.0, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    mu, var, pi, steps = reference_em(pts, mu0, var0, pi0, random.Random(0), iters=7, eps=-math.inf)
    assert steps == 7
    with threadpool_limits(limits=1), pytest.warns(UserWarning):  # tol 0: the 7 steps, "not converged"
        ref = GaussianMixture(3, covariance_type="diag", reg_covar=0.0, tol=0.0, max_iter=7, means_init=mu0.numpy(),
                              weights_init=pi0.numpy(), precisions_init=1 / var0.numpy()).fit(pts.numpy())
    np.testing.assert_allclose(mu.numpy(), ref.means_, rtol=1e-10)
    np.testing.assert_allclose(var.numpy(), ref.covariances_, rtol=1e-10)
    np.testing.assert_allclose(pi.numpy(), ref.weights_, rtol=1e-10)
    # the stopping rule: the first step always gains (from -inf), so a huge eps stops after exactly 2 steps
    assert reference_em(pts, mu0, var0, pi0, random.Random(0), eps=1e9)[3] == 2


def test_reference_em_restarts_a_collapsed_component_at_a_random_point():
    """A component on three identical points gets variance 0 after one step: the reference moves its mean to the
    training point random.randint(0, N - 1) draws and sets its variances to 2."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 2, generator=gen, dtype=torch.float64), torch.full((3, 2), 50.0,
                                                                                     dtype=torch.float64)])
    mu0 = torch.stack([x[0], x[20]])
    var0, pi0 = torch.full((2, 2), 5.0, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    mu, var, _, _ = reference_em(x, mu0, var0, pi0, random.Random(7), iters=1)
    assert torch.equal(mu[1], x[random.Random(7).randint(0, 22)]) and torch.equal(var[1], torch.full((2,), 2.0,
                                                                                                      dtype=var.dtype))
    assert (var[0] > 0.1).all()


def test_reference_gmm_is_seeded_by_random_state():
    x, y = _data(90)
    q, yq = _data(6, seed=2)
    a, b = GMMDensity(random_state=4).fit(x, y), GMMDensity(random_state=4).fit(x, y)
    torch.testing.assert_close(a(q, yq), b(q, yq), rtol=0, atol=0)
    assert all(3 <= a.components[c] <= 8 for c in range(3))


def test_knn_anchor_is_the_density_weighted_mean_of_the_nearest_target_points():
    x, y = _data()
    dens = KNNDensity(k=3).fit(x, y)
    x0, target = x[:2] + 0.1, torch.tensor([2, 2])
    pts = x[y == 2].numpy()
    nbrs = NearestNeighbors(n_neighbors=3).fit(pts)
    dist = nbrs.kneighbors(pts)[0]
    local = 3 / dist.sum(1)
    idx = nbrs.kneighbors(x0.numpy(), return_distance=False)
    a = local[idx] / local[idx].sum(1, keepdims=True)
    g = (pts[idx] * a[..., None]).sum(1)
    q = dens.bind(x0, target)
    np.testing.assert_allclose(q(torch.from_numpy(g)).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(q(x0).numpy(), -((x0.numpy() - g) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("kind", ["kde", "gmm", "knn"])
def test_densities_are_per_sample_and_differentiable(kind):
    x, y = _data()
    dens = make_density(kind).fit(x, y)
    q, yq = _data(4, seed=3)
    q.requires_grad_(True)
    batch = dens.bind(q.detach(), yq)(q)
    (grad,) = torch.autograd.grad(batch.sum(), q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    single = torch.cat([dens.bind(q[i:i + 1].detach(), yq[i:i + 1])(q[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-12, atol=1e-12)


def test_feature_space_density_uses_the_classifier_features():
    torch.manual_seed(0)
    clf = load_small_net("cnn", in_channels=1, num_classes=3, width=4, image_size=8).double()
    feats = ClassifierFeatures(clf)
    images = torch.rand(30, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.arange(30) % 3
    assert feats(images).shape == (30, 8)  # SmallCNN's head sees 2 * width features
    dens = KDEDensity(bandwidth=0.5, features=feats).fit(images, labels)
    direct = KDEDensity(bandwidth=0.5).fit(feats(images), labels)
    torch.testing.assert_close(dens(images[:5], labels[:5]), direct(feats(images[:5]), labels[:5]))


def test_unit_space_knn_is_the_knn_of_the_box_coordinates():
    """space=unit: the reference's kNN term lives in the box's [0, 1] coordinates (its trains / (maxs - mins))."""
    dm = TabularDataModule(dataset="wine", scaling="zscore")  # a box other than [0, 1]
    (x, y), (xt, yt) = split_arrays(dm, "train"), split_arrays(dm, "test")
    lo, hi = dm.box
    dens = fitted("knn", dm, space="unit")
    direct = KNNDensity().fit((x - lo) / (hi - lo), y)
    tgt = (yt + 1) % 3
    torch.testing.assert_close(dens.bind(xt, tgt)(xt + 0.01), direct.bind((xt - lo) / (hi - lo), tgt)(
        (xt + 0.01 - lo) / (hi - lo)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(BoxToUnit(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]))(
        torch.tensor([[2.0, 5.0]])), torch.tensor([[0.5, 3.0]]))  # a flat feature is only shifted


def test_fitted_reads_the_datamodule_training_split():
    dm, (x, y), _, _ = wine()
    dens = fitted("gmm", dm, n_components=2)
    assert dens.num_classes == 3
    torch.testing.assert_close(dens(x[:3], y[:3]), GMMDensity(n_components=2).fit(x, y)(x[:3], y[:3]))


def test_bad_density_input_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown density"):
        make_density("flow")
    x, y = _data()
    with pytest.raises(ConfigError, match="not fitted"):
        KDEDensity(bandwidth=1.0)(x, y)
    with pytest.raises(ConfigError, match="no density model"):
        KDEDensity(bandwidth=1.0).fit(x, y)(x[:1], torch.tensor([5]))
    with pytest.raises(ConfigError, match="covariance_type"):
        GMMDensity(covariance_type="tied")
    with pytest.raises(ConfigError, match="diagonal"):
        GMMDensity(covariance_type="full")
    with pytest.raises(ConfigError, match="unknown GMM fit"):
        GMMDensity(fit="em")
    with pytest.raises(ConfigError, match="lower n_components"):
        GMMDensity(n_components=30).fit(x, y)
    with pytest.raises(ConfigError, match="normaliser=density"):
        KDEDensity(rule="gridsearch")
    with pytest.raises(ConfigError, match="bandwidth rule"):
        KDEDensity(rule="silverman")
    with pytest.raises(ConfigError, match="cross-validation fold"):
        KDEDensity().fit(x[:12], torch.tensor([0] * 10 + [1] * 2))
    with pytest.raises(ConfigError, match="density space"):
        fitted("kde", None, space="pca")
    with pytest.raises(ConfigError, match="unknown layer"):
        ClassifierFeatures(load_small_net("cnn", in_channels=1, num_classes=3, width=4), layer="nope")
