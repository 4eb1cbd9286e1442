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
