"""Write predictions sample by sample under their seeds; resume; merge into ``samples.npz``."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from equidiff.callbacks.records import (
    check_record,
    completed_seeds,
    read_sample,
    sample_paths,
    scan_samples,
    write_sample,
)
from equidiff.errors import ConfigError, DataLayoutError
from equidiff.utils.io import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

MERGED_FILES = ("samples.npz", "samples.csv")  # what the merge writes into the run folder
# what equidiff's callbacks make from the merged set under their default names (PredictMetrics, ImageGrid,
# QueryGrid, ACEGrid, GradCamFigure, CirclesFigure); configured names come from the callbacks themselves
DERIVED_FILES = (*MERGED_FILES, "metrics.json", "grid.png", "queries.png", "explanations.png", "gradcam.png",
                 "circles.png")
MAX_LISTED = 20  # damaged samples named one by one in the log


class SampleWriter(BasePredictionWriter):
    """Atomic per-seed writer with resume and a rank-0 merge (STYLE rule 8).

    * Each sample goes to ``<output_dir>/samples/<seed:06d>.png`` plus a ``.npz`` sidecar holding
      every other per-sample entry of the record (label, index, latents, per-sample metrics);
      both are written to a temporary file and renamed, the sidecar last.
    * At ``setup("predict")`` rank 0 checks the samples already on disk (``records.scan_samples``: both files
      there and whole) and every process gets the finished seeds, which the DataModule leaves out of the
      predict dataloader: re-running a stopped job finishes it. A damaged or half-written sample is logged
      with its file and recomputed.
    * At ``on_predict_start`` rank 0 removes the damaged samples' files; a barrier follows: no process writes
      before that.
    * Right before this run's first sample (on any process) or its merge, the folder's merged outputs
      (``derived_files``: ``samples.npz``, ``samples.csv``, ``metrics.json``, ``grid.png``, every figure), which
      described the folder before this run, are removed; they are written again when the run completes, so a
      folder never shows merged outputs of another sample set. Not earlier: a run that fails before its first
      result leaves the folder as it found it (``utils/runs.RunFolder``), merged outputs included.
    * After the epoch, a barrier, then rank 0 checks that every expected seed is on disk exactly
      once, whole, and with an image if any sample has one, and writes ``samples.npz`` (``arr_0`` uint8
      NHWC images, ``arr_1`` labels, ``arr_2`` seeds, sorted by seed; the ADM/guided-diffusion evaluator
      format) and ``samples.csv`` (seed, index, label and every scalar per-sample entry).
    """

    def __init__(self, output_dir: str, *, subdir: str = "samples", merge: bool = True, image_key: str = "image",
                 label_key: str = "label"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.samples_dir = self.output_dir / subdir
        self.merge, self.image_key, self.label_key = merge, image_key, label_key
        self.skipped: set[int] = set()
        self.damaged: dict[int, str] = {}
        self._cleared = False  # the folder's merged outputs removed by this run (``_remove_derived_files``)

    # ------------------------------------------------------------------ resume
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "predict_seeds"):
            raise ConfigError("SampleWriter needs an equidiff DataModule (with predict_seeds / set_skip_seeds); "
                              "pass the data through `data=...`")
        expected = dm.predict_seeds()
        found = scan_samples(self.samples_dir, expected) if trainer.is_global_zero else None
        self.skipped, self.damaged = trainer.strategy.broadcast(found, src=0)  # one reading of the folder
        dm.set_skip_seeds(self.skipped)
        if trainer.is_global_zero:
            if self.skipped:
                log.info("resuming: %d of %d samples already in %s", len(self.skipped), len(expected),
                         self.samples_dir)
            for seed, problem in sorted(self.damaged.items())[:MAX_LISTED]:
                log.warning("sample %d is damaged or half written, it is recomputed: %s", seed, problem)
            if len(self.damaged) > MAX_LISTED:
                log.warning("... and %d more damaged samples, recomputed", len(self.damaged) - MAX_LISTED)

    def derived_files(self, trainer) -> list[Path]:
        """The files of the run folder made from its whole sample set: ``DERIVED_FILES``, and
        ``<output_dir>/<filename>`` of every callback that has both attributes (``PredictMetrics``, ``ImageGrid``,
        ``QueryGrid``, ``ACEGrid``, ``GradCamFigure``, ``CirclesFigure``: the convention of equidiff's callbacks
        that write a file from the samples), when it lies in this writer's folder."""
        files = [self.output_dir / name for name in DERIVED_FILES]
        folder = self.output_dir.resolve()
        for cb in trainer.callbacks:
            out, name = getattr(cb, "output_dir", None), getattr(cb, "filename", None)
            if cb is not self and isinstance(out, str | Path) and isinstance(name, str) and name:
                path = Path(out) / name
                if path.resolve().parent == folder:
                    files.append(path)
        return files

    def on_predict_start(self, trainer, pl_module) -> None:
        self._cleared = False
        if trainer.is_global_zero:
            for seed in self.damaged:
                for path in sample_paths(self.samples_dir, seed):
                    path.unlink(missing_ok=True)
        trainer.strategy.barrier("equidiff_sample_writer_start")  # nothing is written before the clean-up

    def _remove_derived_files(self, trainer) -> None:
        """Once per run, on whichever process writes first: unlink the merged outputs (``missing_ok``, so
        processes racing here on a shared filesystem are harmless)."""
        if self._cleared:
            return
        self._cleared = True
        stale = [p for p in dict.fromkeys(self.derived_files(trainer)) if p.exists()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %s of the folder's earlier state; they are written again when this run completes",
                     ", ".join(p.name for p in stale))

    # ------------------------------------------------------------------ write
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if prediction is None or getattr(trainer.datamodule, "predict_padding", False):
            return  # a process without samples of its own ran one item to keep Lightning's loop going
        for j in range(check_record(prediction)):
            if int(prediction["seed"][j]) in self.skipped:
                continue  # written by an earlier run
            self._remove_derived_files(trainer)
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
            self._remove_derived_files(trainer)
            self.merge_samples(sorted(trainer.datamodule.predict_seeds()))
        trainer.strategy.barrier("equidiff_sample_writer_merged")

    def merge_samples(self, expected_seeds: list[int]) -> Path:
        """Check the written set against ``expected_seeds`` and write ``samples.npz`` / ``samples.csv``."""
        if len(set(expected_seeds)) != len(expected_seeds):
            raise RuntimeError("the DataModule's predict seeds contain duplicates; every sample needs its own seed")
        on_disk = completed_seeds(self.samples_dir)
        missing = [s for s in expected_seeds if s not in on_disk]
        if missing:
            raise DataLayoutError(f"{len(missing)} of {len(expected_seeds)} samples are missing in "
                                  f"{self.samples_dir} (first: {missing[:5]}); re-run the same command to finish "
                                  "them")
        extra = len(on_disk) - len(expected_seeds)
        if extra:
            log.warning("%d samples in %s are not part of this run (other seeds); they are not merged",
                        extra, self.samples_dir)
        rows = [read_sample(self.samples_dir, s) for s in expected_seeds]  # names any file it cannot read
        seeds = np.array([int(r["seed"]) for r in rows], dtype=np.int64)
        if not np.array_equal(seeds, np.array(expected_seeds)):
            bad = [(e, int(s)) for e, s in zip(expected_seeds, seeds, strict=True) if e != s][:5]
            raise DataLayoutError(f"sidecar seeds disagree with their file names (file, sidecar): {bad}")
        if len(np.unique(seeds)) != len(seeds):
            raise RuntimeError("duplicate seeds among the written samples")
        labels = np.array([int(r[self.label_key]) if self.label_key in r else -1 for r in rows], dtype=np.int64)
        arrays = [labels, seeds]
        without = [s for s, r in zip(expected_seeds, rows, strict=True) if "image_uint8" not in r]
        if without and len(without) < len(rows):  # the run writes images: a samples.npz without them is no merge
            raise DataLayoutError(
                f"{len(without)} of {len(rows)} samples in {self.samples_dir} have no image (missing: "
                f"{', '.join(sample_paths(self.samples_dir, s)[0].name for s in without[:5])}"
                f"{', ...' if len(without) > 5 else ''}); re-run the same command: a resumed run recomputes them")
        if not without:
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
