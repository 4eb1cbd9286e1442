"""Robust accuracy of classifiers under L2 PGD (seed 002, section 4.2, Table 4.1), a thin LightningModule.

The seed's protocol: every classifier is attacked on the CIFAR-10 test set at each eps_test with
20-step untargeted PGD, step size 2.5 eps_test / 20, no random start, in [0, 1] pixel units
(``equidiff.attacks.pgd_attack``, through IBM's ART). Rows of the table are eps_test, columns the
classifiers (eps_train).

Accuracy at eps_test = 0 is the clean accuracy. It need not fall monotonically in eps_test: each
eps_test is a separate PGD run (step size proportional to eps), and a run with a larger ball can in
principle end on a point that a smaller one would not reach; in practice it falls, as in Table 4.1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from equidiff.analysis.plots import Series, plot_curves
from equidiff.analysis.report import check_classifiers, check_display_names, log_to_loggers, write_csv
from equidiff.analysis.stats import GridMoments
from equidiff.attacks.pgd import pgd_attack
from equidiff.errors import ConfigError
from equidiff.guidance.energies import check_labels
from equidiff.methods.common import require_grad_mode
from equidiff.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

COLUMNS = ("classifier", "eps_test", "correct", "total", "accuracy")


def accuracy_key(classifier: str, eps: float) -> str:
    """The logged name of one accuracy: ``test/acc/<classifier>/eps_<eps>``."""
    return f"test/acc/{classifier}/eps_{float(eps)}"


def markdown_table(rows: Sequence[Mapping], labels: Mapping[str, str], test_eps: Sequence[float]) -> str:
    """Rows eps_test, columns the classifiers (eps_train), accuracies in percent, like Table 4.1."""
    acc = {(r["classifier"], r["eps_test"]): r["accuracy"] for r in rows}
    lines = ["| eps-test \\ eps-train | " + " | ".join(labels.values()) + " |",
             "| --- |" + " --- |" * len(labels)]
    for eps in test_eps:
        cells = [f"{100 * acc[(name, eps)]:.2f}%" for name in labels]
        lines.append(f"| {float(eps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class RobustAccuracy(L.LightningModule):
    """``equidiff test``: accuracy of every classifier under PGD at every eps_test (Table 4.1).

    ``test_step`` attacks the batch with each (classifier, eps_test) and adds the correct predictions
    to a sum-reduced ``GridMoments`` (exact under DDP). At the end rank 0 writes
    ``robust_accuracy.csv`` (columns ``COLUMNS``), ``robust_accuracy.md`` (the table) and
    ``robust_accuracy.png`` into ``output_dir``; every accuracy is logged as
    ``test/acc/<classifier>/eps_<eps>`` (and returned by ``trainer.test``), and the table goes to the
    loggers that take tables (wandb).

    Args:
        classifiers: ``{name: classifier}`` taking images in [-1, 1]; the table's columns, in order.
        test_eps: the L2 budgets eps_test in [0, 1] pixel units; the table's rows.
        steps: PGD iterations.
        rel_step_size: step size = rel_step_size * eps_test / steps (2.5 in the seed).
        norm: the PGD norm (2 in the seed; "inf" works too).
        output_dir: where the files go.
        display_names: ``{name: column label}`` (e.g. the training eps); default the names.
        name: file stem.
    """

    def __init__(self, classifiers: Mapping[str, nn.Module], *, output_dir: str,
                 test_eps: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0), steps: int = 20, rel_step_size: float = 2.5,
                 norm: int | float | str = 2, display_names: Mapping[str, str] | None = None,
                 name: str = "robust_accuracy"):
        super().__init__()
        self.classifiers = nn.ModuleDict(check_classifiers(classifiers))
        self.labels = check_display_names(list(self.classifiers), display_names)
        self.test_eps = [float(e) for e in test_eps]
        if not self.test_eps:
            raise ConfigError("test_eps is empty: give at least one budget, e.g. method.test_eps=[0,0.5]")
        if any(e < 0 for e in self.test_eps) or len(set(self.test_eps)) != len(self.test_eps):
            raise ConfigError(f"test_eps must be distinct and >= 0, got {self.test_eps}")
        if steps < 1 or rel_step_size <= 0:
            raise ConfigError(f"PGD needs steps >= 1 and rel_step_size > 0, got {steps}, {rel_step_size}")
        self.steps, self.rel_step_size, self.norm = int(steps), float(rel_step_size), norm
        self.output_dir, self.name = Path(output_dir), name
        self.stats = GridMoments(len(self.classifiers) * len(self.test_eps), 1)

    def on_test_epoch_start(self) -> None:
        require_grad_mode()  # PGD takes gradients inside test_step
        self.stats.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        for i, clf in enumerate(self.classifiers.values()):
            if getattr(clf, "num_classes", None) is not None:
                check_labels(y, clf.num_classes)
            for j, eps in enumerate(self.test_eps):
                # untargeted PGD from x itself (no random start); eps = 0 leaves x as it is
                with torch.enable_grad():
                    x_adv = pgd_attack(clf, x, y, eps=eps, steps=self.steps,
                                       step_size=self.rel_step_size * eps / self.steps, norm=self.norm)
                correct = (clf(x_adv).argmax(-1) == y).double()
                self.stats.update(torch.full_like(y, i * len(self.test_eps) + j), correct)

    def rows(self) -> list[dict]:
        """One dict per (classifier, eps_test) with ``COLUMNS`` (collective under DDP)."""
        res = self.stats.compute()
        out = []
        for i, name in enumerate(self.classifiers):
            for j, eps in enumerate(self.test_eps):
                c = i * len(self.test_eps) + j
                out.append({"classifier": name, "eps_test": eps, "correct": int(res["sum"][c, 0]),
                            "total": int(res["count"][c]), "accuracy": res["mean"][c, 0].item()})
        return out

    def on_test_epoch_end(self) -> None:
        rows = self.rows()
        for r in rows:  # the values are already reduced over processes: log them as they are, without a sync
            self.log(accuracy_key(r["classifier"], r["eps_test"]), r["accuracy"])
        if not self.trainer.is_global_zero:
            return
        table = markdown_table(rows, self.labels, self.test_eps)
        write_csv(self.output_dir / f"{self.name}.csv", COLUMNS, rows)
        atomic_write_bytes(self.output_dir / f"{self.name}.md", table.encode())
        series = [Series(label, self.test_eps, [100 * r["accuracy"] for r in rows if r["classifier"] == name],
                         marker="o") for name, label in self.labels.items()]
        png = plot_curves(series, self.output_dir / f"{self.name}.png",
                          title=f"Accuracy under {self.steps}-step L{self.norm} PGD (seed 002, Table 4.1)",
                          xlabel="eps-test (L2, [0, 1] pixels)", ylabel="accuracy (%)")
        log.info("robust accuracy (%d steps of L%s PGD):\n%s", self.steps, self.norm, table)
        acc = {(r["classifier"], r["eps_test"]): r["accuracy"] for r in rows}
        data = [[eps, *[acc[(name, eps)] for name in self.labels]] for eps in self.test_eps]
        log_to_loggers(self.trainer, images={f"{self.name}/plot": png},
                       tables={f"{self.name}/table": (["eps_test", *self.labels.values()], data)})
