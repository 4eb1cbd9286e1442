"""Grad-CAM (Selvaraju et al. 2017) through equidiff's classifier contract, a thin layer over ``pytorch_grad_cam``.

Seed 001 (learning from counterfactuals) shows where models trained on ERM / PGD / CFE / p-CFE data look
(its qualitative Grad-CAM figure: standard, PGD and CFE-l2 models over-weight the background, p-CFE models
shift attention to the object). Here:

* ``target_layer(net, name)``: the layer whose activations Grad-CAM weighs, by dotted name on the classifier's
  network (``Classifier.net``); ``None`` picks the architecture's usual one (a ResNet's ``layer4``, else the
  last ``nn.Conv2d``, e.g. SmallCNN's ``features.5``).
* ``grad_cam(classifier, images, targets)``: [B, H, W] maps in [0, 1], computed by ``pytorch_grad_cam.GradCAM``
  on the ``Classifier`` wrapper itself, so the wrapper owns the [-1, 1] -> normalised-input mapping. Each map
  is ReLU'd and min-max scaled per image by the package: a sample's map does not depend on its batch-mates.
* ``cam_overlay``: ``show_cam_on_image`` overlays as uint8 NHWC.
* ``plain_background``: the background (no-ink) pixels of the coloured-digits benchmark.
* ``CamRegionMass``: the per-model mean fraction of CAM mass on a region (the background), sum-reduced;
  ``ModelGroupAccuracy``: each model's accuracy and worst-group accuracy on the same images.
* ``GradCamFigure``: after predict, the seed-style figure, rows = test images balanced over groups, columns =
  input | one overlay per model, saved as PNG and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import Metric

from equidiff.errors import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the target layer
def default_layer_name(net: nn.Module) -> str:
    """The usual Grad-CAM layer: a (torchvision) ResNet's ``layer4``, else the last ``nn.Conv2d``."""
    modules = dict(net.named_modules())
    if "layer4" in modules:
        return "layer4"
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(net).__name__} has no nn.Conv2d layer for Grad-CAM; name a layer with 4-D "
                          f"activations (layer=...)")
    return convs[-1]


