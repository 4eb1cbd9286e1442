"""Figures of ACE explanations like the seed's (Figs. 1-9): rows of input | pre-explanation | mask | counterfactual."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback

from equidiff.callbacks.grid import save_grid
from equidiff.callbacks.records import completed_seeds, read_sample

log = logging.getLogger(__name__)
COLUMNS = ("input", "pre-explanation", "mask", "counterfactual")


def explanation_tiles(sample: dict) -> list[np.ndarray]:
    """The four HWC uint8 tiles of one written ACE sample (``read_sample``): input, pre-explanation, mask
    (white = regenerated), counterfactual."""
    x, pe, cf = sample["input_uint8"], sample["pre_explanation_uint8"], sample["image_uint8"]
    mask = np.repeat(sample["mask"].astype(np.uint8) * 255, x.shape[0], axis=0)
    return [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in (x, pe, mask, cf)]


def save_explanations(samples_dir: Path, seeds: list[int], path: Path, *, per_row: int = 2) -> np.ndarray:
    """Save ``input | pre-explanation | mask | counterfactual`` for each seed (``per_row`` explanations per row)."""
    tiles = [t for s in seeds for t in explanation_tiles(read_sample(samples_dir, s))]
    return save_grid(np.stack(tiles), path, nrow=len(COLUMNS) * per_row)


class ACEGrid(Callback):
    """After predict, rank 0 saves ``<output_dir>/<filename>``: input | pre-explanation | mask | counterfactual
    for the first ``max_images`` seeds (``successful_only``: the first successful ones), and logs it.

    Reads the per-seed files ``SampleWriter`` wrote (list this callback after it).
    """

    def __init__(self, output_dir: str, *, max_images: int = 16, per_row: int = 2, filename: str = "explanations.png",
                 successful_only: bool = False, subdir: str = "samples"):
        super().__init__()
        self.output_dir, self.samples_dir = Path(output_dir), Path(output_dir) / subdir
        self.max_images, self.per_row, self.filename = int(max_images), int(per_row), filename
        self.successful_only = bool(successful_only)

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        written = completed_seeds(self.samples_dir)
        seeds = [s for s in sorted(trainer.datamodule.predict_seeds()) if s in written]
        if self.successful_only:
            seeds = [s for s in seeds if bool(read_sample(self.samples_dir, s).get("success", True))]
        seeds = seeds[: self.max_images]
        if not seeds:
            log.warning("ACEGrid: no written explanations in %s", self.samples_dir)
            return
        path = self.output_dir / self.filename
        grid = save_explanations(self.samples_dir, seeds, path, per_row=self.per_row)
        log.info("explanations (input | pre-explanation | mask | counterfactual): %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="predict/explanations", images=[grid])
