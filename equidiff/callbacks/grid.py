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
        npz = self.output_dir / "samples.npz"
        if not npz.exists():
            log.warning("ImageGrid: %s not found (is SampleWriter configured with merge=true?)", npz)
            return
        with np.load(npz) as z:
            images = z["arr_0"][: self.max_images]
        if images.ndim != 4:
            return
        path = self.output_dir / self.filename
        grid = save_grid(images, path, nrow=self.nrow)
        log.info("image grid: %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"predict/{self.key}", images=[grid])
