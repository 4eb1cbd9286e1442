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


def _fake_bin(tmp_path: Path, srun_body: str, log: str = "scontrol.log") -> Path:
    """A fake ``srun`` (logs its options to srun.log, drops them, then runs ``srun_body``) and ``scontrol``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nwhile [[ $1 == --* ]]; do echo \"$1\" >> {tmp_path}/srun.log; shift; "
                                  f"done\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/{log}\n")
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


def test_srun_ends_the_step_when_a_task_fails(tmp_path):
    bin_dir = _fake_bin(tmp_path, "exit 0")
    r = subprocess.run(["bash", str(REPO / "slurm" / "ace.sh")], env=_env(bin_dir), cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--kill-on-bad-exit=1" in (tmp_path / "srun.log").read_text().split()


def test_time_limit_signal_lets_the_step_save_before_the_requeue(tmp_path):
    """The step gets SIGTERM and the script waits for it to save (equidiff: last.ckpt, the samples written)
    before it requeues the job."""
    step = (f"trap 'sleep 1; echo saved >> {tmp_path}/events.log; exit 143' TERM\n"
            f"echo started >> {tmp_path}/events.log\nwhile true; do sleep 0.1; done")
    bin_dir = _fake_bin(tmp_path, step, log="events.log")
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "ace.sh")], env=_env(bin_dir), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (tmp_path / "events.log").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "events.log").read_text().split("\n")[:3] == ["started", "saved", "requeue 4242"]


@pytest.mark.parametrize("status", [138, 1])
def test_a_step_stopped_by_sigusr1_itself_requeues_the_job(tmp_path, status):
    """With --signal=USR1@... (no B:) the tasks get the signal: equidiff stops with 138 = 128 + SIGUSR1, and the
    job requeues itself. Any other failure ends the job with it."""
    bin_dir = _fake_bin(tmp_path, f"exit {status}")
    r = subprocess.run(["bash", str(REPO / "slurm" / "ace.sh")], env=_env(bin_dir), cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    if status == 138:
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    else:
        assert r.returncode == status and not (tmp_path / "scontrol.log").exists()


# per-step overrides for the embedded p-CFE chain, added by the fake srun (the script passes its own overrides to
# every step): a tiny ERM, 16 generated samples, a one-epoch retrain
PCFE_STEPS = """case "$*" in
  *retrain_*) if [ -e "$KILL_RETRAIN" ]; then exit 137; fi
              extra=(data.clean.max_items=16 data.batch_size=16 trainer.max_epochs=1
                     trainer.check_val_every_n_epoch=1) ;;
  *pcfe_erm*) extra=(data.max_items=64 data.batch_size=32 trainer.max_epochs=2 trainer.check_val_every_n_epoch=1) ;;
  *generate_*) extra=(data.max_items=16 data.batch_size=16 solver.steps=2) ;;
esac
echo "$*" >> "$SRUN_LOG"
exec "$@" "${extra[@]}"
"""


@pytest.mark.slow  # six equidiff processes (about 2 CPU-minutes); tests/pcfe/test_pcfe.py checks the same in-process
def test_pcfe_chain_survives_a_requeue(tmp_path):
    """A requeued pcfe.sh re-runs every step: the finished ERM fit trains nothing and leaves its exported model
    (bytes and mtime) and its history as they were, so the generation it feeds is not refused as stale; the test
    step reads the retrained model's last epoch."""
    bin_dir = _fake_bin(tmp_path, PCFE_STEPS)
    kill = tmp_path / "kill_retrain"
    env = _env(bin_dir, DATASET="digits", SOLVER="pgd_l2", TRAINER="cpu", KILL_RETRAIN=str(kill),
               SRUN_LOG=str(tmp_path / "srun.log"), PYTHONPATH=str(REPO))
    args = ["bash", str(REPO / "slurm" / "pcfe.sh"), f"paths.log_dir={tmp_path}/outputs",
            f"paths.cache_dir={tmp_path}/cache", "trainer.enable_progress_bar=false"]
    kill.touch()
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 137, first.stdout[-3000:] + first.stderr[-3000:]  # the job died in the retrain step
    erm, export = tmp_path / "outputs" / "digits_pcfe_erm", tmp_path / "cache" / "digits_pcfe_erm"
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in
            [*export.iterdir(), erm / "csv" / "metrics.csv", erm / "checkpoints" / "last.ckpt"]}
    samples = tmp_path / "outputs" / "digits_pcfe_generate_pgd_l2" / "samples.npz"
    assert samples.exists()

    kill.unlink()
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "fit already finished" in out
    for p, (data, mtime) in kept.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p
    retrain = tmp_path / "outputs" / "digits_pcfe_retrain_pgd_l2"
    assert (retrain / "test_metrics.json").exists()
    # the test step (the last to write the folder's resolved config.yaml) read the retrained model's last epoch
    assert f"ckpt_path: {retrain}/checkpoints/last.ckpt" in (retrain / "config.yaml").read_text()
