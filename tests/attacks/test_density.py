"""Plausibility densities: equal to scikit-learn's, per sample, differentiable; bad input."""

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity, NearestNeighbors
from threadpoolctl import threadpool_limits

from equidiff.attacks.density import ClassifierFeatures, GMMDensity, KDEDensity, KNNDensity, fitted, make_density
from equidiff.classifiers import load_small_net
from equidiff.errors import ConfigError
from tests.attacks.common import wine


def _data(n=90, d=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 2 * y[:, None].double()
    return x, y


def test_kde_equals_scikit_learn():
    x, y = _data()
    dens = KDEDensity(bandwidth=0.7).fit(x, y)
    q, yq = _data(12, seed=1)
    ours = dens(q, yq)
    for c in range(3):
        ref = KernelDensity(bandwidth=0.7).fit(x[y == c].numpy()).score_samples(q[yq == c].numpy())
        np.testing.assert_allclose(ours[yq == c].numpy(), ref, rtol=1e-6, atol=1e-6)  # sklearn: KD-tree sums


def test_kde_bandwidth_by_cross_validation_is_per_class():
    x, y = _data()
    x[y == 2] *= 5  # a wider class needs a wider kernel
    dens = KDEDensity().fit(x, y)
    assert dens.h[2] > dens.h[0]


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_gmm_equals_scikit_learn(cov):
    x, y = _data(150)
    dens = GMMDensity(n_components=3, covariance_type=cov, reg_covar=1e-3).fit(x, y)
    q, yq = _data(12, seed=1)
    ours = dens(q, yq)
    for c in range(3):
        with threadpool_limits(limits=1):  # as in GMMDensity.fit: the same EM iterates
            gmm = GaussianMixture(3, covariance_type=cov, reg_covar=1e-3, random_state=0).fit(x[y == c].numpy())
        np.testing.assert_allclose(ours[yq == c].numpy(), gmm.score_samples(q[yq == c].numpy()), rtol=1e-9, atol=1e-9)


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
    with pytest.raises(ConfigError, match="unknown layer"):
        ClassifierFeatures(load_small_net("cnn", in_channels=1, num_classes=3, width=4), layer="nope")
