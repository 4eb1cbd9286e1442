"""Classifier training with group-annotated evaluation (seed 001: learning from counterfactuals).

``ClassifierTraining`` (standard or PGD adversarial training) plus ``WorstGroupAccuracy`` on the validation
and test splits, whose items carry ``group`` (label x spurious attribute): ``val/wga``, ``val/avg_acc``,
``val/group_acc/<g>``, the same under ``test/``, and ``weighted_acc`` when group weights are given (e.g. the
training split's group counts, WaterBirds' "average accuracy"). ``equidiff test`` also writes them to
``<output_dir>/test_metrics.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from equidiff.errors import ConfigError
from equidiff.methods.classifier_training import ClassifierTraining
from equidiff.metrics.groups import WorstGroupAccuracy
from equidiff.utils.io import atomic_write_bytes


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


class GroupClassifierTraining(ClassifierTraining):
    """``ClassifierTraining`` with worst-group accuracy on val/test (module docstring).

    Args:
        num_groups: the data's number of groups.
        group_weights: None, G proportions, or ``"train"``: the DataModule's ``train_group_counts()``.
        output_dir: where ``test`` writes ``test_metrics.json`` (None: nowhere).
        (the rest as ``ClassifierTraining``)
    """

    def __init__(self, *args, num_groups: int, group_weights: Sequence[float] | str | None = None,
                 output_dir: str | None = None, **kwargs):
        # plain containers, not Hydra's DictConfig: Lightning's hparams then load with weights_only=True
        # (`equidiff test ... ckpt_path=...`)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        group_weights = _plain(group_weights)
        super().__init__(*args, **kwargs)
        self.group_weights, self.output_dir = group_weights, output_dir
        weights = None if group_weights is None or isinstance(group_weights, str) else list(group_weights)
        self.val_groups = WorstGroupAccuracy(num_groups, weights=weights)
        self.test_groups = WorstGroupAccuracy(num_groups, weights=weights)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        k_data = getattr(dm, "num_classes", None)
        if k_data is not None and k_data != self.classifier.num_classes:
            raise ConfigError(f"the data has {k_data} classes but the classifier {self.classifier.num_classes}; set "
                              f"classifier.num_classes={k_data}")
        if self.group_weights == "train":
            if not hasattr(dm, "train_group_counts"):
                raise ConfigError("method.group_weights=train needs a DataModule with train_group_counts(); give "
                                  "the proportions as a list instead")
            counts = dm.train_group_counts()
            for m in (self.val_groups, self.test_groups):
                m.weights = WorstGroupAccuracy(len(counts), weights=counts).weights
        elif self.group_weights is not None and not isinstance(self.group_weights, str | Sequence):
            raise ConfigError(f"group_weights must be null, a list or 'train', got {self.group_weights!r}")

    def _update_groups(self, metric: WorstGroupAccuracy, batch: dict) -> None:
        if "group" not in batch:
            raise ConfigError(f"the evaluation items have no 'group' entry (they have {sorted(batch)}); use a "
                              f"group-annotated DataModule or method=classifier_training")
        with torch.no_grad():
            preds = self.classifier(batch[self.input_key]).argmax(-1)
        metric.update(preds, batch["label"], batch["group"])

    def _log_groups(self, metric: WorstGroupAccuracy, prefix: str) -> dict[str, float]:
        out = metric.compute()
        metric.reset()
        scalars = {f"{prefix}/wga": out["worst_group_acc"].item(), f"{prefix}/avg_acc": out["avg_acc"].item()}
        scalars.update({f"{prefix}/group_acc/{g}": a for g, a in enumerate(out["group_acc"].tolist())})
        if "weighted_acc" in out:
            scalars[f"{prefix}/weighted_acc"] = out["weighted_acc"].item()
        self.log_dict({k: v for k, v in scalars.items() if not math.isnan(v)}, rank_zero_only=False)
        return scalars

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._update_groups(self.val_groups, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_groups(self.val_groups, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._update_groups(self.test_groups, batch)

    def on_test_epoch_end(self) -> None:
        scalars = self._log_groups(self.test_groups, "test")
        scalars["test/acc"] = self.test_acc.compute().item()
        if self.output_dir is not None and self.trainer.is_global_zero:
            atomic_write_bytes(Path(self.output_dir) / "test_metrics.json",
                               (json.dumps(scalars, indent=2) + "\n").encode())