def target_layer(net: nn.Module, name: str | None = None) -> nn.Module:
    """The module ``name`` (dotted, as in ``net.named_modules()``) of the classifier's network; None: the default."""
    name = default_layer_name(net) if name is None else name
    modules = dict(net.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ConfigError(f"unknown Grad-CAM layer {name!r} in {type(net).__name__}; valid layer names: {shown}")
    return modules[name]


# ---------------------------------------------------------------- Grad-CAM
@contextmanager
def _frozen(module: nn.Module):
    """Parameters without gradients while CAMs are computed (no .grad left on the model); flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        module.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def grad_cam(classifier, images: torch.Tensor, targets: torch.Tensor | None = None, *,
             layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps [B, H, W] in [0, 1] of ``classifier`` (a ``Classifier``: images in [-1, 1]).

    Args:
        classifier: the wrapped network; CAMs go through its forward (range mapping, normalisation, resize).
        images: float [B, C, H, W] in [-1, 1]; the maps have their H x W.
        targets: the class whose logit is explained, one per sample (int [B]); None: each sample's prediction.
        layer: dotted layer name on ``classifier.net`` (None: ``default_layer_name``).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.ndim != 4:
        raise ConfigError(f"grad_cam takes NCHW images, got shape {tuple(images.shape)}")
    if images.min() < -1 - 1e-4 or images.max() > 1 + 1e-4:
        raise ConfigError(f"grad_cam takes images in [-1, 1] (the classifier wrapper maps them to the network's "
                          f"input); got values in [{images.min().item():.3g}, {images.max().item():.3g}]")
    if targets is not None and len(targets) != len(images):
        raise ConfigError(f"one target per image: {len(targets)} targets for {len(images)} images")
    module = target_layer(classifier.net, layer)
    # 1. gradients flow from the input (parameters frozen), so they exist under predict's no_grad too
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad(), _frozen(classifier):
        cam = GradCAM(model=classifier, target_layers=[module])
        try:
            # 2. alpha_k = spatial mean of d y_c / d A_k; 3. L = ReLU(sum_k alpha_k A_k), upsampled, min-max scaled
            chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
            maps = cam(input_tensor=x, targets=chosen)
        finally:
            cam.activations_and_grads.release()
    return torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(images.device)


def cam_overlay(images: torch.Tensor, cams: torch.Tensor, *, image_weight: float = 0.5) -> np.ndarray:
    """``show_cam_on_image`` (JET heat map over the image) for a batch: images [-1, 1] NCHW, CAMs [B, H, W] in
    [0, 1] (or uint8) -> uint8 NHWC (RGB)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb
    maps = cams.detach().cpu().float()
    maps = maps / 255 if cams.dtype == torch.uint8 else maps
    return np.stack([show_cam_on_image(img.permute(1, 2, 0).numpy(), m.numpy(), use_rgb=True,
                                       image_weight=image_weight) for img, m in zip(rgb, maps, strict=True)])


def cam_to_uint8(cams: torch.Tensor) -> torch.Tensor:
    """CAMs in [0, 1] quantised once, as they are stored (sidecar) and fed to the metrics."""
    return (cams.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- regions
def plain_background(batch: dict, atol: float = 1e-3) -> torch.Tensor:
    """[B, H, W] bool: the background pixels of images of light strokes on a plain background, such as the coloured
    digits benchmark (``equidiff.data.spurious_digits``): ink blends a pixel toward white, so the pixels without ink
    are exactly the image's minimum on every channel, whatever the background colour (the spurious cue)."""
    x = batch["image"]
    low = x.amin(dim=(2, 3), keepdim=True)
    return ((x - low) <= atol).all(dim=1)


class CamRegionMass(Metric):
    """Per model, the mean over samples of the fraction of CAM mass on a region: sum(cam * region) / sum(cam).

    ``update(cam, region)``: cam [B, M, H, W] (uint8 or float >= 0; M models in ``names`` order), region
    [B, H, W] bool. ``compute()``: ``{name: mean fraction}``, ``uniform_map`` (the region's mean pixel share: what
    a flat map scores) and ``empty_maps/<name>`` (all-zero maps, left out of the mean). Sum-reduced states.
    """

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.names = [str(n) for n in names]
        m = len(self.names)
        self.add_state("fraction_sum", torch.zeros(m, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counted", torch.zeros(m, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("empty", torch.zeros(m, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixel_share_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, cam: torch.Tensor, region: torch.Tensor) -> None:
        if cam.ndim != 4 or cam.shape[1] != len(self.names) or region.shape != (cam.shape[0], *cam.shape[2:]):
            raise ConfigError(f"CamRegionMass takes cam [B, {len(self.names)}, H, W] and region [B, H, W]; got "
                              f"{tuple(cam.shape)} and {tuple(region.shape)}")
        cam = cam.double()
        r = region.to(cam.dtype)[:, None]
        total, inside = cam.sum(dim=(2, 3)), (cam * r).sum(dim=(2, 3))  # [B, M]
        ok = total > 0
        self.fraction_sum += torch.where(ok, inside / total.clamp_min(1e-12), 0).sum(0)
        self.counted += ok.sum(0)
        self.empty += (~ok).sum(0)
        self.pixel_share_sum += r.mean(dim=(1, 2, 3)).sum()
        self.samples += len(cam)

    def compute(self) -> dict:
        out = {n: self.fraction_sum[i] / self.counted[i].clamp_min(1) for i, n in enumerate(self.names)}
        out["uniform_map"] = self.pixel_share_sum / self.samples.clamp_min(1)
        out.update({f"empty_maps/{n}": self.empty[i] for i, n in enumerate(self.names)})
        return out


class ModelGroupAccuracy(Metric):
    """Per model, accuracy and worst-group accuracy of the predictions the CAMs come with (context for the maps).

    ``update(pred, label, group)``: pred [B, M] (``names`` order), label [B], group [B] in [0, num_groups).
    ``compute()``: ``{acc/<name>, wga/<name>}``; groups without samples are left out of the worst group.
    """

    full_state_update = False

    def __init__(self, names: Sequence[str], num_groups: int, **kwargs):
        super().__init__(**kwargs)
        self.names, self.num_groups = [str(n) for n in names], int(num_groups)
        shape = (len(self.names), self.num_groups)
        self.add_state("correct", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, label: torch.Tensor, group: torch.Tensor) -> None:
        if pred.ndim != 2 or pred.shape[1] != len(self.names):
            raise ConfigError(f"ModelGroupAccuracy takes pred [B, {len(self.names)}]; got {tuple(pred.shape)}")
        if group.min() < 0 or group.max() >= self.num_groups:
            raise ConfigError(f"group ids must be in [0, {self.num_groups}); got {group.min()}..{group.max()}")
        onehot = torch.nn.functional.one_hot(group.long(), self.num_groups).to(self.total.dtype)  # [B, G]
        self.correct += (pred == label[:, None]).to(onehot.dtype).T @ onehot
        self.total += onehot.sum(0)[None]

    def compute(self) -> dict:
        out = {}
        for i, n in enumerate(self.names):
            seen = self.total[i] > 0
            out[f"acc/{n}"] = self.correct[i].sum() / self.total[i].sum().clamp_min(1)
            out[f"wga/{n}"] = (self.correct[i][seen] / self.total[i][seen]).min() if seen.any() else self.total[i, 0]
        return out


# ---------------------------------------------------------------- the figure
def balanced_rows(groups: Sequence[int], seeds: Sequence[int], per_group: int, seed: int) -> list[int]:
    """Up to ``per_group`` sample seeds of every group, drawn from ``seed`` (not from the batch layout or the
    process count), group by group in order."""
    rng = np.random.default_rng(seed)
    groups, seeds = np.asarray(groups), np.asarray(seeds)
    out = []
    for g in np.unique(groups):
        pool = np.sort(seeds[groups == g])
        out += sorted(rng.choice(pool, size=min(per_group, len(pool)), replace=False).tolist())
    return [int(s) for s in out]


def save_gradcam_figure(inputs: np.ndarray, overlays: np.ndarray, path: str | Path, *, names: Sequence[str],
                        row_labels: Sequence[str], cell_labels: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """The seed-style figure: rows = images (``row_labels`` on the left), columns = input | one overlay per model
    (``names`` as titles; ``cell_labels[r][m]`` under each overlay). inputs [R, H, W, 3] and overlays
    [R, M, H, W, 3] uint8. Saved as PNG; returns the rendered figure (HWC uint8) for the loggers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from equidiff.utils.io import atomic_save

    rows, models = overlays.shape[:2]
    fig = Figure(figsize=(1.6 * (models + 1) + 1.2, 1.7 * rows + 0.6))
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(rows, models + 1, squeeze=False)
    for r in range(rows):
        for c in range(models + 1):
            ax = axes[r, c]
            ax.imshow(inputs[r] if c == 0 else overlays[r, c - 1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("input" if c == 0 else names[c - 1], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
            elif cell_labels is not None:
                ax.set_xlabel(cell_labels[r][c - 1], fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


class GradCamFigure(Callback):
    """After predict, rank 0 saves ``<output_dir>/<filename>`` (``save_gradcam_figure``) for ``per_group`` test
    images of every group (``balanced_rows`` from ``seed``) and logs it.

    Reads the per-seed files ``SampleWriter`` wrote (list it after the writer): the input PNG and the sidecar's
    ``cam`` (uint8 [M, H, W]), ``pred`` [M], ``label`` and ``group``. Column titles: the method's ``titles``.
    ``group_names`` / ``class_names``: one per group / class (None: the DataModule's, else ``group g`` / ``class c``).
    """

    def __init__(self, output_dir: str, *, per_group: int = 2, seed: int = 0, filename: str = "gradcam.png",
                 group_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                 subdir: str = "samples"):
        super().__init__()
        self.output_dir, self.samples_dir = Path(output_dir), Path(output_dir) / subdir
        self.per_group, self.seed, self.filename = int(per_group), int(seed), filename
        self.group_names = list(group_names) if group_names is not None else None
        self.class_names = list(class_names) if class_names is not None else None

    def _label(self, names: list[str] | None, i: int, what: str) -> str:
        return names[i] if names is not None and 0 <= i < len(names) else f"{what} {i}"

    def _groups(self, seeds: list[int], read_sample) -> tuple[list[int], list[int]]:
        """(seeds, groups): from the merged ``samples.csv`` when it is there (no sidecar read), else the sidecars."""
        csv_path = self.output_dir / "samples.csv"
        if csv_path.exists():
            import csv

            with open(csv_path, newline="") as f:
                rows = {int(r["seed"]): int(r.get("group") or 0) for r in csv.DictReader(f)}
            if set(seeds) <= set(rows):
                return seeds, [rows[s] for s in seeds]
        return seeds, [int(read_sample(self.samples_dir, s).get("group", 0)) for s in seeds]

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from equidiff.callbacks.records import completed_seeds, read_sample

        written = completed_seeds(self.samples_dir) & set(trainer.datamodule.predict_seeds())
        if not written:
            log.warning("GradCamFigure: no written samples in %s", self.samples_dir)
            return
        seeds, groups = self._groups(sorted(written), read_sample)
        chosen = [read_sample(self.samples_dir, s) for s in balanced_rows(groups, seeds, self.per_group, self.seed)]
        names = list(getattr(pl_module, "titles", pl_module.names))
        group_names = self.group_names or getattr(trainer.datamodule, "group_names", None)
        class_names = self.class_names or getattr(trainer.datamodule, "class_names", None)
        inputs = np.stack([r["image_uint8"] for r in chosen])  # [R, C, H, W]
        images = torch.from_numpy(inputs).float() / 127.5 - 1
        overlays = np.stack([cam_overlay(images, torch.from_numpy(np.stack([r["cam"][m] for r in chosen])))
                             for m in range(len(names))], axis=1)
        rgb = np.repeat(inputs, 3, axis=1) if inputs.shape[1] == 1 else inputs
        row_labels = [f"{self._label(group_names, int(r.get('group', 0)), 'group')}\n"
                      f"y={self._label(class_names, int(r['label']), 'class')}" for r in chosen]
        cells = [[f"pred {self._label(class_names, int(p), 'class')}" for p in r["pred"]] for r in chosen]
        path = self.output_dir / self.filename
        figure = save_gradcam_figure(rgb.transpose(0, 2, 3, 1), overlays, path, names=names, row_labels=row_labels,
                                     cell_labels=cells)
        log.info("Grad-CAM figure (input | one overlay per model): %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="predict/gradcam", images=[figure])
