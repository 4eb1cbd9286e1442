"""Shared plumbing of the analyses: classifier dicts, CSV files, and sending results to the loggers."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def check_classifiers(classifiers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """A non-empty ``{name: classifier}`` with names usable as metric keys and file names."""
    if not classifiers:
        raise ConfigError("no classifiers given: set method.classifiers to a dict {name: classifier config}")
    out = {}
    for name, clf in dict(classifiers).items():
        name = str(name)
        if not name or any(c in name for c in "./\\ "):
            raise ConfigError(f"classifier name {name!r} must be non-empty and contain no '.', '/', '\\' or space")
        if not isinstance(clf, nn.Module):
            raise ConfigError(f"classifier {name!r} is a {type(clf).__name__}, not a torch module")
        out[name] = clf
    return out


def check_display_names(names: Sequence[str], display_names: Mapping[str, str] | None) -> dict[str, str]:
    """``{name: label}`` for plots and tables (default: the name).

    Labels of classifiers that are not there are ignored with a warning, so that an experiment's labels
    survive dropping some of its classifiers (``~method.classifiers.<name>``); a typo shows in the log.
    """
    display_names = dict(display_names or {})
    unknown = sorted(set(display_names) - set(names))
    if unknown:
        log.warning("display_names names classifier(s) %s that are not in method.classifiers %s; ignored",
                    unknown, list(names))
    return {n: str(display_names.get(n, n)) for n in names}


def num_classes_of(classifiers: Mapping[str, nn.Module], num_classes: int | None = None) -> int:
    """The classifiers' common number of classes (``num_classes`` attribute, or given)."""
    found = {n: getattr(c, "num_classes", None) for n, c in classifiers.items()}
    known = {k for k in found.values() if k is not None}
    if num_classes is None:
        if len(known) != 1 or None in found.values():
            raise ConfigError(f"cannot tell the number of classes from the classifiers ({found}); set "
                              f"method.num_classes")
        num_classes = known.pop()
    elif known - {int(num_classes)}:
        raise ConfigError(f"method.num_classes={num_classes} but the classifiers have {found} classes")
    return int(num_classes)


def _cell(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[Mapping]) -> Path:
    """Write ``rows`` (dicts) with a header ``columns``, atomically; floats at full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    atomic_write_bytes(path, buf.getvalue().encode())
    return Path(path)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_to_loggers(trainer, *, images: Mapping[str, Path] | None = None,
                   tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence]]] | None = None) -> None:
    """Send images (``log_image``) and tables (``log_table``) to the loggers that support them (wandb)."""
    for logger in trainer.loggers:
        for key, path in (images or {}).items():
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)])
        for key, (columns, data) in (tables or {}).items():
            if hasattr(logger, "log_table"):
                logger.log_table(key=key, columns=list(columns), data=[list(r) for r in data])
        logger.save()
