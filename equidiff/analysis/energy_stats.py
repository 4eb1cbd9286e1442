"""Class-wise energy statistics on the training set (seed 002, section 4.8, Fig. 4.12) and their cache.

For each classifier and class y: the mean and std of E(x) = -logsumexp f(x) and E(x, y) = -f(x)[y]
over the training images of class y. The means of E(x) are the fixed targets E(x*)[y] of the
"dual objective" L = E(x, y) + lambda |E(x*)[y] - E(x)| (eqs. 4.5, 4.6), so this analysis also
caches them, one small JSON file per classifier, read back with ``load_class_energy_means``.

It runs as ``equidiff predict experiment=robust_energy/analysis_class_energy_stats``: ``equidiff test``
iterates the test split, whereas predict iterates ``data.predict_split``, which the experiment sets
to ``train`` (with ``data.val_size=0``: all 50,000 CIFAR-10 training images). Predict shards the data
without repeating any sample, and the statistics are sum-reduced, so the result is exact under DDP.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from equidiff.analysis.plots import plot_class_stats
from equidiff.analysis.report import (
    check_classifiers,
    check_display_names,
    log_to_loggers,
    num_classes_of,
    write_csv,
)
from equidiff.analysis.stats import GridMoments
from equidiff.errors import ConfigError
from equidiff.guidance.energies import check_labels, joint_energy, marginal_energy
from equidiff.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

COLUMNS = ("classifier", "class", "class_name", "n", "accuracy", "mean_marginal_energy", "std_marginal_energy",
           "mean_joint_energy", "std_joint_energy")
CREATE_COMMAND = "equidiff predict experiment=robust_energy/analysis_class_energy_stats"
DEFAULT_TITLE = "Class-wise E(x) and E(x, y) statistics on the training set (seed 002, Fig. 4.12)"


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def write_class_energy_stats(path: str | Path, classifier: str, stats: Mapping[str, Sequence[float]],
                             split: str | None = None) -> Path:
    """Write the cache file ``{"classifier", "num_classes", "mean_marginal_energy", "std_marginal_energy",
    "mean_joint_energy", "std_joint_energy", "n", "split"}`` (non-finite values as null), atomically."""
    k = len(stats["mean_marginal_energy"])
    doc = {"classifier": classifier, "num_classes": k, "split": split}
    for key in ("mean_marginal_energy", "std_marginal_energy", "mean_joint_energy", "std_joint_energy"):
        doc[key] = _finite_or_none(stats[key])
    doc["n"] = [int(v) for v in stats["n"]]
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    return Path(path)


def load_class_energy_means(path: str | Path, num_classes: int | None, *, classifier: str | None = None,
                            key: str = "mean_marginal_energy") -> torch.Tensor:
    """The cached class-wise means E(x*)[y] (float32 [num_classes]) of one classifier.

    Args:
        path: the JSON file written by the class-energy analysis.
        num_classes: the number of classes the caller uses (a mismatch is a ConfigError; None: not checked).
        classifier: if given, the file must belong to this classifier name.
        key: which statistic, ``mean_marginal_energy`` (default, eq. 4.5) or ``mean_joint_energy``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no class-wise energy statistics at {path}. Create them with `{CREATE_COMMAND}` "
                          f"(it writes <paths.cache_dir>/energy_stats/<classifier name>.json for every classifier "
                          f"in method.classifiers; set method.cache_path to write elsewhere)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable JSON file ({e}); re-create it with `{CREATE_COMMAND}`") from e
    if not isinstance(doc, dict) or key not in doc or "num_classes" not in doc:
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{path} holds no {key!r} and 'num_classes' (found {found}); re-create it with "
                          f"`{CREATE_COMMAND}`")
    if classifier is not None and doc.get("classifier") != classifier:
        raise ConfigError(f"{path} holds the statistics of classifier {doc.get('classifier')!r}, not {classifier!r}")
    values = doc[key]
    if not isinstance(values, list) or len(values) != int(doc["num_classes"]):
        raise ConfigError(f"{path}: {key} holds {len(values) if isinstance(values, list) else values!r} values for "
                          f"num_classes={doc['num_classes']}; re-create it with `{CREATE_COMMAND}`")
    if num_classes is not None and len(values) != int(num_classes):
        raise ConfigError(f"{path} holds statistics for {len(values)} classes, but {num_classes} are expected; "
                          f"re-create it for this classifier with `{CREATE_COMMAND}`")
    missing = [y for y, v in enumerate(values) if v is None]
    if missing:
        raise ConfigError(f"{path}: classes {missing} had no samples, so their {key} is unknown; compute the "
                          f"statistics on a split that holds every class")
    return torch.tensor(values, dtype=torch.float32)


