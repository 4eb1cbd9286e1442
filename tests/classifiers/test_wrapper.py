"""The Classifier wrapper: range mapping, normalisation, shape checks, gradients."""

import pytest
import torch
from torch import nn

from equidiff.classifiers import MLP, Classifier
from equidiff.errors import ConfigError


class Recorder(nn.Module):
    """Identity that remembers what it was given."""

    def forward(self, x):
        self.seen = x
        return x


class Head(nn.Module):
    """Mean-pools the image and returns ``k`` logits (channel means, repeated)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.mean((2, 3)).repeat(1, self.k)[:, : self.k]


def hand_input():
    """One 3-channel 2x2 image with values -1, 0, 0.5, 1 in every channel."""
    return torch.tensor([[-1.0, 0.0], [0.5, 1.0]]).expand(1, 3, 2, 2).clone()


def test_range_mapping_and_normalisation_exact_values():
    clf = Classifier(nn.Identity(), input_range=(0, 1), mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0))
    out = clf(hand_input())
    x01 = torch.tensor([[0.0, 0.5], [0.75, 1.0]])
    torch.testing.assert_close(out[0, 0], (x01 - 0.5) / 0.5, rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], (x01 - 0.25) / 0.5, rtol=0, atol=0)
    torch.testing.assert_close(out[0, 2], x01 / 2.0, rtol=0, atol=0)
    assert out[0, 0, 0, 0] == -1.0 and out[0, 0, 1, 1] == 1.0


@pytest.mark.parametrize("input_range, expected", [
    ((-1, 1), [[-1.0, 0.0], [0.5, 1.0]]),
    ((0, 255), [[0.0, 127.5], [191.25, 255.0]]),
])
def test_range_mapping_without_normalisation(input_range, expected):
    out = Classifier(nn.Identity(), input_range=input_range)(hand_input())
    torch.testing.assert_close(out[0, 1], torch.tensor(expected), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="low < high"):
        Classifier(nn.Identity(), input_range=(1, 0))
    with pytest.raises(ConfigError, match="both mean and std"):
        Classifier(nn.Identity(), mean=(0.5,))
    with pytest.raises(ValueError, match="NCHW"):
        Classifier(nn.Identity(), channels=3)(torch.zeros(2, 3))


def test_check_compatible_channels():
    clf = Classifier(nn.Identity(), channels=3)
    clf.check_compatible((3, 8, 8))
    with pytest.raises(ConfigError, match="3-channel.*1-channel.*gray_to_rgb=true"):
        clf.check_compatible((1, 8, 8))
    with pytest.raises(ConfigError, match="3-channel.*4-channel.*matching") as err:
        clf(torch.zeros(1, 4, 8, 8))
    assert "gray_to_rgb" not in str(err.value)


def test_check_compatible_size():
    clf = Classifier(nn.Identity(), channels=3, image_size=32)
    clf.check_compatible((3, 32, 32))
    with pytest.raises(ConfigError, match="32x32.*8x8.*resize=true"):
        clf(torch.zeros(1, 3, 8, 8))
    Classifier(nn.Identity(), image_size=(32, 16), resize=True).check_compatible((3, 8, 8))


def test_resize_path():
    rec = Recorder()
    clf = Classifier(rec, input_range=(0, 1), channels=3, image_size=16, resize=True)
    x = torch.full((2, 3, 8, 8), 0.5)
    out = clf(x)
    assert out.shape == (2, 3, 16, 16) and rec.seen.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 0.75))  # a constant image stays constant


def test_gray_to_rgb():
    rec = Recorder()
    clf = Classifier(rec, input_range=(-1, 1), channels=3, gray_to_rgb=True)
    x = torch.randn(2, 1, 4, 4).clamp(-1, 1)
    out = clf(x)
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        torch.testing.assert_close(out[:, c], x[:, 0])
    clf.check_compatible((1, 4, 4))


def test_wrong_num_classes():
    Classifier(Head(10), num_classes=10)(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ConfigError, match="returned 5 logits, expected num_classes=10"):
        Classifier(Head(5), num_classes=10)(torch.zeros(2, 3, 4, 4))


def test_gradients_reach_the_input():
    std = torch.tensor([0.5, 0.25, 2.0])
    clf = Classifier(nn.Identity(), input_range=(0, 1), mean=(0.1, 0.2, 0.3), std=tuple(std.tolist()))
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(clf(x).sum(), x)
    # d/dx ((x + 1) / 2 - mean) / std = 1 / (2 std)
    torch.testing.assert_close(grad, (0.5 / std).reshape(1, 3, 1, 1).expand_as(x))


def test_gradients_through_resize_and_gray_to_rgb():
    clf = Classifier(Head(3), channels=3, image_size=8, resize=True, gray_to_rgb=True, num_classes=3,
                     mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    x = torch.rand(2, 1, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(clf(x).sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_net_is_put_in_eval_mode():
    net = nn.Sequential(nn.BatchNorm2d(3)).train()
    assert not Classifier(net).net.training


def test_vector_inputs_for_a_feature_classifier():
    torch.manual_seed(0)
    mlp = MLP()
    clf = Classifier(mlp, input_range=(-1, 1), num_classes=2)
    x = torch.rand(4, 2) * 2 - 1
    torch.testing.assert_close(clf(x), mlp(x))
    with pytest.raises(ValueError, match="NCHW"):  # images-only classifiers still refuse vectors
        Classifier(mlp, input_range=(-1, 1), channels=1)(x)
