"""Hydra -m sweeps (basic and submitit launchers), the DDP-in-sweep refusal, and the wandb logger."""

import numpy as np

from tests.helpers import load_samples, run_cli


def _sample_args(pipeline, *extra):
    return ["experiment=digits/sample", f"diffusion.path={pipeline}", "data.num_samples=4", "sampler.num_steps=2",
            "metrics=none", "logger=csv", *extra]


def test_basic_sweep_writes_one_stable_folder_per_job(tiny_pipeline_dir, tmp_path):
    r = run_cli(["predict", "-m", *_sample_args(tiny_pipeline_dir, "seed=0,2", f"paths.log_dir={tmp_path}")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sweep = tmp_path / "digits_sample" / "multirun"
    a, b = load_samples(sweep / "0"), load_samples(sweep / "1")
    assert a["seeds"].tolist() == [0, 1, 2, 3] and b["seeds"].tolist() == [2, 3, 4, 5]
    np.testing.assert_array_equal(a["images"][2:], b["images"][:2])  # same seed, same sample


def test_submitit_local_launcher_runs_the_sweep(tiny_pipeline_dir, tmp_path):
    r = run_cli(["predict", "-m", "hydra/launcher=local",
                 *_sample_args(tiny_pipeline_dir, "seed=0,4", f"paths.log_dir={tmp_path}")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sweep = tmp_path / "digits_sample" / "multirun"
    assert load_samples(sweep / "1")["seeds"].tolist() == [4, 5, 6, 7]


def test_slurm_launcher_config_composes():
    r = run_cli(["predict", "hydra/launcher=slurm", "experiment=digits/sample", "--cfg", "hydra"])
    assert r.returncode == 0, r.stderr
    assert "SlurmLauncher" in r.stdout and "gpus_per_node: 4" in r.stdout and "requeue: true" in r.stdout


def test_sweep_with_in_process_ddp_is_refused(tiny_pipeline_dir, tmp_path):
    r = run_cli(["predict", "-m", *_sample_args(tiny_pipeline_dir, "seed=0,1", f"paths.log_dir={tmp_path}",
                                                "trainer=ddp_cpu")])
    assert r.returncode != 0
    assert "hydra/launcher=slurm" in r.stderr
    assert not list((tmp_path / "digits_sample" / "multirun").glob("*/samples"))


def test_wandb_logger_offline(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "w"
    args = [a for a in _sample_args(tiny_pipeline_dir, f"paths.output_dir={out}") if a not in ("logger=csv",
                                                                                             "metrics=none")]
    r = run_cli(["predict", *args, "metrics=digits", "logger=wandb"], env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "metrics.json").exists()


def test_fit_with_two_ddp_processes(tmp_path):
    # training + validation under DDP (gloo): unequal validation shards must not hang
    out = tmp_path / "fit"
    r = run_cli(["fit", "experiment=digits/judge_classifier", "trainer=ddp_cpu", "trainer.devices=2",
                 "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=2",
                 "data.batch_size=47", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path}/cache"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "cache" / "digits_judge_cnn" / "model.safetensors").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()
