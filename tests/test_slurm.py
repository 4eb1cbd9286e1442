"""The SLURM scripts: headers, one srun task per GPU, requeue on the time-limit signal, a real run."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, load_samples

SCRIPTS = ["invariant", "robust_energy", "pcfe", "ace"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_headers(name):
    path = REPO / "slurm" / f"{name}.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for header in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--time=", "--signal=B:USR1@",
                   "--requeue"):
        assert f"#SBATCH {header}" in text, header
    assert "step equidiff" in text and "source slurm/_common.sh" in text


def _fake_bin(tmp_path: Path, srun_body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _env(bin_dir, **extra):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242",
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_robust_energy_script_runs_equidiff_through_srun(tmp_path, tiny_pipeline_dir):
    bin_dir = _fake_bin(tmp_path, 'exec "$@"')  # a one-task srun
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "slurm" / "robust_energy.sh"), f"diffusion.path={tiny_pipeline_dir}",
                        "data.num_samples=3", "sampler.num_steps=2", f"paths.output_dir={out}", "metrics=none"],
                       env=_env(bin_dir, EXPERIMENT="digits/sample", TRAINER="cpu"), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert load_samples(out)["seeds"].tolist() == [0, 1, 2]


def test_time_limit_signal_requeues_the_job(tmp_path):
    bin_dir = _fake_bin(tmp_path, "exec sleep 60")  # a long job step (srun forwards signals to its task)
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "ace.sh")], env=_env(bin_dir), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
