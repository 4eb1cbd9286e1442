"""SIGTERM and SIGUSR1 end a run cleanly: save what can be saved, say so, exit with 128 + the signal number.

SIGTERM is what ``timeout``, Kubernetes and SLURM (at the time limit, on ``scancel``, on ``scontrol requeue``)
send first; SIGUSR1 is SLURM's usual early warning (``#SBATCH --signal=USR1@120``). On either one:

* ``fit`` stops at the next training-batch end (or validation end), all DDP ranks at the same step, and saves
  ``<output_dir>/checkpoints/last.ckpt``, the checkpoint ``equidiff fit`` resumes from. The model is not
  exported. Lightning's SLURM auto-requeue (``hpc_ckpt_*.ckpt`` in the output folder, then ``scontrol
  requeue``) never runs: equidiff's handler is in place before Lightning registers its own, and Lightning
  leaves a signal that already has a handler alone. Requeueing is the job script's business (slurm/_common.sh).
* ``predict`` / ``test`` / ``validate``: each rank stops after its current batch (under DDP the ranks' batch
  counts may differ, so there is no common step to agree on). The samples written so far stay; the same
  command finishes the others (the writer skips them). Nothing is merged.
* A signal before the first batch stops at once (nothing to save); one after the last safe point lets the run
  finish its outputs, then exits the same way.
* The exit status is ``128 + signum`` (143 for SIGTERM, 138 for SIGUSR1), the status a shell reports for a
  process ended by that signal: ``equidiff fit && equidiff predict`` stops, and a job script can tell a stop
  from an error (1, 2). Rank 0 prints one line on stderr saying what was saved and how to go on.
* DDP: a rank forwards the signal once to the ranks it started (Lightning's subprocess launcher) or to the
  rank that started it, so ``kill <pid of rank 0>`` stops every rank; under SLURM every task gets the signal.
  Ranks that Lightning started as subprocesses end with status 0 after a clean stop: Lightning's launcher
  SIGKILLs every process as soon as one of its children ends with an error, which would cut rank 0's own stop
  short; rank 0's status is the run's.

Why not Lightning's own signal handling (``trainer/connectors/signal_connector.py``): its SIGTERM handler
calls ``dist.broadcast`` inside the handler, a collective that the other ranks do not match in predict (they
may be in a barrier), and its ``SIGTERMException`` is a ``SystemExit`` with status 0 that the predict loop never
raises; SIGUSR1 is handled only under SLURM with auto-requeue (an HPC checkpoint, not the checkpoint resume
takes). So equidiff installs its own handler, which only records the signal, and acts at the loops' batch
boundaries through a Callback, using Lightning's ``strategy.reduce`` for the ranks' agreement and
``trainer.save_checkpoint`` for the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from equidiff.utils.distributed import launcher_pid

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + signum, as a shell reports a signal's end."""
    return 128 + int(signum)


class Stopped(SystemExit):
    """A run stopped by a signal. ``where``: "startup", "loop" (at a batch boundary) or "finished"."""

    def __init__(self, signum: int, where: str):
        super().__init__(exit_status(signum))
        self.signum, self.where = int(signum), where


