"""Loggers that keep a run folder's history across interruptions (``conf/logger/``).

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a resumed fit, or an
``equidiff test`` into the fit's folder, loses the training history. ``CSVLogger`` here appends instead;
``equidiff.callbacks.FitResume`` has it cut the history back to the checkpoint when a fit resumes (all of it
when a fit starts over). ``wandb_logger`` continues the folder's previous wandb run.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from equidiff.utils.io import atomic_write_bytes


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing ``metrics.csv`` (its header is read back first)."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    cut_at_next_row = False

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        if self.cut_at_next_row and step is not None:
            self.cut_at_next_row = False
            self.truncate(step)
        super().log_metrics(metrics_dict, step)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place when a new metric appears: here through a temporary file, so a
        # kill during the rewrite cannot lose the history
        self._write_rows(fieldnames, self._read_rows()[1])

    def _read_rows(self) -> tuple[list[str], list[dict]]:
        with Path(self.metrics_file_path).open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write_rows(self, fieldnames: list[str], rows: list[dict]) -> None:
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.metrics_file_path, out.getvalue().encode())

    def truncate(self, step: int) -> None:
        """Drop the saved rows logged at ``step`` or later (and any unreadable row, e.g. one cut by a kill)."""
        self.save()
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        fields, rows = self._read_rows()
        keep = [r for r in rows if _step(r) is not None and _step(r) < step]
        if len(keep) < len(rows) or not path.read_bytes().endswith(b"\n"):  # a last row cut short by a kill
            self._write_rows(fields, keep)


def _step(row: dict) -> int | None:
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps the history in ``<save_dir>/<name>/<version>/metrics.csv``.

    It appends to an existing file instead of deleting it. After ``cut_history()`` (``FitResume`` calls it when
    a fit starts or resumes), the next row logged first drops the saved rows at its step or later: those that an
    interrupted run logged after its checkpoint, which the resumed run logs again (or, for a fit that starts
    over, the whole old history). With
    ``flush_logs_every_n_steps=1`` (``conf/logger/csv.yaml``) every row is on disk as soon as it is logged,
    so a killed run loses none of the rows that its checkpoint covers.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def cut_history(self) -> None:
        self.experiment.cut_at_next_row = True


_RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9_-]+)$")


def previous_wandb_run_id(save_dir: str) -> str | None:
    """The id of the latest wandb run under ``<save_dir>/wandb`` (its ``latest-run`` link), or None."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    try:
        name = latest.resolve(strict=True).name
    except OSError:
        return None
    m = _RUN_DIR.match(name)
    return m.group("id") if m else None


def wandb_logger(save_dir: str, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that continues the run folder's previous wandb run (same id, ``resume="allow"``): a
    resumed or re-run job logs into the same wandb run. Offline runs with the same id are merged in order by
    ``wandb sync``. Rows the interrupted run logged after its last checkpoint stay in wandb (the CSV log is
    cut back to the checkpoint; wandb is the mirror)."""
    if kwargs.get("id") is None and kwargs.get("version") is None:
        run_id = previous_wandb_run_id(save_dir)
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")
    return WandbLogger(save_dir=save_dir, **kwargs)
