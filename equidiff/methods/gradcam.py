"""Grad-CAM of the models retrained on each perturbed set (seed 001, learning from counterfactuals: its
qualitative figure of where ERM / PGD / CFE / p-CFE models look), over the clean test split.

``predict_step`` computes, for every model, the prediction and the Grad-CAM map of the target class (the true
label, or the prediction) through the model's ``Classifier`` wrapper (``equidiff.explain.gradcam``). The record
holds ``image`` (the input), ``cam`` (uint8 [B, M, H, W]), ``pred`` [B, M], ``label``/``group`` and, where the
data has such a mask, ``background`` [B, H, W] for ``CamRegionMass``; ``GradCamFigure`` draws the figure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from equidiff.errors import ConfigError
from equidiff.explain.gradcam import cam_to_uint8, grad_cam, target_layer
from equidiff.methods.common import require_grad_mode


def _spec(spec) -> dict:
    """``{path, experiment?, title?}`` of a model given as a path or a mapping."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    return dict(spec) if isinstance(spec, Mapping) else {"path": spec}


def resolve_model_path(name: str, spec: str | os.PathLike | Mapping) -> Path:
    """A model's weights: ``spec`` is a path or ``{path, experiment, title}``. A folder means its
    ``checkpoints/last.ckpt`` (a Lightning fit's output folder) or its ``model.safetensors`` (``save_pretrained``).
    A missing file is an error naming the experiment that produces it."""
    spec = _spec(spec)
    path, experiment = spec.get("path"), spec.get("experiment")
    if path is None:
        raise ConfigError(f"model {name!r} has no path; give method.models.{name}.path")
    path = Path(path).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "checkpoints" / "last.ckpt", path / "model.safetensors") if p.is_file()),
                    path / "checkpoints" / "last.ckpt")
    if not path.is_file():
        how = (f"train it first: equidiff fit experiment={experiment}" if experiment
               else "point method.models." + name + " at a Lightning checkpoint or save_pretrained folder")
        raise ConfigError(f"the weights of model {name!r} are not at {path}; {how}")
    return path


class GradCamComparison(L.LightningModule):
    """Grad-CAM maps and predictions of several models of one architecture on the same images (module docstring).

    Args:
        models: ``{name: path | {path, experiment, title}}`` in column order (ERM, PGD-l2, PGD-linf, CFE-l2,
            p-CFE-l0); ``experiment`` names what produces the file (for the error), ``title`` the figure column.
        classifier: a factory (Hydra ``_partial_``) building the wrapped network from ``weights_path=...``
            (``load_small_net``, ``load_torchvision``; Lightning checkpoints' ``classifier.net.`` prefix is
            detected).
        layer: the Grad-CAM layer, a dotted name on the network (None: ResNet ``layer4``, else the last conv).
        target: ``label`` (explain the true class) or ``prediction`` (each model's own prediction).
        region: optional ``region(batch) -> [B, H, W] bool`` (e.g. ``plain_background``); its mask is
            recorded as ``background`` for ``CamRegionMass``.
        input_key: the batch entry with the images in [-1, 1].
    """

    def __init__(self, models: Mapping, classifier: Callable, *, layer: str | None = None, target: str = "label",
                 region: Callable | None = None, input_key: str = "image"):
        super().__init__()
        if not models:
            raise ConfigError("method.models is empty; give {name: checkpoint path} of the retrained models")
        if target not in ("label", "prediction"):
            raise ConfigError(f"method.target must be 'label' or 'prediction', got {target!r}")
        self.names = [str(n) for n in models]
        self.titles = [str(_spec(models[n]).get("title") or n) for n in self.names]
        self.classifiers = torch.nn.ModuleList(
            [classifier(weights_path=str(resolve_model_path(n, models[n]))) for n in self.names])
        for c in self.classifiers:
            c.eval().requires_grad_(False)
            target_layer(c.net, layer)  # an unknown layer fails here, before any predict
        self.layer, self.target, self.region, self.input_key = layer, target, region, input_key

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        x = batch[self.input_key]
        cams, preds = [], []
        for clf in self.classifiers:
            # 1. the model's prediction on the clean image
            with torch.no_grad():
                pred = clf(x).argmax(-1)
            # 2. Grad-CAM of the explained class (true label by default) at the chosen layer
            cls = batch["label"] if self.target == "label" else pred
            cams.append(grad_cam(clf, x, cls, layer=self.layer))
            preds.append(pred)
        record = {"seed": batch["seed"], "index": batch["index"], "label": batch["label"], "image": x,
                  "cam": cam_to_uint8(torch.stack(cams, dim=1)), "pred": torch.stack(preds, dim=1)}
        if "group" in batch:
            record["group"] = batch["group"]
        if self.region is not None:
            # 3. the region whose CAM mass is measured (the background of the coloured digits)
            record["background"] = self.region(batch)
        return record
