"""Image grids of predictions, saved as PNG and sent to the loggers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torchvision.utils import make_grid

from equidiff.utils.io import atomic_write

log = logging.getLogger(__name__)


def save_grid(images_uint8: np.ndarray, path: Path, *, nrow: int = 8, min_size: int = 64) -> np.ndarray:
    """Save NHWC uint8 images as one grid PNG (small images upscaled, nearest); return the grid (HWC)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    if x.shape[-1] < min_size:
        x = F.interpolate(x, scale_factor=max(1, min_size // x.shape[-1]), mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=255).round().clamp(0, 255).byte()
    arr = grid.permute(1, 2, 0).numpy()
    arr = arr[:, :, 0] if images_uint8.shape[-1] == 1 else arr
    with atomic_write(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return arr


class ImageGrid(Callback):
    """After predict, rank 0 saves the first ``max_images`` merged samples (by seed) as a grid.

    Reads ``<output_dir>/samples.npz`` written by ``SampleWriter`` (list this callback after it).
    The grid goes to ``<output_dir>/<filename>`` and to every logger that can show images (wandb).
    """

    def __init__(self, output_dir: str, *, max_images: int = 64, nrow: int = 8, filename: str = "grid.png",
                 key: str = "samples"):
        super().__init__()
        self.output_dir, self.max_images, self.nrow = Path(output_dir), max_images, nrow
        self.filename, self.key = filename, key

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        merged = _merged_images(self.output_dir, "ImageGrid")
        if merged is None:
            return
        path = self.output_dir / self.filename
        _save_and_log(trainer, save_grid(merged[0][: self.max_images], path, nrow=self.nrow), path, self.key,
                      "image grid")


class QueryGrid(Callback):
    """After predict, rank 0 saves one row per query: the query image, then up to ``per_query`` samples.

    Reads ``samples.npz`` (images, seeds) and each sample's sidecar (``query_index`` and the ``query``
    image, uint8 CHW) written by ``SampleWriter``; saves ``<output_dir>/<filename>`` and logs it.
    """

    def __init__(self, output_dir: str, *, max_queries: int = 8, per_query: int = 8, filename: str = "queries.png",
                 key: str = "queries"):
        super().__init__()
        self.output_dir, self.max_queries, self.per_query = Path(output_dir), max_queries, per_query
        self.filename, self.key = filename, key

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from equidiff.callbacks.records import read_sample

        merged = _merged_images(self.output_dir, "QueryGrid")
        if merged is None:
            return
        images, seeds = merged
        rows: dict[int, list] = {}
        for img, seed in zip(images, seeds, strict=True):
            side = read_sample(self.output_dir / "samples", int(seed))
            q = int(side["query_index"])
            if q not in rows and len(rows) >= self.max_queries:
                continue
            row = rows.setdefault(q, [side["query"].transpose(1, 2, 0)] if "query" in side else [])
            if len(row) < self.per_query + 1:
                row.append(img)
        if not rows:
            return
        width = max(len(r) for r in rows.values())
        blank = np.full_like(images[0], 255)
        cells = [c for q in sorted(rows) for c in rows[q] + [blank] * (width - len(rows[q]))]
        path = self.output_dir / self.filename
        _save_and_log(trainer, save_grid(np.stack(cells), path, nrow=width), path, self.key,
                      "query grid (query, then its samples)")


def _merged_images(output_dir: Path, who: str):
    """(images NHWC uint8, seeds) from the merged ``samples.npz``, or None (no file, or records without images)."""
    npz = output_dir / "samples.npz"
    if not npz.exists():
        log.warning("%s: %s not found (is SampleWriter configured with merge=true?)", who, npz)
        return None
    with np.load(npz) as z:
        if z["arr_0"].ndim != 4:
            return None
        return z["arr_0"], z["arr_2"]


def _save_and_log(trainer, grid, path: Path, key: str, what: str) -> None:
    log.info("%s: %s", what, path)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=f"predict/{key}", images=[grid])
