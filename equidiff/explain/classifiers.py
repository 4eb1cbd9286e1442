"""The classifiers ACE explains and evaluates with, from local files (nothing is downloaded).

* ``load_densenet_decision``: the DenseNet-121 decision models of the seed's CelebA, CelebA-HQ and BDD
  experiments, in their released layouts: DiME/DiVE's CelebA classifier (``{"feat_extract": ...,
  "classifier": ...}``, 40 attribute logits; huggingface.co/guillaumejs2403/DiME) and STEEX's
  ``DecisionDensenetModel`` checkpoints (``{"model_state_dict": ...}``; CelebA-HQ: 3 logits
  [gender, smile, age], BDD-OIA: 4 actions; github.com/valeoai/STEEX releases). ``query_label`` picks
  the explained logit, so the result is a binary (single-logit) classifier, as in the reference.
  Inputs are [-1, 1] images: the models were trained on ``Normalize(0.5, 0.5)`` of [0, 1] images.
* ``load_exported_model``: any model exported with ``torch.export`` (or TorchScript), the generic slot for
  the user-supplied models of the metrics (the MNAC attribute oracle, the FVA face-embedding network).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from equidiff.classifiers.safe_load import safe_torch_load
from equidiff.classifiers.wrapper import Classifier
from equidiff.errors import ConfigError

LAYOUTS = ("dive", "steex")
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class _DenseNetFeatures(nn.Module):
    """torchvision DenseNet-121 with the head removed (1024 features), as ``feat_extract`` in both layouts."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.feat_extract = torchvision.models.densenet121(weights=None)
        self.feat_extract.classifier = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat_extract(x)


class DenseNetDecision(nn.Module):
    """DenseNet-121 features + a linear head of ``num_classes`` logits; ``query_label`` keeps one (B, 1)."""

    def __init__(self, num_classes: int = 40, query_label: int | None = None):
        super().__init__()
        self.feat_extract = _DenseNetFeatures()
        self.classifier = nn.Linear(1024, num_classes)
        if query_label is not None and not 0 <= query_label < num_classes:
            raise ConfigError(f"query_label {query_label} is not one of the {num_classes} logits")
        self.query_label = query_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.feat_extract(x))
        return logits if self.query_label is None else logits[:, self.query_label : self.query_label + 1]


def _require(path, what: str, how: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}. {how}")
    return path


def densenet_state_dict(checkpoint, layout: str) -> dict:
    """The ``DenseNetDecision`` state dict inside a released checkpoint of ``layout`` ("dive" or "steex")."""
    found = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if layout == "dive":
        if not isinstance(checkpoint, dict) or not {"feat_extract", "classifier"} <= set(checkpoint):
            raise ConfigError("a DiVE/DiME CelebA classifier checkpoint holds {'feat_extract': ..., "
                              f"'classifier': ...}}; this one has {found}")
        state = {f"feat_extract.{k}": v for k, v in checkpoint["feat_extract"].items()}
        state.update({f"classifier.{k}": v for k, v in checkpoint["classifier"].items()})
    elif layout == "steex":
        if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
            raise ConfigError("a STEEX DecisionDensenetModel checkpoint holds {'model_state_dict': ...}; this one "
                              f"has {found}")
        state = dict(checkpoint["model_state_dict"])
    else:
        raise ConfigError(f"unknown DenseNet checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    # checkpoints from torchvision < 0.3 name the dense layers' parts 'norm.1' instead of 'norm1'
    return {_OLD_DENSENET_KEY.sub(lambda m: m.group(1) + m.group(2), k): v
            for k, v in state.items()}


def load_densenet_decision(path: str | os.PathLike, *, layout: str = "dive", num_classes: int = 40,
                           query_label: int = 31, image_size: int | None = None, **wrapper_kwargs) -> Classifier:
    """A released DenseNet-121 decision model as a binary ``Classifier`` of ``query_label`` on [-1, 1] images.

    Args:
        path: the checkpoint (DiME's ``classifier.pth``; STEEX's ``celebamaskhq/checkpoint.tar`` or
            ``bdd/checkpoint.tar``).
        layout: "dive" (DiME/DiVE CelebA) or "steex".
        num_classes: logits of the head: 40 (CelebA attributes), 3 (CelebA-HQ [gender, smile, age]), 4 (BDD).
        query_label: the logit explained: CelebA 31 (Smiling) or 39 (Young); CelebA-HQ 1 (smile) or 2 (age);
            BDD 0 (move forward).
        image_size: the input size checked against the diffusion model's (None: not checked).
    """
    path = _require(path, "ACE classifier weights", "Get the released checkpoint (DiME's CelebA classifier at "
                    "huggingface.co/guillaumejs2403/DiME; STEEX's checkpoints_decision_densenet.tar.gz at "
                    "github.com/valeoai/STEEX/releases) where there is internet and copy it here.")
    net = DenseNetDecision(num_classes, query_label)
    state = densenet_state_dict(safe_torch_load(path), layout)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"the weights in {path} do not fit a DenseNet-121 with {num_classes} logits "
                          f"(layout {layout!r}): {e}") from e
    return Classifier(net.eval(), **{"input_range": (0.0, 1.0), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                     "channels": 3, "image_size": image_size, "num_classes": 1, **wrapper_kwargs})


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in inference mode with its parameters frozen (also for exported and TorchScript modules)."""
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules are exported in eval mode and refuse .eval()
        pass
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_exported_model(path: str | os.PathLike, what: str = "model") -> nn.Module:
    """A model exported to a local file, for the user-supplied evaluation models of the metrics.

    ``.pt2``: ``torch.export.save`` (the recommended format; loaded as a graph of operators, no pickled code);
    any other suffix: TorchScript (``torch.jit.save``, deprecated by PyTorch). Export your model so that it
    takes [-1, 1] images (N, 3, H, W) at the experiment's image size and returns logits or embeddings, doing
    its own resizing and normalisation, with a dynamic batch dimension.
    """
    path = _require(path, what, "Export it where you have its code and weights, e.g. torch.export.save("
                    "torch.export.export(model.eval(), (images,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
                    "PATH) with images in [-1, 1] and a .pt2 suffix; or point the config's _target_ at your own "
                    "loader.")
    try:
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # not a zip, truncated, another format: say what to do
        raise ConfigError(f"{path} could not be loaded as an exported model ({e}); save it with torch.export.save "
                          "(.pt2) or torch.jit.save") from e
    return frozen(module)
