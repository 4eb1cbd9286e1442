"""Objectives L(x) for invariant sets: per-sample vectors whose value a sample must match (seed 000, eq. 3.1).

IS(x*) = {x : L(x) = L(x*)}. An objective maps images (diffusion range [-1, 1], or points for toy
data) to a per-sample vector ``[B, m]``: the logits of one or several classes, softmax
probabilities, a neuron or channel of a named layer, an energy, or any callable (``_target_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, marginal_energy


def _classes(classes) -> list[int] | None:
    if classes is None:
        return None
    return [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]


class _OnClassifier(nn.Module):
    def __init__(self, classifier: nn.Module, classes: int | Sequence[int] | None = None):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.classes = _classes(classes)
        k = getattr(classifier, "num_classes", None)
        if self.classes and k is not None and (min(self.classes) < 0 or max(self.classes) >= k):
            raise ConfigError(f"objective classes {self.classes} are outside the classifier's {k} classes")

    def _select(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.classes is None else values[:, self.classes]


class Logits(_OnClassifier):
    """L(x) = f(x)[classes] (all logits when ``classes`` is None)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._select(self.classifier(x))


class Probabilities(_OnClassifier):
    """L(x) = softmax(f(x))[classes]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._select(self.classifier(x).softmax(-1))


class LogOdds(_OnClassifier):
    """L(x) = log p_c - log(1 - p_c) of the softmax probabilities p (all classes, or the listed ones).

    A monotone function of each p_c, so its level sets are those of ``Probabilities``, but it does not
    saturate: where a confident classifier has p ~ 0 or 1 the probabilities' gradient vanishes and
    Algorithm 1 stalls, while the log-odds keep a useful gradient (for two classes it is l_c - l_other).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x).float()
        classes = self.classes if self.classes is not None else list(range(logits.shape[1]))
        out = []
        for c in classes:  # log p_c - log(1 - p_c) = l_c - logsumexp_{j != c} l_j, exact even when p_c ~ 1
            others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1)
            out.append(logits[:, c] - others.logsumexp(dim=1))
        return torch.stack(out, dim=1)


class Energy(_OnClassifier):
    """L(x) = E(x) = -logsumexp f(x) (``kind="marginal"``) or E(x, y) = -f(x)[y] for ``label=y``."""

    def __init__(self, classifier: nn.Module, kind: str = "marginal", label: int | None = None):
        super().__init__(classifier)
        if kind not in ("marginal", "joint"):
            raise ConfigError(f"Energy kind must be 'marginal' or 'joint', got {kind!r}")
        if kind == "joint" and label is None:
            raise ConfigError("Energy(kind='joint') needs the class label y of E(x, y)")
        k = getattr(classifier, "num_classes", None)
        if kind == "joint" and (int(label) < 0 or (k is not None and int(label) >= k)):
            raise ConfigError(f"Energy(kind='joint'): label {label} is outside the classifier's {k} classes")
        self.kind, self.label = kind, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        if self.kind == "marginal":
            return marginal_energy(logits)[:, None]
        labels = torch.full((len(x),), int(self.label), device=x.device)
        return joint_energy(logits, labels, check=False)[:, None]  # label checked in __init__


class Neuron(nn.Module):
    """L(x) = the activation of a named layer (forward hook) at a channel, a neuron or all of it.

    Args:
        model: the network (e.g. a ``Classifier``; layer names are ``model.named_modules()`` names, such
            as ``net.layer4`` for a wrapped ResNet).
        layer: the module whose output is read. An unknown name is an error listing the valid ones.
        channel: channel index(es) of a conv layer's output [B, C, H, W] (spatial mean) or unit
            index(es) of a linear layer's output [B, C]; None keeps every channel (spatial mean).
        position: optional (h, w) to read single neurons instead of the spatial mean.
    """

    def __init__(self, model: nn.Module, layer: str, channel: int | Sequence[int] | None = None,
                 position: Sequence[int] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        modules = dict(model.named_modules())
        if layer not in modules or layer == "":
            names = [n for n in modules if n]
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise ConfigError(f"unknown layer {layer!r}; valid layer names: {shown}")
        self.layer, self.channels = layer, _classes(channel)
        self.position = tuple(position) if position is not None else None
        self._module = modules[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured = {}
        handle = self._module.register_forward_hook(lambda m, i, out: captured.__setitem__("a", out))
        try:
            self.model(x)
        finally:
            handle.remove()
        a = captured["a"]
        if isinstance(a, tuple | list):
            a = a[0]
        if a.ndim == 4:
            a = a[:, :, self.position[0], self.position[1]] if self.position else a.mean(dim=(2, 3))
        elif a.ndim != 2:
            raise ConfigError(f"layer {self.layer!r} gives activations of shape {tuple(a.shape)}; expected "
                              "[B, C, H, W] or [B, C]")
        if self.channels is not None:
            if max(self.channels) >= a.shape[1]:
                raise ConfigError(f"channel {max(self.channels)} is outside layer {self.layer!r}'s {a.shape[1]} "
                                  "channels")
            a = a[:, self.channels]
        return a


def as_vector(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """An objective's output as ``[B, m]`` (scalars per sample become m = 1); anything else is an error."""
    if values.ndim == 1 and values.shape[0] == batch_size:
        return values[:, None]
    if values.ndim != 2 or values.shape[0] != batch_size:
        raise ConfigError(f"an invariant-set objective must return one vector per sample ([B, m]); got shape "
                          f"{tuple(values.shape)} for B = {batch_size}")
    return values
