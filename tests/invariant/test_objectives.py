"""Objectives L(x) of invariant sets: logits, probabilities, log-odds, energies, neurons (forward hooks)."""

import pytest
import torch

from equidiff.classifiers import load_small_net
from equidiff.errors import ConfigError
from equidiff.guidance.energies import marginal_energy
from equidiff.invariant import Energy, Logits, LogOdds, Neuron, Probabilities, as_vector


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return load_small_net("cnn", None, in_channels=1, num_classes=10, width=8, image_size=8)


@pytest.fixture
def x():
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_logits_probabilities_and_selected_classes(cnn, x):
    logits = cnn(x)
    torch.testing.assert_close(Logits(cnn)(x), logits)
    torch.testing.assert_close(Logits(cnn, classes=[2, 5])(x), logits[:, [2, 5]])
    torch.testing.assert_close(Logits(cnn, classes=4)(x), logits[:, [4]])
    torch.testing.assert_close(Probabilities(cnn, classes=[1])(x), logits.softmax(-1)[:, [1]])


def test_log_odds_are_the_logit_of_the_probabilities(cnn, x):
    p = cnn(x).double().softmax(-1)
    torch.testing.assert_close(LogOdds(cnn)(x).double(), torch.log(p / (1 - p)), atol=1e-4, rtol=1e-4)


def test_log_odds_stay_finite_and_differentiable_where_the_probability_saturates():
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[60.0, 0.0], [-60.0, 0.0]]))
        net.bias.zero_()
    pts = torch.tensor([[1.0, 0.0]], requires_grad=True)  # p(class 0) = 1 - e^-120: saturated in float32
    value = LogOdds(net, classes=[0])(pts)
    torch.testing.assert_close(value, torch.tensor([[120.0]]))  # l_0 - l_1
    value.sum().backward()
    torch.testing.assert_close(pts.grad, torch.tensor([[120.0, 0.0]]))
    assert Probabilities(net, classes=[0])(pts)[0, 0].item() == 1.0  # where p has lost its gradient


def test_energies(cnn, x):
    logits = cnn(x)
    torch.testing.assert_close(Energy(cnn)(x), marginal_energy(logits)[:, None])
    torch.testing.assert_close(Energy(cnn, kind="joint", label=3)(x), -logits[:, [3]])
    with pytest.raises(ConfigError, match="label"):
        Energy(cnn, kind="joint")
    with pytest.raises(ConfigError, match="kind"):
        Energy(cnn, kind="free")


def test_neuron_reads_a_channel_mean_a_single_neuron_and_a_linear_unit(cnn, x):
    conv = dict(cnn.named_modules())["net.features.0"]
    acts = conv(x)  # the wrapper passes [-1, 1] images through unchanged to the small CNN
    torch.testing.assert_close(Neuron(cnn, "net.features.0", channel=2)(x), acts[:, [2]].mean(dim=(2, 3)))
    torch.testing.assert_close(Neuron(cnn, "net.features.0", channel=[0, 1], position=(3, 4))(x),
                               acts[:, [0, 1], 3, 4])
    torch.testing.assert_close(Neuron(cnn, "net.features.0")(x), acts.mean(dim=(2, 3)))
    head = [n for n, m in cnn.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.testing.assert_close(Neuron(cnn, head, channel=7)(x), cnn(x)[:, [7]])


def test_neuron_hook_is_removed_and_gradients_flow(cnn, x):
    module = dict(cnn.named_modules())["net.features.0"]
    obj = Neuron(cnn, "net.features.0", channel=0)
    x = x.clone().requires_grad_(True)
    obj(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not module._forward_hooks


def test_unknown_layer_is_an_error_listing_valid_names(cnn):
    with pytest.raises(ConfigError, match=r"unknown layer 'net\.layer9'.*net\.features\.0"):
        Neuron(cnn, "net.layer9")
    with pytest.raises(ConfigError, match="unknown layer"):
        Neuron(cnn, "")


def test_channel_outside_the_layer_is_an_error(cnn, x):
    with pytest.raises(ConfigError, match="channel 99"):
        Neuron(cnn, "net.features.0", channel=99)(x)


def test_classes_outside_the_classifier_are_an_error(cnn):
    with pytest.raises(ConfigError, match="outside"):
        Logits(cnn, classes=[10])


def test_as_vector_shapes():
    assert as_vector(torch.zeros(4), 4).shape == (4, 1)
    assert as_vector(torch.zeros(4, 3), 4).shape == (4, 3)
    with pytest.raises(ConfigError, match="one vector per sample"):
        as_vector(torch.zeros(4, 3, 2), 4)
    with pytest.raises(ConfigError, match="one vector per sample"):
        as_vector(torch.zeros(3), 4)
