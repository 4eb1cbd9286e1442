"""A perturbed training set (seed 001, "learning from perturbations"), read back from an ``equidiff predict`` run.

The seed's definition: from S = {(x_i, y_i)} build S~ = {(x~_i, y~_i)} by pushing every training sample toward
a target y~_i != y_i (PGD-l2, PGD-linf, CFE-l2 or p-CFE), then train a fresh model on S~ and evaluate it on
the clean test set. ``equidiff predict`` with the ``Counterfactual`` method over the clean training split writes
S~ (``SampleWriter``: ``samples/<seed>.png`` + ``.npz`` sidecars, merged into ``samples.npz`` when complete);
this DataModule reads it back:

* **train**: items ``{image: x~ (the float counterfactual from the sidecar, or the PNG), label: y~,
  source_index, source_label: y, valid}``, one per source sample, in the order of the source index;
* **val / test**: the clean DataModule's splits (with their ``group`` where it has them).

It refuses (``DataLayoutError``, saying which command finishes the job) a folder without samples, a
generation that is not complete (no ``samples.npz``, or source indices missing or repeated), targets equal to
the source labels, and labels outside the clean data's classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from equidiff.callbacks.records import completed_seeds, read_records
from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset
from equidiff.errors import DataLayoutError

REQUIRED = ("index", "label", "source_label")


def _merged_seeds(path: Path) -> np.ndarray:
    """The seeds of a complete generation (``samples.npz``: the seeds are its last array)."""
    if not (path / "samples").is_dir():
        raise DataLayoutError(f"{path} holds no generated samples (no samples/ folder); generate the perturbed set "
                              f"first, e.g. `equidiff predict experiment=digits/pcfe_generate_pcfe_l0`")
    npz = path / "samples.npz"
    if not npz.exists():
        raise DataLayoutError(f"the perturbed set in {path} is incomplete (no samples.npz: generation stopped before "
                              f"the merge); re-run the same `equidiff predict` command to finish it")
    with np.load(npz) as z:
        return z[z.files[-1]]


def read_perturbed(path: str | Path, *, use_float: bool = True) -> dict[str, torch.Tensor]:
    """``{image, label, source_index, source_label, valid}`` of a generated set, sorted by source index."""
    path = Path(path)
    seeds = _merged_seeds(path)
    lost = sorted(set(seeds.tolist()) - completed_seeds(path / "samples"))
    if lost:
        raise DataLayoutError(f"{len(lost)} samples of {path}/samples.npz have no sidecar in samples/ (first seeds: "
                              f"{lost[:5]}); delete samples.npz and re-run the same `equidiff predict` command")
    rows = list(read_records(path / "samples", seeds.tolist()))
    rec = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise DataLayoutError(f"the samples in {path} have no {missing} entries (they have {sorted(rec)}); generate "
                              f"them with the Counterfactual method (method=counterfactual)")
    key = "counterfactual" if use_float and "counterfactual" in rec else "image"
    if key not in rec:
        raise DataLayoutError(f"the samples in {path} have no images (neither PNGs nor 'counterfactual' sidecars)")
    order = torch.argsort(rec["index"])
    out = {"image": rec[key].float(), "label": rec["label"].long(), "source_index": rec["index"].long(),
           "source_label": rec["source_label"].long(),
           "valid": rec["valid"].float() if "valid" in rec else torch.full((len(order),), float("nan"))}
    return {k: v[order] for k, v in out.items()}


def check_perturbed(data: dict[str, torch.Tensor], num_sources: int, num_classes: int | None, path) -> None:
    """One row per source sample, y~ != y, labels within the classes (else a DataLayoutError)."""
    idx = data["source_index"]
    if len(idx) != num_sources or not torch.equal(idx, torch.arange(num_sources)):
        dup = len(idx) - len(torch.unique(idx))
        raise DataLayoutError(f"the perturbed set in {path} has {len(idx)} rows ({dup} repeated source indices) for "
                              f"{num_sources} source samples; it must be generated over the whole clean training "
                              f"split (data.predict_split=train) with the same data settings")
    same = int((data["label"] == data["source_label"]).sum())
    if same:
        raise DataLayoutError(f"{same} perturbed samples in {path} keep their source label (y~ = y); generate with a "
                              f"targeted rule (method.targets.rule=uniform)")
    if num_classes is not None and (int(data["label"].max()) >= num_classes or int(data["label"].min()) < 0):
        raise DataLayoutError(f"the perturbed set in {path} has labels up to {int(data['label'].max())}, but the "
                              f"clean data has {num_classes} classes; generate it from the same dataset")


class PerturbedDataModule(EquidiffDataModule):
    """Train on a generated perturbed set S~ (module docstring), validate and test on the ``clean`` DataModule.

    Args:
        path: the output folder of the ``equidiff predict`` run that generated S~.
        clean: the DataModule S~ was generated from (its training split's size is checked; val/test come from it).
        use_float: train on the float counterfactuals of the sidecars (``counterfactual``) rather than the
            uint8 PNGs, where they were kept (``method.keep_float``, the default).
    """

    def __init__(self, *, path: str, clean: EquidiffDataModule, use_float: bool = True, **kwargs):
        kwargs.setdefault("seed", clean.seed)
        super().__init__(**kwargs)
        self.path, self.clean, self.use_float = Path(path), clean, use_float
        self.num_classes = clean.num_classes
        for name in ("num_groups", "image_shape", "box"):
            if hasattr(clean, name):
                setattr(self, name, getattr(clean, name))

    def train_group_counts(self) -> list[int]:
        """The clean training split's group sizes (WaterBirds' "average accuracy" weights)."""
        return self.clean.train_group_counts()

    def make_dataset(self, split: str) -> Dataset:
        if split != "train":
            return self.clean.dataset(split)
        data = read_perturbed(self.path, use_float=self.use_float)
        check_perturbed(data, len(self.clean.dataset("train")), self.num_classes, self.path)
        return TensorDictDataset(**data)
