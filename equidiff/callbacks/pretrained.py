"""Export a trained model with diffusers' ``save_pretrained`` to a folder later runs reuse."""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from equidiff.utils.io import temp_dir_beside

log = logging.getLogger(__name__)


class SavePretrained(Callback):
    """At the end of ``fit``, rank 0 calls ``pl_module.save_pretrained(dir)`` into ``dirpath``.

    The folder is written under a temporary name and swapped in with renames, so a crash
    never leaves a half-written model where later runs look for one. An export whose files equal the
    ones already there (a finished fit re-run, a requeued job) leaves the folder untouched, modification
    times included: later runs fingerprint the weights they read by size and mtime.
    """

    def __init__(self, dirpath: str):
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:
            log.warning("fast_dev_run: the model is not saved to %s", self.dirpath)
            return
        if trainer.is_global_zero:
            self.save(pl_module)
        trainer.strategy.barrier("equidiff_save_pretrained")

    def save(self, pl_module) -> Path:
        tmp = temp_dir_beside(self.dirpath)  # the umask's folder mode (mkdtemp alone gives 0700)
        try:
            pl_module.save_pretrained(str(tmp))
            if _same_files(tmp, self.dirpath):
                log.info("the trained model in %s is unchanged: left as it is", self.dirpath)
                return self.dirpath
            old = None
            if self.dirpath.exists():
                old = self.dirpath.with_name(f".{self.dirpath.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.dirpath, old)
            os.replace(tmp, self.dirpath)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("saved the trained model to %s", self.dirpath)
        return self.dirpath


def _same_files(a: Path, b: Path) -> bool:
    """Whether folders ``a`` and ``b`` hold the same files with the same bytes."""
    if not b.is_dir():
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)
