"""Write predictions sample by sample under their seeds; resume; merge into ``samples.npz``."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from equidiff.callbacks.records import check_record, completed_seeds, read_sample, write_sample
from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)


class SampleWriter(BasePredictionWriter):
    """Atomic per-seed writer with resume and a rank-0 merge (STYLE rule 8).

    * Each sample goes to ``<output_dir>/samples/<seed:06d>.png`` plus a ``.npz`` sidecar holding
      every other per-sample entry of the record (label, index, latents, per-sample metrics);
      both are written to a temporary file and renamed, the sidecar last.
    * At ``setup("predict")`` the seeds already on disk are handed to the DataModule, which
      leaves them out of the predict dataloader: re-running a stopped job finishes it.
    * After the epoch, a barrier, then rank 0 checks that every expected seed is on disk exactly
      once and writes ``samples.npz`` (``arr_0`` uint8 NHWC images, ``arr_1`` labels, ``arr_2``
      seeds, sorted by seed; the ADM/guided-diffusion evaluator format) and ``samples.csv``
      (seed, index, label and every scalar per-sample entry).
    """

    def __init__(self, output_dir: str, *, subdir: str = "samples", merge: bool = True, image_key: str = "image",
                 label_key: str = "label"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.samples_dir = self.output_dir / subdir
        self.merge, self.image_key, self.label_key = merge, image_key, label_key
        self.skipped: set[int] = set()

    # ------------------------------------------------------------------ resume
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "predict_seeds"):
            raise ConfigError("SampleWriter needs an equidiff DataModule (with predict_seeds / set_skip_seeds); "
                              "pass the data through `data=...`")
        expected = set(dm.predict_seeds())
        self.skipped = completed_seeds(self.samples_dir) & expected
        dm.set_skip_seeds(self.skipped)
        if self.skipped and trainer.is_global_zero:
            log.info("resuming: %d of %d samples already in %s", len(self.skipped), len(expected), self.samples_dir)

    # ------------------------------------------------------------------ write
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if prediction is None:
            return
        for j in range(check_record(prediction)):
            if int(prediction["seed"][j]) in self.skipped:
                continue  # written by an earlier run (re-computed only to keep every rank busy)
            write_sample(self.samples_dir, prediction, j, image_key=self.image_key)

    # ------------------------------------------------------------------ merge
    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self.merge:
            return
        limit = trainer.limit_predict_batches  # an int is a number of batches, a float a fraction
        if trainer.fast_dev_run or not (isinstance(limit, float) and limit >= 1.0):
            log.warning("partial predict (fast_dev_run / limit_predict_batches): samples written, not merged")
            return
        trainer.strategy.barrier("equidiff_sample_writer")
        if trainer.is_global_zero:
            self.merge_samples(sorted(trainer.datamodule.predict_seeds()))
        trainer.strategy.barrier("equidiff_sample_writer_merged")

    def merge_samples(self, expected_seeds: list[int]) -> Path:
        """Check the written set against ``expected_seeds`` and write ``samples.npz`` / ``samples.csv``."""
        if len(set(expected_seeds)) != len(expected_seeds):
            raise RuntimeError("the DataModule's predict seeds contain duplicates; every sample needs its own seed")
        on_disk = completed_seeds(self.samples_dir)
        missing = [s for s in expected_seeds if s not in on_disk]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(expected_seeds)} samples are missing in {self.samples_dir} "
                               f"(first: {missing[:5]}); re-run the same command to finish them")
        extra = len(on_disk) - len(expected_seeds)
        if extra:
            log.warning("%d samples in %s are not part of this run (other seeds); they are not merged",
                        extra, self.samples_dir)
        rows = [read_sample(self.samples_dir, s) for s in expected_seeds]
        seeds = np.array([int(r["seed"]) for r in rows], dtype=np.int64)
        if not np.array_equal(seeds, np.array(expected_seeds)):
            bad = [(e, int(s)) for e, s in zip(expected_seeds, seeds, strict=True) if e != s][:5]
            raise RuntimeError(f"sidecar seeds disagree with their file names (file, sidecar): {bad}")
        if len(np.unique(seeds)) != len(seeds):
            raise RuntimeError("duplicate seeds among the written samples")
        labels = np.array([int(r[self.label_key]) if self.label_key in r else -1 for r in rows], dtype=np.int64)
        arrays = [labels, seeds]
        if all("image_uint8" in r for r in rows):
            images = np.stack([r["image_uint8"].transpose(1, 2, 0) for r in rows])  # NHWC
            arrays = [images, *arrays]
        buf = io.BytesIO()
        np.savez(buf, *arrays)
        out = self.output_dir / "samples.npz"
        atomic_write_bytes(out, buf.getvalue())
        self._write_csv(rows)
        log.info("merged %d samples into %s", len(rows), out)
        return out

    def _write_csv(self, rows: list[dict]) -> None:
        keys = [k for k in rows[0] if k != "image_uint8" and np.ndim(rows[0][k]) == 0]
        first = [k for k in ("seed", "index", self.label_key) if k in keys]
        keys = first + sorted(k for k in keys if k not in first)
        with atomic_write(self.output_dir / "samples.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in rows:
                w.writerow([r[k].item() if hasattr(r[k], "item") else r[k] for k in keys])
