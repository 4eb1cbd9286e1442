"""Target-label rules: per-sample seeds, never the true class; bad input."""

import pytest
import torch

from equidiff.attacks.targets import TargetRule, check_targets
from equidiff.errors import ConfigError
from equidiff.utils.rng import generators_for


def test_uniform_targets_depend_on_the_seed_alone_and_avoid_the_true_class():
    labels = torch.arange(400) % 10
    seeds = list(range(100, 500))
    targets = TargetRule("uniform", 10)(labels, generators_for(seeds))
    assert (targets != labels).all()
    counts = torch.bincount((targets - labels) % 10, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 20).all()  # every other class drawn, roughly uniformly
    alone = torch.cat([TargetRule("uniform", 10)(labels[i:i + 1], generators_for(seeds[i:i + 1]))
                       for i in range(0, 400, 37)])
    assert torch.equal(alone, targets[::37])


def test_next_fixed_and_untargeted_rules():
    labels = torch.tensor([0, 1, 2])
    assert TargetRule("next", 3)(labels).tolist() == [1, 2, 0]
    assert TargetRule("untargeted", 3)(labels).tolist() == [0, 1, 2]
    assert TargetRule("fixed", 3, target=2)(torch.tensor([0, 1])).tolist() == [2, 2]
    assert TargetRule("untargeted").targeted is False


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="equals the true class"):
        TargetRule("fixed", 3, target=1)(torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="equals the true class"):
        check_targets(torch.tensor([4]), torch.tensor([4]))
    with pytest.raises(ConfigError, match="must lie in"):
        check_targets(torch.tensor([0]), torch.tensor([7]), num_classes=3)
    with pytest.raises(ConfigError, match="unknown target rule"):
        TargetRule("random")
    with pytest.raises(ConfigError, match="needs a class"):
        TargetRule("fixed")
    with pytest.raises(ConfigError, match="number of classes"):
        TargetRule("next")(torch.tensor([0]))
    with pytest.raises(ConfigError, match="one generator per sample"):
        TargetRule("uniform", 3)(torch.tensor([0, 1]), generators_for([0]))


def test_offsets_rule_gives_every_other_class_or_the_given_offsets():
    labels = torch.tensor([0, 3, 9])
    every = TargetRule("offsets", 10)(labels)
    assert every.shape == (3, 9)
    for y, row in zip(labels.tolist(), every.tolist(), strict=True):  # GSE's CIFAR-10 protocol: (y + 1..9) mod 10
        assert row == [(y + o) % 10 for o in range(1, 10)] and sorted(row) == [c for c in range(10) if c != y]
    fixed = TargetRule("offsets", 1000, offsets=[857, 477])(torch.tensor([200, 999]))
    assert fixed.tolist() == [[57, 677], [856, 476]]  # GSE's ImageNet offsets, (y + o) mod 1000
    assert TargetRule("offsets", 10).per_sample == 9 and TargetRule("offsets", offsets=[1, 2]).per_sample == 2
    assert TargetRule("uniform", 10).per_sample is None


def test_offsets_that_the_classes_cannot_cover_are_config_errors():
    with pytest.raises(ConfigError, match=r"do not fit 10 classes.*1\.\.9"):
        TargetRule("offsets", 10, offsets=[857, 477])
    with pytest.raises(ConfigError, match="do not fit 3 classes"):
        TargetRule("offsets", offsets=[0, 1])(torch.tensor([0]), num_classes=3)
    with pytest.raises(ConfigError, match="distinct"):
        TargetRule("offsets", 10, offsets=[1, 1])
    with pytest.raises(ConfigError, match="offsets rule"):
        TargetRule("uniform", 10, offsets=[1])
    with pytest.raises(ConfigError, match="number of classes"):
        TargetRule("offsets")(torch.tensor([0]))
