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


def run_cli(args: list[str], *, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``equidiff ARGS`` in a subprocess (the real entry point, as users and SLURM run it)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.update(env or {})
    exe = Path(sys.executable).parent / "equidiff"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=e)


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