class ClassEnergyStats(L.LightningModule):
    """``equidiff predict`` (over ``data.predict_split``): per classifier and class, mean/std of E(x), E(x, y).

    At the end, rank 0 writes ``<name>.csv`` (one row per classifier and class, columns ``COLUMNS``) and
    ``<name>.png`` (Fig. 4.12: mean +- std per class, one colour per classifier) into ``output_dir``,
    one cache file per classifier at ``cache_path.format(name=<classifier name>)``, and sends the
    plot, the table and per-classifier means to the loggers.

    Args:
        classifiers: ``{name: classifier}`` taking images in [-1, 1].
        output_dir: where the CSV and PNG go.
        cache_path: the cache file of each classifier, with ``{name}`` for its name (None: no cache).
        num_classes: K (default: the classifiers' ``num_classes``).
        name: file stem of the CSV and PNG.
        title, display_names: plot title and ``{name: legend label}``.
        class_names: names for the plot and CSV (default: the DataModule's ``class_names``, else the
            classifiers', else 0..K-1).
    """

    def __init__(self, classifiers: Mapping[str, nn.Module], *, output_dir: str,
                 cache_path: str | None = None, num_classes: int | None = None, name: str = "class_energy",
                 title: str | None = None, display_names: Mapping[str, str] | None = None,
                 class_names: Sequence[str] | None = None):
        super().__init__()
        self.classifiers = nn.ModuleDict(check_classifiers(classifiers))
        self.labels = check_display_names(list(self.classifiers), display_names)
        self.num_classes = num_classes_of(self.classifiers, num_classes)
        if cache_path is not None and "{name}" not in str(cache_path) and len(self.classifiers) > 1:
            raise ConfigError(f"cache_path {cache_path!r} needs a '{{name}}' placeholder: there are "
                              f"{len(self.classifiers)} classifiers")
        self.cache_path = cache_path
        self.output_dir, self.name = Path(output_dir), name
        self.title = title or DEFAULT_TITLE
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{len(self.class_names)} class_names for {self.num_classes} classes")
        # one cell per (classifier, class); values: E(x), E(x, y), correct
        self.stats = GridMoments(len(self.classifiers) * self.num_classes, 3)

    def on_predict_epoch_start(self) -> None:
        self.stats.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        x, y = batch["image"], batch["label"]
        check_labels(y, self.num_classes)
        for i, clf in enumerate(self.classifiers.values()):
            logits = clf(x)
            values = torch.stack([marginal_energy(logits).double(), joint_energy(logits, y).double(),
                                  (logits.argmax(-1) == y).double()], dim=1)
            self.stats.update(i * self.num_classes + y, values)
        return {"index": batch["index"], "label": y}

    def rows(self) -> list[dict]:
        """One dict per (classifier, class) with ``COLUMNS`` (collective under DDP: every rank calls it)."""
        res = self.stats.compute()
        names = self._class_names()
        out = []
        for i, clf in enumerate(self.classifiers):
            for y in range(self.num_classes):
                c = i * self.num_classes + y
                mean, std = res["mean"][c].tolist(), res["std"][c].tolist()
                out.append({"classifier": clf, "class": y, "class_name": names[y], "n": int(res["count"][c]),
                            "accuracy": mean[2], "mean_marginal_energy": mean[0], "std_marginal_energy": std[0],
                            "mean_joint_energy": mean[1], "std_joint_energy": std[1]})
        return out

    def _class_names(self) -> list[str]:
        names = self.class_names
        if names is None and self._trainer is not None:
            try:
                names = getattr(self.trainer.datamodule, "class_names", None)
            except Exception:  # a DataModule whose class_names cannot be read (missing meta file)
                names = None
        for clf in self.classifiers.values():  # else the first classifier's own class names
            names = names if names is not None else getattr(clf, "class_names", None)
        if names is None or len(names) != self.num_classes:
            names = [str(y) for y in range(self.num_classes)]
        return list(names)

    def on_predict_epoch_end(self) -> None:
        rows = self.rows()
        if not self.trainer.is_global_zero:
            return
        split = getattr(self.trainer.datamodule, "predict_split", None)
        csv_path = write_csv(self.output_dir / f"{self.name}.csv", COLUMNS, rows)
        png_path = self.make_plot(rows)
        written = [csv_path, png_path]
        for clf in self.classifiers:
            mine = [r for r in rows if r["classifier"] == clf]
            stats = {key: [r[key] for r in mine] for key in COLUMNS[5:]}
            stats["n"] = [r["n"] for r in mine]
            if self.cache_path is not None:
                written.append(write_class_energy_stats(str(self.cache_path).format(name=clf), clf, stats, split))
        log.info("%s: wrote %s", self.name, ", ".join(str(p) for p in written))
        for logger in self.trainer.loggers:
            for y in range(self.num_classes):
                at_y = [r for r in rows if r["class"] == y]
                logger.log_metrics({f"{self.name}/{key}/{r['classifier']}": r[key] for r in at_y
                                    for key in ("mean_marginal_energy", "std_marginal_energy", "mean_joint_energy")},
                                   step=y)
        log_to_loggers(self.trainer, images={f"{self.name}/plot": png_path},
                       tables={f"{self.name}/table": (COLUMNS, [[r[c] for c in COLUMNS] for r in rows])})

    def make_plot(self, rows: list[dict]) -> Path:
        panels = {}
        for ylabel, key in (("E(x) = -logsumexp f(x)", "marginal_energy"), ("E(x, y) = -f(x)[y]", "joint_energy")):
            panels[ylabel] = {label: ([r[f"mean_{key}"] for r in rows if r["classifier"] == name],
                                      [r[f"std_{key}"] for r in rows if r["classifier"] == name])
                              for name, label in self.labels.items()}
        return plot_class_stats(self._class_names(), panels, self.output_dir / f"{self.name}.png", title=self.title)
