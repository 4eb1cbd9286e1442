"""Classifier training: standard (ERM) or PGD adversarial training (Madry et al. 2018), thin wiring."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchmetrics import Accuracy, MeanMetric

from equidiff.attacks.pgd import pgd_attack


class ClassifierTraining(L.LightningModule):
    """Train a ``Classifier`` (images in [-1, 1]) with cross-entropy, optionally on PGD examples.

    Args:
        classifier: the wrapped network to train.
        optimizer / lr_scheduler: Hydra partials (``optimizer(params)``, ``lr_scheduler(optimizer)``).
        adversarial: None for standard training, or PGD settings for adversarial training,
            ``{eps, steps, norm, step_size (optional), random_init}`` (eps in [0, 1] pixel units);
            validation then also reports robust accuracy at that budget.
        input_key: the batch entry with the inputs.
        export: optional ``{kind, ...}`` written to ``config.json`` next to the weights by
            ``save_pretrained`` so that ``load_small_net`` can rebuild the network.
    """

    def __init__(self, classifier: torch.nn.Module, optimizer: Callable, lr_scheduler: Callable | None = None,
                 adversarial: Mapping | None = None, input_key: str = "image", export: Mapping | None = None):
        super().__init__()
        self.classifier = classifier
        self.classifier.net.requires_grad_(True)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        # plain containers (Hydra passes DictConfigs): checkpoints must load with weights_only=True
        self.adversarial = _plain(adversarial) if adversarial else None
        self.input_key, self.export = input_key, _plain(export or {})
        k = classifier.num_classes
        self.val_acc = Accuracy(task="multiclass", num_classes=k)
        self.val_robust_acc = Accuracy(task="multiclass", num_classes=k)
        self.val_loss = MeanMetric()  # metrics, not sync_dist logging: exact with unequal shards under DDP
        self.test_acc = Accuracy(task="multiclass", num_classes=k)
        self.test_robust_acc = Accuracy(task="multiclass", num_classes=k)
        self.save_hyperparameters({"adversarial": self.adversarial, "input_key": input_key, "export": self.export})

    def on_train_epoch_start(self) -> None:
        self.classifier.train()  # the Classifier wrapper is built in eval mode; train BatchNorm/dropout here

    def _attack(self, x: torch.Tensor, y: torch.Tensor, random_init: bool) -> torch.Tensor:
        a = self.adversarial
        with torch.enable_grad():
            return pgd_attack(self.classifier, x, y, eps=a["eps"], steps=a["steps"], step_size=a.get("step_size"),
                              norm=a.get("norm", 2), random_init=random_init)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch[self.input_key], batch["label"]
        if self.adversarial:
            x = self._attack(x, y, random_init=self.adversarial.get("random_init", True))  # Madry: random start
        loss = F.cross_entropy(self.classifier(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch[self.input_key], batch["label"]
        logits = self.classifier(x)
        self.val_acc(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log("val/loss", self.val_loss, batch_size=len(y))
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(y))
        if self.adversarial:
            self.val_robust_acc(self.classifier(self._attack(x, y, random_init=False)), y)
            self.log("val/robust_acc", self.val_robust_acc, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch[self.input_key], batch["label"]
        self.test_acc(self.classifier(x), y)
        self.log("test/acc", self.test_acc, batch_size=len(y))
        if self.adversarial:
            self.test_robust_acc(self.classifier(self._attack(x, y, random_init=False)), y)
            self.log("test/robust_acc", self.test_robust_acc, batch_size=len(y))

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.classifier.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def save_pretrained(self, path: str) -> None:
        """Write ``model.safetensors`` (the network's state dict) and ``config.json`` into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.classifier.net.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        meta = {"num_classes": self.classifier.num_classes, "adversarial": self.adversarial, **self.export}
        (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def _plain(mapping: Mapping) -> dict:
    """A (possibly nested) Hydra DictConfig or mapping as plain Python containers."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping)
