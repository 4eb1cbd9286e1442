"""Export a trained model with diffusers' ``save_pretrained`` to a folder later runs reuse."""

from __future__ import annotations

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
    never leaves a half-written model where later runs look for one.
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
