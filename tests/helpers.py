"""Helpers for tests that run equidiff's real configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from equidiff.cli import conf_dir

REPO = Path(__file__).resolve().parent.parent


def compose_cfg(overrides: list[str]):
    """Compose conf/config.yaml with overrides, as the CLI does (without running a Hydra job)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _cli(args: list[str], env: dict | None) -> tuple[list[str], dict]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.update(env or {})
    return [str(Path(sys.executable).parent / "equidiff"), *args], e


def run_cli(args: list[str], *, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``equidiff ARGS`` in a subprocess (the real entry point, as users and SLURM run it)."""
    cmd, e = _cli(args, env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=e)


def start_cli(args: list[str], *, env: dict | None = None) -> subprocess.Popen:
    """Start ``equidiff ARGS`` in the background (``communicate()`` it, or kill and ``wait()`` it)."""
    cmd, e = _cli(args, env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=e)


def load_samples(output_dir) -> dict[str, np.ndarray]:
    with np.load(Path(output_dir) / "samples.npz") as z:
        return {"images": z["arr_0"], "labels": z["arr_1"], "seeds": z["arr_2"]}


class FailAfterBatches(Callback):
    """Simulate a job killed part-way: raise after ``n`` predict batches have been written."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_predict_batch_end(self, *args, **kwargs):
        self.seen += 1
        if self.seen >= self.n:
            raise RuntimeError("simulated preemption")


class FailAtStart(Callback):
    """Simulate a run that fails once it has taken its folder, before any result (e.g. out of memory)."""

    def on_predict_start(self, trainer, pl_module):
        raise RuntimeError("simulated failure before the first sample")


class WaitForFile(Callback):
    """Hold a predict run at its start (folder taken, nothing computed) until ``path`` exists."""

    def __init__(self, path: str, timeout: float = 300.0):
        self.path, self.timeout = Path(path), timeout

    def on_predict_start(self, trainer, pl_module):
        import time

        start = time.monotonic()
        while not self.path.exists():
            if time.monotonic() - start > self.timeout:
                raise TimeoutError(f"{self.path} did not appear")
            time.sleep(0.1)


class SignalAfterBatches(Callback):
    """Send a real signal after ``n`` batches of ``stage`` ("train" or "predict") on global rank ``rank``:
    to this process, or with ``group=True`` to its whole process group (as SLURM signals every task)."""

    def __init__(self, n: int, signum: str = "SIGTERM", stage: str = "predict", rank: int = 0, group: bool = False):
        self.n, self.signum, self.stage, self.rank, self.group = n, signum, stage, rank, group
        self.seen = 0

    def _batch_end(self, trainer) -> None:
        import signal

        self.seen += 1
        if self.seen == self.n and trainer.global_rank == self.rank:
            signum = getattr(signal, self.signum)
            if self.group:
                os.killpg(os.getpgrp(), signum)
            else:
                os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if self.stage == "train":
            self._batch_end(trainer)

    def on_predict_batch_end(self, trainer, *args, **kwargs):
        if self.stage == "predict":
            self._batch_end(trainer)


class StepLog(Callback):
    """Append ``global_step`` at every training-batch start to ``path`` (one line per batch)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, *args, **kwargs):
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step}\n")


class KillAt(Callback):
    """Simulate a job killed hard (kill -9, node failure) mid-fit: SIGKILL this process after training batch
    ``batch`` of epoch ``epoch`` (nothing of the process runs after it: no hook, no flush)."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class CheckpointAndStopAt(Callback):
    """Simulate a job stopped mid-epoch after a checkpoint: after training batch ``batch`` of epoch ``epoch`` save
    ``path`` (in on_train_batch_end, as ModelCheckpoint(every_n_train_steps) does), then stop when the next batch
    starts."""

    def __init__(self, epoch: int, batch: int, path: str):
        self.epoch, self.batch, self.path, self.saved = epoch, batch, path, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
            self.saved = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.saved:
            raise RuntimeError("simulated stop after a mid-epoch checkpoint")
