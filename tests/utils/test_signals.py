"""The signal handler's phases and forwarding, in-process (the real-process runs are in tests/cli/test_signals.py).

The signals are real (``os.kill`` of this process); equidiff's handler is installed while ``run`` runs.
"""

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from equidiff.cli import run
from equidiff.utils.distributed import LAUNCHER_ENV
from equidiff.utils.signals import StopOnSignal, exit_status
from tests.helpers import compose_cfg

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")


class SignalAt(Callback):
    """Send SIGTERM to this process in the hook ``hook`` (a start-up or a closing hook)."""

    def __init__(self, hook: str):
        self.hook = hook

    def setup(self, trainer, pl_module, stage):
        if self.hook == "setup":
            os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage):
        if self.hook == "teardown":
            os.kill(os.getpid(), signal.SIGTERM)


def _predict(tmp_path, pipeline, hook):
    return compose_cfg(["experiment=digits/sample", f"diffusion.path={pipeline}", "data.num_samples=4",
                        "data.batch_size=2", "sampler.num_steps=2", "metrics=none", "logger=none",
                        "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}/out",
                        "+callbacks.sig._target_=tests.utils.test_signals.SignalAt", f"+callbacks.sig.hook={hook}"])


def test_exit_status_is_128_plus_the_signal_number():
    assert (exit_status(signal.SIGTERM), exit_status(signal.SIGUSR1)) == (143, 138)


def test_a_signal_during_startup_stops_at_once(tmp_path, tiny_pipeline_dir, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(_predict(tmp_path, tiny_pipeline_dir, "setup"), "predict")
    assert e.value.code == 143
    assert "stopped by SIGTERM before the first batch" in capsys.readouterr().err
    assert not (tmp_path / "out" / "samples").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is equidiff's only while the verb runs


def test_a_signal_after_the_last_batch_lets_the_run_finish(tmp_path, tiny_pipeline_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run(_predict(tmp_path, tiny_pipeline_dir, "teardown"), "predict")
    assert e.value.code == 143
    assert "after the last batch: the predict run finished" in capsys.readouterr().err
    assert (tmp_path / "out" / "samples.npz").exists()


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_forwarding_to_the_ranks_started_here_and_to_the_launcher(monkeypatch):
    down, up = _sleeper(), _sleeper()
    try:
        # rank 0 of Lightning's subprocess launcher: to the ranks it started
        cb = StopOnSignal("predict", "unused")
        cb.trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[down])))
        monkeypatch.delenv(LAUNCHER_ENV, raising=False)
        cb._forward(signal.SIGTERM)
        assert down.wait(timeout=30) == -signal.SIGTERM
        # a rank that the launcher started: to the launcher
        monkeypatch.setenv(LAUNCHER_ENV, str(up.pid))
        monkeypatch.setenv("LOCAL_RANK", "1")
        StopOnSignal("predict", "unused")._forward(signal.SIGUSR1)
        assert up.wait(timeout=30) == -signal.SIGUSR1
    finally:
        for p in (down, up):
            if p.poll() is None:
                p.kill()


def test_leftover_hpc_checkpoints_are_refused_under_slurm(tmp_path, tiny_pipeline_dir, monkeypatch):
    """Lightning would load them on SLURM in place of the configured model (predict included)."""
    from equidiff.errors import ConfigError

    cfg = _predict(tmp_path, tiny_pipeline_dir, "none")
    (tmp_path / "out").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "out" / "hpc_ckpt_1.ckpt")
    for k, v in dict(SLURM_JOB_ID="1", SLURM_JOB_NAME="equidiff-test", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                     SLURM_NNODES="1", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0",
                     SLURM_NODEID="0").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="hpc_ckpt_1.ckpt.*Delete or move them"):
        run(cfg, "predict")
    assert not (tmp_path / "out" / "samples").exists()