class StopOnSignal(Callback):
    """The handler's state and the loop hooks where a recorded signal is acted on (see the module docstring).

    Added to the trainer by :func:`stop_on_signals`, after every configured callback, so that at a batch end
    the sample writer has written the batch before the run stops.
    """

    def __init__(self, verb: str, output_dir: str | Path):
        super().__init__()
        self.verb = verb
        self.output_dir = Path(output_dir)
        self.checkpoint_path = self.output_dir / "checkpoints" / "last.ckpt"
        self.signum: int | None = None
        self.phase = "startup"  # -> "loop" when a loop starts -> "finished" after the last safe point
        self.saved: Path | None = None
        self.step: int | None = None
        self.trainer = None

    # ------------------------------------------------------------------ the handler
    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return  # a repeated or forwarded signal: the first one is being acted on
        self.signum = int(signum)
        self._forward(signum)
        if self.phase == "startup":
            raise Stopped(signum, "startup")

    def _forward(self, signum) -> None:
        """Pass the signal on once: to the ranks this process started, or to the rank that started it."""
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        for proc in getattr(launcher, "procs", None) or []:  # Lightning's _SubprocessScriptLauncher
            with contextlib.suppress(OSError):
                if proc.poll() is None:
                    proc.send_signal(signum)
        parent = launcher_pid()
        if parent is not None:
            with contextlib.suppress(OSError):
                os.kill(parent, signum)

    # ------------------------------------------------------------------ entering the loops
    def _enter_loop(self) -> None:
        if self.phase == "startup":
            self.phase = "loop"
        # Lightning registered its own SIGTERM handler just before the loops (around ours): take it back
        if threading.current_thread() is threading.main_thread():
            self.install()

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._enter_loop()

    def on_train_start(self, trainer, pl_module) -> None:
        self._enter_loop()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._enter_loop()

    def on_test_start(self, trainer, pl_module) -> None:
        self._enter_loop()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._enter_loop()

    # ------------------------------------------------------------------ fit: every rank at the same step
    def _fit_stop_point(self, trainer, *, last: bool = False) -> None:
        import torch

        signum = self.signum or 0
        if trainer.world_size > 1:
            # the largest signal number any rank recorded (0: none); every rank calls this at the same point. On
            # the strategy's device (NCCL reduces CUDA tensors only); Lightning syncs once per step under DDP too
            mine = torch.tensor(float(signum), device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(mine, reduce_op="max").item())
        if last:
            self.phase = "finished"
        if not signum:
            return
        self.signum = self.signum or signum
        self.step = trainer.global_step
        if trainer.sanity_checking or trainer.fast_dev_run:
            raise Stopped(self.signum, "startup" if trainer.sanity_checking else "loop")
        trainer.save_checkpoint(self.checkpoint_path)  # every rank calls it; rank 0 writes, then a barrier
        self.saved = self.checkpoint_path
        raise Stopped(self.signum, "loop")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._fit_stop_point(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.verb == "fit":
            self._fit_stop_point(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._fit_stop_point(trainer, last=True)

    # ------------------------------------------------------------------ predict / test / validate: per rank
    def _rank_stop_point(self, *, last: bool = False) -> None:
        if last:
            self.phase = "finished"
        if self.signum is not None:
            raise Stopped(self.signum, "loop")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._rank_stop_point()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._rank_stop_point(last=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._rank_stop_point()

    def on_test_end(self, trainer, pl_module) -> None:
        self._rank_stop_point(last=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.verb != "fit":
            self._rank_stop_point()

    # ------------------------------------------------------------------ the report
    def message(self, stopped: Stopped) -> str:
        name = signal.Signals(stopped.signum).name
        if stopped.where == "startup":
            what = "before the first batch; nothing to save. Run the same command again to start"
        elif stopped.where == "finished":
            what = (f"after the last batch: the {self.verb} run finished and its outputs in {self.output_dir} are "
                    "complete")
        elif self.verb == "fit" and self.saved is not None:
            what = (f"at step {self.step}; checkpoint saved to {self.saved}. Run the same command again to resume "
                    "from it")
        elif self.verb == "fit":
            what = f"at step {self.step}; no checkpoint saved (fast_dev_run)"
        elif self.verb == "predict":
            what = (f"after the current batch; the samples written so far stay in {self.output_dir}. Run the same "
                    "command again to finish (it skips them)")
        else:
            what = f"after the current batch; no {self.verb} results written. Run the same command again"
        return f"equidiff: stopped by {name} {what} (exit status {exit_status(stopped.signum)} = 128 + {name})"


def refuse_hpc_checkpoints(trainer) -> None:
    """Under SLURM, Lightning loads the newest ``hpc_ckpt_*.ckpt`` in ``default_root_dir`` by itself whenever no
    ``ckpt_path`` is given, predict included (the model's weights replaced by the checkpoint's). equidiff never
    writes them, so one found there comes from elsewhere (an older equidiff, another tool): refuse to run."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from equidiff.errors import ConfigError

    root = Path(trainer.default_root_dir)
    found = sorted(root.glob("hpc_ckpt_*.ckpt")) if SLURMEnvironment.detect() else []
    if found:
        raise ConfigError(f"{root} holds Lightning HPC checkpoints ({', '.join(p.name for p in found)}), which "
                          "Lightning would load on SLURM in place of the model you configured; equidiff does not "
                          "write or use them (a fit resumes from checkpoints/last.ckpt). Delete or move them")


@contextlib.contextmanager
def stop_on_signals(trainer, verb: str, output_dir: str | Path) -> Iterator[StopOnSignal]:
    """Run ``trainer.<verb>`` inside this: SIGTERM / SIGUSR1 end it as the module docstring says (a ``SystemExit``
    with 128 + signum leaves this block). Outside the main thread (no signal handlers there) it does nothing."""
    refuse_hpc_checkpoints(trainer)
    cb = StopOnSignal(verb, output_dir)
    if threading.current_thread() is not threading.main_thread():
        yield cb
        return
    cb.trainer = trainer
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    trainer.callbacks.append(cb)
    stopped: Stopped | None = None
    try:
        cb.install()
        yield cb
    except Stopped as e:
        stopped = e
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        with contextlib.suppress(ValueError):
            trainer.callbacks.remove(cb)
    if stopped is None and cb.signum is not None:
        stopped = Stopped(cb.signum, "finished")
    if stopped is None:
        return
    if trainer.global_rank == 0 and launcher_pid() is None:  # (a subprocess rank may not know its rank yet)
        msg = cb.message(stopped)
        log.warning(msg)
        print(msg, file=sys.stderr, flush=True)
    if launcher_pid() is not None and stopped.where != "startup":
        raise SystemExit(0)  # a subprocess rank of Lightning's launcher after a clean stop: see the docstring
    raise SystemExit(stopped.code) from None
