"""Counterfactuals and sparse attacks on a DataModule's samples (seed 001): any solver, one thin LightningModule.

``predict_step`` reads like the seed's recipe: pick each sample's target y~ by a rule (drawn from the sample's
own seed where random), solve the inverse-classification problem with the configured solver (S-CFE, GSE,
PGD, FGSM, CFE-l2, ...), and return a record with the counterfactual and its per-sample metrics.

The record (the p-CFE datasets of the learning-from-counterfactuals issue read it back):

* ``<input_key>``: the counterfactual x', under the data's own key: ``image`` (written as the PNG, so
  ``samples.npz`` is the perturbed dataset (x', y~)) or ``x`` for tabular data (in the sidecar);
* ``label`` = ``target`` = y~ (the perturbed dataset's label), ``source_label`` = y, ``index`` (the source
  item's position in its split), ``seed``;
* ``pred`` = f(x'), ``source_pred`` = f(x), ``valid`` (f(x') = y~, or f(x') != y untargeted), ``time``
  (the batch's solver time divided by the inputs attacked; 0 for an input not attacked), ``l2``, ``l0`` and
  for images ``acp``, ``anc``, ``d20``, all computed on the solver's float output;
* ``counterfactual``: the float x' for images (``keep_float``; the PNG is rounded to uint8), ``input``: the
  original x (``keep_input``; default for tabular data only, images are in the dataset already);
* ``correct`` (f(x) = y) and ``attacked``: with ``only_correct`` (GSE's evaluation protocol) a misclassified
  input is not attacked (x' = x, ``valid`` 0, ``attacked`` 0); otherwise every input is attacked.

Several targets per sample (``TargetRule("offsets")``, GSE's protocol: each input toward every other class, or
toward fixed label offsets): one record per input still, keyed by its seed (so resume and DDP shards stay whole
inputs), with ``target``, ``pred``, ``valid``, ``time`` and the metrics as (B, T) entries, ``counterfactual``
(B, T, C, H, W) with ``keep_float``, ``label`` = ``source_label`` = y, and no ``image`` (there is no single x').
The solver runs once per target column, on the whole batch, as the reference's test loop does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from equidiff.attacks.targets import TargetRule
from equidiff.errors import ConfigError
from equidiff.methods.common import require_grad_mode
from equidiff.metrics.counterfactual import ATOL, perturbation_stats
from equidiff.utils.precision import full_precision
from equidiff.utils.rng import generators_for


def _solver_keywords(solver: Callable) -> dict:
    return dict(getattr(solver, "keywords", {}) or {})


class Counterfactual(L.LightningModule):
    """``predict_step``: a counterfactual x' of every sample for its target y~ (see the module docstring).

    Args:
        classifier: the model to explain / attack (inputs as the DataModule gives them).
        solver: a partial ``solver(classifier, x, target, *, source, box, generators)`` (conf/solver/).
        targets: the ``TargetRule`` (uniform among the other classes, next, fixed, untargeted).
        input_key: the batch entry with the inputs ("image" or "x").
        box: the actionable set (low, high); None: the DataModule's ``box`` if it has one, else (-1, 1).
        keep_input, keep_float: also record x (``input``) / the float x' (``counterfactual``, images).
        patch_size, atol: d_{2,0} patch side and the "changed" threshold of the per-sample metrics (GSE's
            protocol counts exact changes: atol 0).
        only_correct: attack only inputs the classifier gets right (GSE's protocol); the others are recorded
            with ``attacked`` 0.
    """

    def __init__(self, classifier: nn.Module, solver: Callable, targets: TargetRule, *, input_key: str = "image",
                 box=None, keep_input: bool | None = None, keep_float: bool = True, patch_size: int = 8,
                 atol: float = ATOL, only_correct: bool = False):
        super().__init__()
        self.classifier, self.solver, self.targets = classifier.eval(), solver, targets
        self.input_key, self.box = input_key, box
        self.keep_input = (input_key != "image") if keep_input is None else keep_input
        self.keep_float, self.patch_size, self.atol = keep_float, int(patch_size), float(atol)
        self.only_correct = bool(only_correct)
        if self.atol < 0:
            raise ConfigError(f"method.atol must be >= 0 (0 counts every exact change, as GSE), got {atol}")
        # modules the solver carries (a fitted density) move to the device with this module
        self.solver_modules = nn.ModuleDict({k: v for k, v in _solver_keywords(solver).items()
                                             if isinstance(v, nn.Module)})
        solver_targeted = _solver_keywords(solver).get("targeted", True)
        if solver_targeted != targets.targeted:
            raise ConfigError(f"the target rule {targets.rule!r} and the solver (targeted={solver_targeted}) disagree; "
                              f"use method.targets.rule=untargeted with an untargeted solver (solver.targeted=false) "
                              f"and a targeted rule otherwise")
        self.num_classes = getattr(classifier, "num_classes", None) or targets.num_classes

    def on_predict_start(self) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if self.box is None:
            self.box = getattr(dm, "box", None) or (-1.0, 1.0)
        if self.num_classes is None:
            self.num_classes = getattr(dm, "num_classes", None)
        if self.targets.rule == "offsets":
            if self.num_classes is None:
                raise ConfigError("the offsets target rule needs the number of classes; set "
                                  "method.targets.num_classes")
            self.targets.offsets_for(self.num_classes)  # offsets that do not fit K fail before anything is written

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        if self.input_key not in batch:
            raise ConfigError(f"the batch has no {self.input_key!r} entry (it has {sorted(batch)}); set "
                              f"method.input_key")
        if "label" not in batch:
            raise ConfigError(f"the batch has no 'label' entry (it has {sorted(batch)}); counterfactuals and "
                              f"GSE's protocol need the true class of every input: use a labelled dataset/split")
        x, y, seeds = batch[self.input_key], batch["label"].long(), batch["seed"]
        gens = generators_for(seeds)
        target = self.targets(y, gens, num_classes=self.num_classes)  # 1. y~ by the rule: [B], or [B, T]
        multi = target.ndim == 2
        columns = target if multi else target[:, None]
        box = self.box if self.box is not None else (-1.0, 1.0)
        box = tuple(torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in box)
        with torch.no_grad(), full_precision():
            source_pred = self.classifier(x).argmax(-1)
        correct = source_pred == y
        attacked = correct if self.only_correct else torch.ones_like(correct)  # 2. GSE: only correct inputs
        rows = attacked.nonzero()[:, 0]
        sub_gens = [gens[i] for i in rows.tolist()]
        x_cf = x.detach()[:, None].repeat(1, columns.shape[1], *[1] * (x.ndim - 1))  # x' = x where not attacked
        elapsed = torch.zeros(columns.shape, dtype=torch.float64)
        for j in range(columns.shape[1]):  # 3. the inverse-classification problem, one target column at a time
            if len(rows) == 0:
                break
            start = time.perf_counter()
            # the solvers run in fp32 with autocast off whatever trainer.precision (their losses, step sizes and
            # stopping tests are tuned in fp32)
            with torch.enable_grad(), full_precision():
                x_cf[rows, j] = self.solver(self.classifier, x[rows], columns[rows, j], source=y[rows], box=box,
                                            generators=sub_gens).detach()
            elapsed[rows.cpu(), j] = (time.perf_counter() - start) / len(rows)
        flat = x_cf.flatten(0, 1)
        with torch.no_grad(), full_precision():
            pred = self.classifier(flat).argmax(-1).reshape(columns.shape)
        valid = (pred == columns) if self.targets.targeted else (pred != y[:, None])
        valid &= attacked[:, None]
        x_rep = x[:, None].expand_as(x_cf).flatten(0, 1)
        stats = {k: v.reshape(columns.shape) for k, v in
                 perturbation_stats(x_rep, flat, patch_size=self.patch_size, atol=self.atol).items()}  # 4. metrics
        if not multi:
            x_cf, pred, valid, elapsed = x_cf[:, 0], pred[:, 0], valid[:, 0], elapsed[:, 0]
            stats = {k: v[:, 0] for k, v in stats.items()}
        record = {"seed": seeds, "index": batch["index"], "label": y if multi else target, "target": target,
                  "source_label": y, "pred": pred, "source_pred": source_pred, "valid": valid.double(),
                  "correct": correct.double(), "attacked": attacked.double(), "time": elapsed, **stats}
        if not multi:
            record[self.input_key] = x_cf
        if self.input_key == "image" and self.keep_float:
            record["counterfactual"] = x_cf
        if self.keep_input:
            record["input"] = x.detach()
        return record
