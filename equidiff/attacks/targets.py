"""Target labels y~ of counterfactuals and targeted attacks (seed 001).

Rules (``TargetRule(rule=...)``):

* ``uniform``: uniformly at random among the other classes, drawn from the sample's own generator (the
  p-CFE datasets' "target labels chosen uniformly at random"; the draw depends on the sample's seed only);
* ``next``: (y + 1) mod K (the reference's MNIST targets; for two classes, the other class);
* ``fixed``: one class for every sample (``target=``); a sample of that class is an error, not skipped;
* ``untargeted``: y~ = y, for untargeted attacks (success means leaving class y);
* ``offsets``: several targets per sample, y~_j = (y + o_j) mod K, a (B, T) tensor. ``offsets=None`` is every
  other class (o = 1..K-1: GSE's CIFAR-10 protocol, "each input toward every other class"); GSE's ImageNet
  protocol uses ten fixed offsets (wagnermoritz/GSE main.py). Each offset must lie in 1..K-1, all distinct.

A targeted solver given a target equal to the true class raises a ``ConfigError``: that counterfactual
would be the input itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from equidiff.errors import ConfigError

RULES = ("uniform", "next", "fixed", "untargeted", "offsets")


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

    def __init__(self, rule: str = "uniform", num_classes: int | None = None, target: int | None = None,
                 offsets: Sequence[int] | None = None):
        if rule not in RULES:
            raise ConfigError(f"unknown target rule {rule!r}; choose one of {list(RULES)}")
        if rule == "fixed" and target is None:
            raise ConfigError("the fixed target rule needs a class: method.targets.target=<int>")
        if offsets is not None and rule != "offsets":
            raise ConfigError(f"method.targets.offsets is for the offsets rule, not {rule!r}")
        self.rule, self.num_classes, self.target = rule, num_classes, target
        self.offsets = None if offsets is None else [int(o) for o in offsets]
        if self.offsets is not None and num_classes is not None:
            self.offsets_for(num_classes)  # fail at construction when K is known

    @property
    def targeted(self) -> bool:
        return self.rule != "untargeted"

    @property
    def per_sample(self) -> int | None:
        """Targets per sample: None for the one-target rules ([B] targets), else T ([B, T] targets)."""
        if self.rule != "offsets":
            return None
        return len(self.offsets) if self.offsets is not None else (self.num_classes - 1 if self.num_classes else None)

    def offsets_for(self, k: int) -> list[int]:
        """The offsets of the ``offsets`` rule for K classes (every other class when none are given)."""
        if self.offsets is None:
            return list(range(1, k))
        bad = [o for o in self.offsets if not 1 <= o < k]
        if bad or not self.offsets:
            raise ConfigError(f"target offsets {bad or self.offsets} do not fit {k} classes: targets are "
                              f"(y + offset) mod {k}, so every offset must lie in 1..{k - 1}; give offsets for "
                              f"this dataset (method.targets.offsets=[...]) or null for every other class")
        if len(set(self.offsets)) != len(self.offsets):
            raise ConfigError(f"target offsets {self.offsets} repeat a class; give distinct offsets")
        return list(self.offsets)

    def __call__(self, labels: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                 num_classes: int | None = None) -> torch.Tensor:
        k = self.num_classes or num_classes
        if k is None or k < 2:
            raise ConfigError(f"target rules need the number of classes (>= 2), got {k}; "
                              f"set method.targets.num_classes")
        labels = labels.long()
        if self.rule == "untargeted":
            return labels.clone()
        if self.rule == "offsets":  # (B, T): each sample toward (y + o_j) mod K
            offsets = torch.tensor(self.offsets_for(k), device=labels.device)
            targets = (labels[:, None] + offsets[None, :]) % k
            check_targets(labels[:, None].expand_as(targets).reshape(-1), targets.reshape(-1), k)
            return targets
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
