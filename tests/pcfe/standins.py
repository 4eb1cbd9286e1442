"""A Hydra-targetable stand-in for ``data=perturbed`` (the retraining experiments read a generated set, which
tests/test_experiments.py cannot produce first): it writes a tiny perturbed set in the real on-disk format
(``SampleWriter`` per-seed PNG + sidecar, merged ``samples.npz``) at ``path`` unless one is there, then builds
the real ``PerturbedDataModule``:

    data._target_=tests.pcfe.standins.tiny_perturbed data.path={tmp}/perturbed data.clean.max_items=8
"""

from __future__ import annotations

from pathlib import Path

import torch

from equidiff.callbacks.records import write_sample
from equidiff.callbacks.writer import SampleWriter
from equidiff.data.perturbed import PerturbedDataModule


def write_fake_perturbed(path: str | Path, clean) -> Path:
    """A perturbed copy of ``clean``'s training split: x + small noise, labelled with the next class."""
    path = Path(path)
    ds = clean.dataset("train")
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items])
    y = torch.tensor([int(it["label"]) for it in items])
    g = torch.Generator().manual_seed(0)
    x_cf = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    target = (y + 1) % clean.num_classes
    record = {"seed": torch.tensor([int(it["seed"]) for it in items]), "index": torch.arange(len(items)),
              "label": target, "target": target, "source_label": y, "valid": torch.ones(len(items)),
              "image": x_cf, "counterfactual": x_cf}
    for j in range(len(items)):
        write_sample(path / "samples", record, j)
    SampleWriter(str(path)).merge_samples(record["seed"].tolist())
    return path


def tiny_perturbed(path: str, clean, **kwargs) -> PerturbedDataModule:
    if not (Path(path) / "samples.npz").exists():
        write_fake_perturbed(path, clean)
    return PerturbedDataModule(path=path, clean=clean, **kwargs)


def fake_waterbirds(root: str, **kwargs):
    """``data=waterbirds`` on a tiny fake folder in the WILDS layout (written once at ``root``)."""
    from equidiff.data import WaterBirdsDataModule
    from tests.data.fakes import write_fake_waterbirds

    if not (Path(root) / "waterbirds_v1.0" / "metadata.csv").exists():
        write_fake_waterbirds(root)
    return WaterBirdsDataModule(root, **kwargs)


def fake_spuco_animals(root: str, **kwargs):
    """``data=spuco_animals`` on a tiny fake folder in spuco's layout (written once at ``root``)."""
    from equidiff.data import SpuCoAnimalsDataModule
    from tests.data.fakes import write_fake_spuco_animals

    if not (Path(root) / "spuco_birds").exists():
        write_fake_spuco_animals(root)
    kwargs["check_counts"] = False  # a few images per folder, not spuco's sizes (the config says true)
    return SpuCoAnimalsDataModule(root, **kwargs)
