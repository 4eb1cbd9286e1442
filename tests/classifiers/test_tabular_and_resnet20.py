"""scikit-learn classifiers as torch modules (equal logits), and ResNet-20 (architecture, weight layout)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from equidiff.classifiers.resnet_cifar import load_resnet20, resnet20
from equidiff.classifiers.tabular import logistic_regression, mlp
from equidiff.data.tabular import TabularDataModule, split_arrays
from equidiff.errors import ConfigError


@pytest.fixture(scope="module")
def wine():
    dm = TabularDataModule(dataset="wine")
    return dm, split_arrays(dm, "train"), split_arrays(dm, "test")


def test_logistic_regression_equals_scikit_learn(wine):
    dm, (x, y), (xt, yt) = wine
    clf = logistic_regression(dm)
    with threadpool_limits(limits=1):
        ref = LogisticRegression(max_iter=5000).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(clf(xt).detach().numpy(), ref.decision_function(xt.double().numpy()), atol=1e-4)
    assert (clf(xt).argmax(-1) == yt).float().mean() > 0.9


def test_mlp_equals_scikit_learn(wine):
    dm, (x, y), (xt, yt) = wine
    clf = mlp(dm, hidden=(20, 20))
    with threadpool_limits(limits=1):
        ref = MLPClassifier((20, 20), max_iter=2000, random_state=0).fit(x.double().numpy(), y.numpy())
    probs = clf(xt).softmax(-1).detach().numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(xt.double().numpy()), atol=1e-4)
    assert (clf(xt).argmax(-1) == yt).float().mean() > 0.9
    with pytest.raises(ConfigError, match="hidden layer"):
        mlp(dm, hidden=())


def test_resnet20_architecture():
    net = resnet20()
    assert sum(p.numel() for p in net.parameters()) == 269_722  # "0.27 M" in He et al. (2016), Table 6
    keys = set(net.state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.running_var", "linear.weight"} <= keys
    assert not any("shortcut" in k for k in keys)  # option A shortcuts have no parameters
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_load_resnet20_reads_a_data_parallel_state_dict(tmp_path):
    torch.manual_seed(0)
    net = resnet20().eval()
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    clf = load_resnet20(tmp_path / "w.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(clf(x), net(x))  # [-1, 1] images go in unchanged (GSE's normalisation)
    with pytest.raises(ConfigError, match="weights not found"):
        load_resnet20(tmp_path / "missing.pt")
