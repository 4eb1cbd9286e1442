"""Fit checkpoints and resume (equidiff/callbacks/resume.py): `last.ckpt` is the last epoch, a fit killed with
SIGKILL and resumed equals an uninterrupted fit bit for bit (weights and CSV history), a mid-epoch checkpoint
resumes exactly, and re-running a finished fit changes nothing."""

import logging

import pytest
import torch

from equidiff.cli import run
from equidiff.errors import ConfigError
from tests.helpers import compose_cfg, run_cli

# PGD adversarial training: the random start is drawn from numpy's global RNG (ART), batches are shuffled
ROBUST = ["experiment=digits/robust_classifier", "trainer=cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=3",
          "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
          "method.adversarial.steps=1", "trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture
def one_thread():
    """In-process fits with the thread count of the CLI subprocesses (OMP_NUM_THREADS=1, tests/helpers.py): a
    float reduction split over another number of threads sums in another order, so an in-process segment and a
    subprocess segment agree bit for bit only with the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _folder(tmp_path, name):
    return [f"paths.output_dir={tmp_path}/{name}", f"paths.cache_dir={tmp_path}/{name}_cache"]


def _state(path):
    return torch.load(path, weights_only=True)


def test_a_fit_killed_with_sigkill_and_resumed_equals_an_uninterrupted_fit(tmp_path, caplog, one_thread):
    run(compose_cfg([*ROBUST, *_folder(tmp_path, "straight")]), "fit")

    # a real process, killed with SIGKILL after batch 1 of epoch 1: nothing of it runs after that
    r = run_cli(["fit", *ROBUST, *_folder(tmp_path, "resumed"), "+callbacks.kill._target_=tests.helpers.KillAt",
                 "+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"])
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "resumed"
    assert _state(out / "checkpoints" / "last.ckpt")["epoch"] == 0  # the end of epoch 0 is all it saved
    assert not (tmp_path / "resumed_cache").exists()

    with caplog.at_level(logging.INFO):
        run(compose_cfg([*ROBUST, *_folder(tmp_path, "resumed")]), "fit")  # the same command: resumes from last.ckpt
    assert f"resumed fit from {out}/checkpoints/last.ckpt at epoch 1, step 3" in caplog.text

    exported = "digits_robust_cnn/model.safetensors"
    assert (tmp_path / "resumed_cache" / exported).read_bytes() == (tmp_path / "straight_cache" / exported).read_bytes()
    a, b = _state(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _state(out / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 9
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    # the history: the rows of epoch 0 kept, those the killed run logged after its checkpoint logged once
    straight_csv = (tmp_path / "straight" / "csv" / "metrics.csv").read_text()
    assert (out / "csv" / "metrics.csv").read_text() == straight_csv
    assert len(straight_csv.splitlines()) > 10


def test_last_ckpt_is_the_last_epoch_and_a_finished_fit_rerun_changes_nothing(tmp_path, caplog):
    # the monitored metric never improves after epoch 0: the "best" checkpoint keeps the highest validation
    # loss, and training lowers it every epoch
    args = ["experiment=digits/judge_classifier", "trainer=cpu", "trainer.max_epochs=4",
            "trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
            "logger=csv", "callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=max",
            *_folder(tmp_path, "run")]
    run(compose_cfg(args), "fit")
    out, export = tmp_path / "run", tmp_path / "run_cache" / "digits_judge_cnn" / "model.safetensors"
    rows = [r.split(",") for r in (out / "csv" / "metrics.csv").read_text().splitlines()]
    col, epoch = rows[0].index("val/loss"), rows[0].index("epoch")
    val_loss = [(float(r[col]), int(r[epoch])) for r in rows[1:] if r[col]]
    assert len(val_loss) == 4
    best_epoch = max(val_loss, key=lambda a: (a[0], -a[1]))[1]
    assert best_epoch < 3, val_loss  # the construction: the last epoch is not the "best" one

    last, best = _state(out / "checkpoints" / "last.ckpt"), _state(out / "checkpoints" / "best.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 8
    assert best["epoch"] == best_epoch
    # last.ckpt holds the model the fit ended with (the one exported)
    from safetensors.torch import load_file

    for k, v in load_file(export).items():
        assert torch.equal(last["state_dict"][f"classifier.net.{k}"], v), k

    # re-running the finished fit trains nothing, rewrites nothing and says so
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (export, out / "csv" / "metrics.csv",
                                                                  out / "checkpoints" / "last.ckpt",
                                                                  out / "checkpoints" / "best.ckpt")}
    with caplog.at_level(logging.INFO):
        run(compose_cfg(args), "fit")
    assert "fit already finished" in caplog.text
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p

    # a later `equidiff validate` into the folder appends to the history
    csv_before = (out / "csv" / "metrics.csv").read_text()
    run(compose_cfg([*args, f"ckpt_path={out}/checkpoints/last.ckpt", "trainer.limit_val_batches=1"]), "validate")
    assert (out / "csv" / "metrics.csv").read_text().startswith(csv_before.splitlines()[0])
    assert len((out / "csv" / "metrics.csv").read_text().splitlines()) == len(csv_before.splitlines()) + 1

    # a different configuration does not resume from this folder's checkpoint
    with pytest.raises(ConfigError, match="different configuration"):
        run(compose_cfg([*args, "method.optimizer.lr=0.5"]), "fit")


# DDPM training: torch's global RNG draws the noise and timesteps, the EMA is carried in the checkpoint, and
# training is step-based (max_steps)
DDPM = ["experiment=digits/ddpm", "trainer=cpu", "trainer.max_epochs=-1", "trainer.max_steps=7",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logger=csv", "data.batch_size=16",
        "method.unet.block_out_channels=[8,16]", "method.unet.norm_num_groups=4", "method.unet.attention_head_dim=4"]


def test_a_checkpoint_written_mid_epoch_resumes_exactly(tmp_path, caplog):
    run(compose_cfg([*DDPM, *_folder(tmp_path, "straight")]), "fit")
    out = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.helpers.CheckpointAndStopAt", "+callbacks.stop.epoch=1",
            "+callbacks.stop.batch=0", f"+callbacks.stop.path={out}/checkpoints/last.ckpt"]
    with pytest.raises(RuntimeError, match="simulated stop"):
        run(compose_cfg([*DDPM, *_folder(tmp_path, "resumed"), *stop]), "fit")
    assert _state(out / "checkpoints" / "last.ckpt")["global_step"] == 4  # after batch 0 of epoch 1

    with caplog.at_level(logging.INFO):
        run(compose_cfg([*DDPM, *_folder(tmp_path, "resumed")]), "fit")
    assert f"resumed fit from {out}/checkpoints/last.ckpt at epoch 1, step 4" in caplog.text

    weights = "digits_ddpm/unet/diffusion_pytorch_model.safetensors"  # the EMA weights
    assert (tmp_path / "resumed_cache" / weights).read_bytes() == (tmp_path / "straight_cache" / weights).read_bytes()
    a, b = _state(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _state(out / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 7
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert (out / "csv" / "metrics.csv").read_text() == (tmp_path / "straight" / "csv" / "metrics.csv").read_text()


def test_a_finished_fit_rerun_does_not_make_the_runs_that_read_its_model_stale(tmp_path):
    # slurm/pcfe.sh after a requeue, in-process (tests/test_slurm.py runs the script itself, marked slow): the
    # generation fingerprints the ERM model it reads by size and mtime, and must accept the re-run ERM fit
    common = [f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", "trainer=cpu", "logger=csv",
              "trainer.enable_progress_bar=false"]
    erm = ["experiment=digits/pcfe_erm", "data.max_items=32", "data.batch_size=16", "trainer.max_epochs=1",
           "trainer.check_val_every_n_epoch=1", *common]
    generate = ["experiment=digits/pcfe_generate_pgd_l2", "data.max_items=8", "data.batch_size=8", "solver.steps=1",
                *common]
    run(compose_cfg(erm), "fit")
    run(compose_cfg(generate), "predict")
    run(compose_cfg(erm), "fit")  # the requeued job's first step
    run(compose_cfg(generate), "predict")  # finds its samples and the same model
    assert (tmp_path / "outputs" / "digits_pcfe_generate_pgd_l2" / "samples.npz").exists()


@pytest.mark.slow  # three runs of two DDP processes each (about 3 CPU-minutes)
def test_a_ddp_fit_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    # each process's random state (numpy: the PGD random start) and its shard of the shuffled data
    ddp = [*ROBUST, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=64"]
    r = run_cli(["fit", *ddp, *_folder(tmp_path, "straight")], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    kill = ["+callbacks.kill._target_=tests.helpers.KillAt", "+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"]
    r = run_cli(["fit", *ddp, *_folder(tmp_path, "resumed"), *kill], timeout=900)
    assert r.returncode != 0
    assert _state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["epoch"] == 0
    r = run_cli(["fit", *ddp, *_folder(tmp_path, "resumed")], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exported = "digits_robust_cnn/model.safetensors"
    assert (tmp_path / "resumed_cache" / exported).read_bytes() == (tmp_path / "straight_cache" / exported).read_bytes()
    assert ((tmp_path / "resumed" / "csv" / "metrics.csv").read_text()
            == (tmp_path / "straight" / "csv" / "metrics.csv").read_text())
