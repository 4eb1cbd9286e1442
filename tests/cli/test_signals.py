"""Interruptions, with real processes: SIGTERM / SIGUSR1 stop fit and predict cleanly (exit 128 + signum, a
message, a checkpoint that resumes, the samples written kept), no Lightning HPC checkpoint under SLURM, DDP
ranks that cannot outlive a rank 0 that died during start-up, and output files with the umask's modes.

The signals are real: ``tests.helpers.SignalAfterBatches`` sends one with ``os.kill`` at a known batch, so
the test knows exactly where the run should stop.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from equidiff.callbacks.records import completed_seeds, read_sample
from equidiff.cli import run
from tests.helpers import REPO, compose_cfg, load_samples

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and /proc")

TINY_UNET = ["method.unet.block_out_channels=[8,16]", "method.unet.norm_num_groups=4",
             "method.unet.attention_head_dim=4"]


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "experiment=digits/ddpm", f"paths.output_dir={tmp_path}/fit", f"paths.cache_dir={tmp_path}/cache",
            "data.batch_size=16", "trainer.max_steps=1000", "trainer.enable_progress_bar=false", *TINY_UNET, *extra]


def _predict_args(pipeline: Path, out: Path, *extra: str, n: int = 10) -> list[str]:
    return ["predict", "experiment=digits/sample", f"diffusion.path={pipeline}", f"data.num_samples={n}",
            "data.batch_size=2", "sampler.num_steps=2", "metrics=none", "trainer.enable_progress_bar=false",
            f"paths.output_dir={out}", *extra]


def _signal_after(n: int, signum: str = "SIGTERM", stage: str = "predict", **more) -> list[str]:
    args = ["+callbacks.sig._target_=tests.helpers.SignalAfterBatches", f"+callbacks.sig.n={n}",
            f"+callbacks.sig.signum={signum}", f"+callbacks.sig.stage={stage}"]
    return args + [f"+callbacks.sig.{k}={v}" for k, v in more.items()]


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("EQUIDIFF_LAUNCHER_PID", None)
    env.update(extra)
    return env


_STARTED: list[int] = []


@pytest.fixture(autouse=True)
def _end_leftovers():
    """Whatever a test's runs left behind (a test that failed part-way) is ended by its session id."""
    yield
    while _STARTED:
        pgid = _STARTED.pop()
        if _group(pgid):
            os.killpg(pgid, signal.SIGKILL)


def _start(args: list[str], logs: Path, *, env: dict | None = None, umask: int | None = None) -> subprocess.Popen:
    """``equidiff ARGS`` in its own session (process group), so that the test can find and end all its ranks.

    Output goes to files, not pipes: DDP ranks inherit rank 0's output, and a pipe would stay open (and a
    reader blocked) as long as any rank lives."""
    exe = Path(sys.executable).parent / "equidiff"
    pre = (lambda: os.umask(umask)) if umask is not None else None
    log = Path(tempfile.mkdtemp(prefix="run-", dir=logs))
    with open(log / "stdout", "w") as out, open(log / "stderr", "w") as err:
        proc = subprocess.Popen([str(exe), *args], cwd=REPO, env=env or _env(), stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=pre)
    proc.log_dir = log
    _STARTED.append(proc.pid)
    return proc


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(p.name))
    return pids


