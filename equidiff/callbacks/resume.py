"""Fit checkpoints and resume: a resumed fit continues exactly where the interrupted one stood.

Checkpoints of a fit (``conf/callbacks/train.yaml``) live in ``<output_dir>/checkpoints/``:

- ``last.ckpt``: the latest epoch, rewritten at the end of every training epoch. A fit resumes from it, and
  ``equidiff test ... ckpt_path=<output_dir>/checkpoints/last.ckpt`` evaluates the last epoch (no model selection).
  A checkpoint written under this name in the middle of an epoch resumes exactly too, when it is written in a
  callback's ``on_train_batch_end`` (as ``ModelCheckpoint(every_n_train_steps=...)`` does).
- ``best.ckpt``: the epoch with the best monitored validation metric (``callbacks.checkpoint.monitor`` / ``mode``).

``equidiff fit`` starts from ``last.ckpt`` by itself when the file exists (``fit_ckpt_path``): a requeued or
re-run job resumes, and a finished fit re-run trains nothing. What makes the resumed run equal to an
uninterrupted one, bit for bit:

- the model, optimizer, schedulers, loop counters and callback states: Lightning's checkpoint;
- the training loader's place in its shuffling stream: ``equidiff.data.base.ResumableDataLoader``;
- every process's global random state (torch, CUDA, numpy, Python): ``FitResume`` below, restored when
  training starts (after the modules' ``on_fit_start``, which may reseed);
- the log history: ``equidiff.loggers.CSVLogger`` appends to ``metrics.csv``, and ``FitResume`` has it cut the
  history back to the checkpoint (rows the interrupted run logged after its checkpoint are logged again).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)


def _rng_states() -> dict:
    # Lightning's own collector (lightning.fabric.utilities.seed._collect_rng_states) is private and keeps
    # numpy's state as an ndarray, which `torch.load(weights_only=True)` refuses: tensors and ints here.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("the checkpoint holds the random state of %d CUDA devices, this process sees %d: CUDA "
                    "randomness after the resume differs from an uninterrupted run", len(cuda),
                    torch.cuda.device_count() if torch.cuda.is_available() else 0)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class FitResume(Callback):
    """Carries every process's random state in each checkpoint and restores it when a fit resumes.

    Under DDP the states of all processes are gathered into the checkpoint (Lightning writes checkpoints
    from every process, rank 0 saving the file). On resume, training starts with each process's saved
    state; the loggers' history is cut back to the checkpoint (``cut_history`` where a logger has it); and
    the log says where the fit resumed, or that it had already finished.
    """

    def __init__(self):
        super().__init__()
        self._saved: list[dict] | None = None
        self._trained = False

    def state_dict(self) -> dict:
        state = _rng_states()
        world, _ = _world()
        if world == 1:
            return {"rng": [state]}
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, state)
        return {"rng": gathered}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained = True
        # the next row logged replaces the rows at its step or later: the interrupted run logged them after the
        # checkpoint, and this run logs them again (a fit that starts over replaces the whole history)
        for logger in trainer.loggers:
            if trainer.is_global_zero and hasattr(logger, "cut_history"):
                logger.cut_history()
        if trainer.ckpt_path is None:
            return
        world, rank = _world()
        if self._saved is None:
            log.warning("the checkpoint %s holds no random state (written by an older equidiff?): the resumed fit "
                        "will not equal an uninterrupted one", trainer.ckpt_path)
        elif len(self._saved) != world:
            log.warning("the checkpoint %s was written by %d process(es), this fit runs %d: the random state is not "
                        "restored, so the resumed fit will not equal an uninterrupted one", trainer.ckpt_path,
                        len(self._saved), world)
        else:
            _set_rng_states(self._saved[rank])
        self._saved = None
        log.info("resumed fit from %s at epoch %d, step %d", trainer.ckpt_path, trainer.current_epoch,
                 trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None and not self._trained:
            log.info("fit already finished: %s is at epoch %d, step %d (max_epochs=%s, max_steps=%s); nothing was "
                     "trained", trainer.ckpt_path, trainer.current_epoch, trainer.global_step, trainer.max_epochs,
                     trainer.max_steps)


def fit_ckpt_path(cfg, trainer) -> str | None:
    """The checkpoint ``equidiff fit`` starts from: ``ckpt_path`` when set; else ``last.ckpt`` in the
    checkpoint folder of the trainer's ``ModelCheckpoint`` callbacks when it exists (a requeued job resumes, a
    finished fit re-run trains nothing), after checking that the folder holds a run of the same
    configuration; else None (a fresh fit, or a ``fast_dev_run``)."""
    from equidiff.utils.runs import check_resume_compatible

    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if trainer.fast_dev_run:  # a smoke test never resumes (nor writes checkpoints)
        return None
    dirs = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    found = [d / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}" for d in sorted(dirs)]
    found = [p for p in found if p.is_file()]
    if not found:
        return None
    last = max(found, key=lambda p: p.stat().st_mtime)
    check_resume_compatible(cfg, Path(cfg.paths.output_dir))
    log.info("resuming fit from %s (pass ckpt_path=... to start from another checkpoint, or delete it to "
             "start over)", last)
    return str(last)
