"""Tiny stand-ins, built by Hydra from overrides, so that the ACE experiments run offline in seconds.

Each writes what it needs in the real on-disk format (once) and then builds the real object:

    data._target_=tests.ace.standins.fake_celeba           (also fake_celebahq, fake_bdd100k, fake_imagenet)
    classifier._target_=tests.ace.standins.tiny_densenet_decision   (DiVE / STEEX checkpoint layouts)
    metrics.mnac.metric.oracle._target_=tests.ace.standins.tiny_exported
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from equidiff.data import CelebADataModule, ImageNetDataModule
from equidiff.data.bdd100k import BDD100kDataModule
from equidiff.data.celebahq import CelebAHQDataModule
from equidiff.explain.classifiers import DenseNetDecision, load_densenet_decision, load_exported_model
from tests.data.fakes import CELEBA_ATTRIBUTES, write_fake_celeba, write_fake_imagenet, write_image


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- data in the real layouts
def write_fake_celebahq(root: str | Path, n: int = 6, size: tuple[int, int] = (16, 16), seed: int = 0) -> dict:
    """The CelebAMask-HQ files (images, attribute and mapping files) and CelebA's list_eval_partition.txt.

    HQ image k comes from CelebA image ``f"{1000 + 7 k:06d}.jpg"``, whose partition is ``k % 3`` (0 train,
    1 val, 2 test). Returns ``attrs`` (int n x 40 of -1/1) and ``codes``.
    """
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    attrs = torch.randint(0, 2, (n, len(CELEBA_ATTRIBUTES)), generator=g) * 2 - 1
    codes = [k % 3 for k in range(n)]
    for k in range(n):
        write_image(root / "CelebA-HQ-img" / f"{k}.jpg", k, size)
    with open(root / "CelebAMask-HQ-attribute-anno.txt", "w") as f:
        f.write(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n")
        f.writelines(f"{k}.jpg  " + " ".join(str(int(v)) for v in attrs[k]) + "\n" for k in range(n))
    with open(root / "CelebA-HQ-to-CelebA-mapping.txt", "w") as f:
        f.write("idx         orig_idx    orig_file   \n")
        f.writelines(f"{k:<12d}{1000 + 7 * k - 1:<12d}{1000 + 7 * k:06d}.jpg  \n" for k in range(n))
    partition = {f"{i:06d}.jpg": 0 for i in range(990, 1000 + 7 * n)}  # CelebA's, with unmapped images too
    partition.update({f"{1000 + 7 * k:06d}.jpg": codes[k] for k in range(n)})
    with open(root / "list_eval_partition.txt", "w") as f:
        f.writelines(f"{name} {code}\n" for name, code in partition.items())
    return {"root": root, "attrs": attrs, "codes": codes}


def write_fake_bdd100k(root: str | Path, counts: dict | None = None, size: tuple[int, int] = (20, 12)) -> Path:
    """``<root>/images/100k/<split>/<k>.jpg``."""
    root = Path(root)
    for split, n in (counts or {"train": 2, "val": 3, "test": 1}).items():
        for k in range(n):
            write_image(root / "images" / "100k" / split / f"{split[0]}{k:04d}.jpg", k, size)
    return root


def fake_celeba(root: str, **kwargs) -> CelebADataModule:
    if not (Path(root) / "list_attr_celeba.txt").exists():
        write_fake_celeba(root, n_train=2, n_val=3, n_test=2)
    return CelebADataModule(root, **kwargs)


def fake_celebahq(root: str, **kwargs) -> CelebAHQDataModule:
    if not (Path(root) / "CelebAMask-HQ-attribute-anno.txt").exists():
        write_fake_celebahq(root, n=9)
    return CelebAHQDataModule(root, **kwargs)


def fake_bdd100k(root: str, **kwargs) -> BDD100kDataModule:
    if not (Path(root) / "images" / "100k").exists():
        write_fake_bdd100k(root)
    return BDD100kDataModule(root, **kwargs)


def fake_imagenet(root: str, *, classes, **kwargs) -> ImageNetDataModule:
    """1000 class folders named ``n<index:08d>`` (so that ``n00000340`` is class 340), images in ``classes`` only."""
    root = Path(root)
    if not (root / "val").exists():
        write_fake_imagenet(root, wnids=list(classes), n_train=0, n_val=2)
        for i in range(1000):
            (root / "val" / f"n{i:08d}").mkdir(parents=True, exist_ok=True)
    return ImageNetDataModule(str(root), classes=list(classes), **kwargs)


# ----------------------------------------------------------------------------- models
def tiny_densenet_decision(path: str, *, layout: str = "dive", num_classes: int = 40, query_label: int = 31,
                           **kwargs):
    """A random DenseNet-121 decision model saved in the released ``layout`` at ``path`` (unless there), loaded
    through the real ``load_densenet_decision``."""
    path = Path(path)
    if not path.exists():
        torch.manual_seed(0)
        net = DenseNetDecision(num_classes)
        state = net.state_dict()
        if layout == "dive":
            ckpt = {"feat_extract": {k.removeprefix("feat_extract."): v for k, v in state.items()
                                     if k.startswith("feat_extract.")}, "classifier": net.classifier.state_dict()}
        else:
            ckpt = {"model_state_dict": state, "epoch": 3}
        _atomic_save(ckpt, path)
    return load_densenet_decision(path, layout=layout, num_classes=num_classes, query_label=query_label, **kwargs)


class _Projection(nn.Module):
    def __init__(self, outputs: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.lin = nn.Linear(3 * 16, outputs)

    def forward(self, x):
        return self.lin(self.pool(x).flatten(1))


def tiny_exported(path: str, what: str = "model", outputs: int = 8, image_size: int = 32) -> nn.Module:
    """A random pooled-linear model exported with ``torch.export`` at ``path`` (unless there), loaded back."""
    path = Path(path)
    if not path.exists():
        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        program = torch.export.export(_Projection(outputs).eval(), (torch.zeros(2, 3, image_size, image_size),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
        torch.export.save(program, str(tmp))
        os.replace(tmp, path)
    return load_exported_model(path, what)