def _ranks_started_by(pid: int) -> list[int]:
    """The DDP ranks Lightning's launcher in process ``pid`` started (their command names the rank)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"train_ddp_process_" in cmd:
                out.append(int(p.name))
    return out


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    out, err = ((proc.log_dir / name).read_text() for name in ("stdout", "stderr"))
    return proc.returncode, out, err


def _wait_gone(pgid: int, seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while _group(pgid) and time.monotonic() < end:
        time.sleep(0.5)
    return _group(pgid)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _fake_slurm(tmp_path: Path) -> dict:
    """SLURM variables of a one-task job (Lightning's SLURMEnvironment is detected) and a fake ``scontrol``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "scontrol").chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="equidiff-test",
                SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_NODELIST="localhost",
                SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")


# --------------------------------------------------------------------------- fit


def _stopped_fit(tmp_path: Path, signum: str, *extra: str, env: dict | None = None) -> tuple[Path, str]:
    proc = _start(_fit_args(tmp_path, *extra, *_signal_after(3, signum, "train")), tmp_path, env=env)
    code, _, err = _finish(proc)
    assert code == 128 + getattr(signal, signum), err[-3000:]
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert f"stopped by {signum} at step 3; checkpoint saved to {ckpt}" in err
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (tmp_path / "cache" / "digits_ddpm").exists(), "a stopped fit must not export a half-trained model"
    return ckpt, err


def test_sigterm_stops_fit_with_a_checkpoint_that_resumes(tmp_path):
    ckpt, _ = _stopped_fit(tmp_path, "SIGTERM")
    # the checkpoint resumes (here in-process): training goes on from step 3 and the finished fit exports the model
    steps = tmp_path / "steps.txt"
    run(compose_cfg(_fit_args(tmp_path, "trainer.max_steps=5", f"ckpt_path={ckpt}",
                              "+callbacks.steps._target_=tests.helpers.StepLog", f"+callbacks.steps.path={steps}")[1:]),
        "fit")
    assert steps.read_text().split() == ["3", "4"]
    assert (tmp_path / "cache" / "digits_ddpm" / "model_index.json").exists()


@pytest.mark.slow
def test_sigusr1_under_slurm_stops_fit_with_last_ckpt_and_no_hpc_checkpoint(tmp_path):
    _, err = _stopped_fit(tmp_path, "SIGUSR1", env=_fake_slurm(tmp_path))
    assert "exit status 138" in err
    assert not list(tmp_path.rglob("hpc_ckpt*")) and not (tmp_path / "scontrol.log").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sigterm_stops_fit_on_a_gpu(tmp_path):
    """Stop and checkpoint with the model on a CUDA device (the checkpoint holds CUDA tensors' values)."""
    _stopped_fit(tmp_path, "SIGTERM", "trainer=gpu")


# --------------------------------------------------------------------------- predict


def test_sigterm_stops_predict_and_the_rerun_finishes_the_same_samples(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "out"
    proc = _start(_predict_args(tiny_pipeline_dir, out, *_signal_after(2)), tmp_path, umask=0o002)
    code, _, err = _finish(proc)
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM after the current batch" in err and "exit status 143" in err
    # it stopped at the next batch end: two batches of two, each sample complete and readable
    assert completed_seeds(out / "samples") == {0, 1, 2, 3}
    for s in range(4):
        assert read_sample(out / "samples", s)["image_uint8"].shape == (1, 8, 8)
    assert not (out / "samples.npz").exists()
    # umask 0002: files 0664, folders 0775, whatever wrote them (atomic writers, loggers, the log file)
    modes = _modes(out)
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o775}, modes
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o664}, modes

    # the same command (here in-process) finishes the run; an uninterrupted run gives the same file
    run(compose_cfg(_predict_args(tiny_pipeline_dir, out)[1:]), "predict")
    run(compose_cfg(_predict_args(tiny_pipeline_dir, tmp_path / "ref")[1:]), "predict")
    got, ref = load_samples(out), load_samples(tmp_path / "ref")
    assert got["seeds"].tolist() == list(range(10))
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_sigusr1_under_slurm_writes_no_hpc_checkpoint_into_the_predict_folder(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "out"
    proc = _start(_predict_args(tiny_pipeline_dir, out, *_signal_after(1, "SIGUSR1")), tmp_path,
                  env=_fake_slurm(tmp_path))
    code, _, err = _finish(proc)
    assert code == 138, err[-3000:]
    assert "stopped by SIGUSR1" in err
    assert not list(tmp_path.rglob("hpc_ckpt*")), "Lightning's SLURM auto-requeue wrote an HPC checkpoint"
    assert not (tmp_path / "scontrol.log").exists(), "requeueing is the job script's business"
    assert completed_seeds(out / "samples") == {0, 1}


# --------------------------------------------------------------------------- DDP


DDP = ["trainer=ddp_cpu", "trainer.devices=2"]


@pytest.mark.parametrize("group", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["launcher", "all"])
def test_sigterm_stops_every_ddp_rank(tmp_path, tiny_pipeline_dir, group):
    """A terminal's ``kill`` reaches rank 0 only (it forwards to its ranks); SLURM signals every task."""
    out = tmp_path / "out"
    proc = _start(_predict_args(tiny_pipeline_dir, out, *DDP, *_signal_after(1, group=str(group).lower()), n=40),
                  tmp_path)
    code, _, err = _finish(proc)
    assert code == 143, err[-3000:]
    assert err.count("stopped by SIGTERM") == 1  # rank 0 speaks for the run
    assert not _wait_gone(proc.pid, 30), "a DDP rank outlived the stopped run"
    seeds = completed_seeds(out / "samples")
    assert {0, 2} <= seeds and len(seeds) < 40 and not (out / "samples.npz").exists()


@pytest.mark.slow
def test_sigterm_stops_ddp_fit_at_one_step_on_every_rank(tmp_path):
    proc = _start(_fit_args(tmp_path, *DDP, *_signal_after(3, stage="train")), tmp_path)
    code, _, err = _finish(proc)
    assert code == 143, err[-3000:]
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert f"at step 3; checkpoint saved to {ckpt}" in err
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    assert not _wait_gone(proc.pid, 30)


def test_ranks_end_when_rank0_is_killed_during_startup(tmp_path, tiny_pipeline_dir):
    """kill -9 of rank 0 right after it started rank 1: rank 1 (still starting) must not wait for it."""
    proc = _start(_predict_args(tiny_pipeline_dir, tmp_path / "out", *DDP), tmp_path)
    deadline = time.monotonic() + 300
    while not _ranks_started_by(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ranks_started_by(proc.pid), "rank 0 never started rank 1"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _wait_gone(proc.pid, 60)
    assert not left, f"rank 1 still running 60 s after rank 0 died: {left}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_started_by_srun_ends_after_the_startup_timeout(tmp_path, tiny_pipeline_dir):
    """A rank that its launcher (srun, torchrun) started alone, whose rank 0 never comes: it ends after
    ``startup_timeout_s``, not after the 30-minute steady-state timeout."""
    env = _env(LOCAL_RANK="1", NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = _start(_predict_args(tiny_pipeline_dir, tmp_path / "out", *DDP, "trainer.strategy.startup_timeout_s=3"),
                  tmp_path, env=env)
    code, _, err = _finish(proc, timeout=300)
    assert code not in (0, None)
    assert "timed out after 3000ms" in err, err[-3000:]
