"""Target labels y~ of counterfactuals and targeted attacks (seed 001).

Rules (``TargetRule(rule=...)``):

* ``uniform``: uniformly at random among the other classes, drawn from the sample's own generator (the
  p-CFE datasets' "target labels chosen uniformly at random"; the draw depends on the sample's seed only);
* ``next``: (y + 1) mod K (the reference's MNIST targets; for two classes, the other class);
* ``fixed``: one class for every sample (``target=``); a sample of that class is an error, not skipped;
* ``untargeted``: y~ = y, for untargeted attacks (success means leaving class y).

A targeted solver given a target equal to the true class raises a ``ConfigError``: that counterfactual
would be the input itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from equidiff.errors import ConfigError

RULES = ("uniform", "next", "fixed", "untargeted")


def check_targets(labels: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> None:
    """Raise a ConfigError if a target equals its sample's true class or lies outside 0..K-1."""
    same = (targets == labels).nonzero()[:, 0]
    if len(same):
        raise ConfigError(f"target label equals the true class for {len(same)} sample(s) (first: position "
                          f"{int(same[0])}, class {int(labels[same[0]])}); a counterfactual needs y~ != y. Use "
                          f"method.targets.rule=uniform or next, or an untargeted solver")
    if num_classes is not None and len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ConfigError(f"target labels must lie in 0..{num_classes - 1}, got {targets.tolist()[:10]}")


class TargetRule:
    """``rule(labels, generators) -> targets``: the target label of every sample (see the module docstring)."""

    def __init__(self, rule: str = "uniform", num_classes: int | None = None, target: int | None = None):
        if rule not in RULES:
            raise ConfigError(f"unknown target rule {rule!r}; choose one of {list(RULES)}")
        if rule == "fixed" and target is None:
            raise ConfigError("the fixed target rule needs a class: method.targets.target=<int>")
        self.rule, self.num_classes, self.target = rule, num_classes, target

    @property
    def targeted(self) -> bool:
        return self.rule != "untargeted"

    def __call__(self, labels: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                 num_classes: int | None = None) -> torch.Tensor:
        k = self.num_classes or num_classes
        if k is None or k < 2:
            raise ConfigError(f"target rules need the number of classes (>= 2), got {k}; "
                              f"set method.targets.num_classes")
        labels = labels.long()
        if self.rule == "untargeted":
            return labels.clone()
        if self.rule == "next":
            targets = (labels + 1) % k
        elif self.rule == "fixed":
            targets = torch.full_like(labels, int(self.target))
        else:
            if generators is None or len(generators) != len(labels):
                raise ConfigError("the uniform target rule needs one generator per sample (generators_for(seeds))")
            # 1. a uniform offset in 1..K-1 from the sample's own generator: uniform over the other classes
            offsets = torch.cat([torch.randint(1, k, (1,), generator=g, device=g.device) for g in generators])
            targets = (labels + offsets.to(labels.device)) % k
        check_targets(labels, targets, k)
        return targets
