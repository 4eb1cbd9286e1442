"""The run folder: owned by one run at a time, fingerprinted by what changes an output, committed with the first
result, left as it was by a run that fails before one; bad input is a clear error that writes nothing."""

import os
import shutil
import signal
import time

import pytest
from omegaconf import OmegaConf

from equidiff.cli import main, run
from equidiff.errors import ConfigError
from equidiff.utils.lock import LOCK_NAME
from equidiff.utils.runs import _fingerprint, check_resume_compatible
from tests.helpers import compose_cfg, load_samples, start_cli


def _args(pipeline, out, *extra):
    return ["experiment=digits/sample", f"diffusion.path={pipeline}", f"paths.output_dir={out}", "data.num_samples=4",
            "data.batch_size=2", "sampler.num_steps=2", "metrics=none", "logger=none", "trainer=cpu",
            "trainer.enable_progress_bar=false", *extra]


def _wait_for(path, proc, timeout=300):
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the first run ended before taking the folder:\n{out[-2000:]}\n{err[-2000:]}")
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.2)


GATE = ["+callbacks.gate._target_=tests.helpers.WaitForFile"]


# ----------------------------------------------------------------------------- two runs, one folder


def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(tiny_pipeline_dir, tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = start_cli(["predict", *_args(tiny_pipeline_dir, out, *GATE, f"+callbacks.gate.path={gate}")])
    try:
        _wait_for(out / LOCK_NAME, first)  # the first run holds the folder, before its first sample
        second = start_cli(["predict", *_args(tiny_pipeline_dir, out, "seed=100", "data.num_samples=6")])
        s_out, s_err = second.communicate(timeout=600)
        assert second.returncode not in (0, None), s_out[-2000:] + s_err[-2000:]
        assert "in use by another equidiff run" in s_err and f"pid {first.pid}" in s_err, s_err[-2000:]
        assert "predict" in s_err and "started" in s_err  # the holder's command and start time
    finally:
        gate.touch()
        f_out, f_err = first.communicate(timeout=600)
    assert first.returncode == 0, f_out[-2000:] + f_err[-2000:]
    # the folder is the first run's alone: its 4 samples, its fingerprint
    assert load_samples(out)["seeds"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in (out / "samples").glob("*.npz")) == [f"{i:06d}.npz" for i in range(4)]
    check_resume_compatible(compose_cfg(_args(tiny_pipeline_dir, out)), out)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow  # the logic is guarded in tests/utils/test_lock.py (a lock of a dead pid); this is the real kill
def test_a_killed_holder_does_not_lock_the_folder(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    first = start_cli(["predict", *_args(tiny_pipeline_dir, out, "sampler.eta=0.5", *GATE,
                                         f"+callbacks.gate.path={tmp_path}/never")])
    try:
        _wait_for(out / LOCK_NAME, first)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)  # reaped: its pid is gone
    assert (out / LOCK_NAME).exists() and not (out / "fingerprint.yaml").exists()
    # the same folder, now with another configuration (the killed run wrote no result): runs
    run(compose_cfg(_args(tiny_pipeline_dir, out)), "predict")
    assert load_samples(out)["seeds"].tolist() == [0, 1, 2, 3]
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- the fingerprint


def _fp_diff(pipeline, out, *changes):
    from equidiff.utils.runs import _diff

    a = OmegaConf.to_container(OmegaConf.create(_fingerprint(compose_cfg(_args(pipeline, out)))))
    b = OmegaConf.to_container(OmegaConf.create(_fingerprint(compose_cfg(_args(pipeline, out, *changes)))))
    return _diff(a, b)


@pytest.mark.parametrize("change", ["trainer.precision=bf16-true", "trainer.precision=16-mixed", "seed=1",
                                    "sampler.eta=0.5", "data.labels=3", "+ckpt_path=some.ckpt",
                                    "+trainer.accumulate_grad_batches=2"])
def test_fingerprint_covers_what_changes_an_output(tiny_pipeline_dir, tmp_path, change):
    assert _fp_diff(tiny_pipeline_dir, tmp_path, change)


@pytest.mark.parametrize("change", ["trainer=ddp_cpu", "trainer.devices=3", "trainer.accelerator=gpu",
                                    "trainer.limit_predict_batches=1", "trainer.fast_dev_run=true",
                                    "trainer.deterministic=true", "data.batch_size=7", "data.num_samples=9",
                                    "data.num_workers=2", "logger=csv", "metrics=digits", "task_name=x",
                                    "paths.log_dir=/elsewhere"])
def test_fingerprint_leaves_out_what_does_not(tiny_pipeline_dir, tmp_path, change):
    assert not _fp_diff(tiny_pipeline_dir, tmp_path, change)


def test_fingerprint_is_committed_right_before_the_writer_writes(tiny_pipeline_dir, tmp_path):
    from equidiff.callbacks import SampleWriter
    from equidiff.cli import build
    from equidiff.utils.runs import FingerprintCommit

    _, _, trainer = build(compose_cfg(_args(tiny_pipeline_dir, tmp_path)))
    kinds = [type(c) for c in trainer.callbacks]
    # Lightning calls on_predict_batch_end in this order
    assert kinds.index(FingerprintCommit) < kinds.index(SampleWriter)
    assert not (tmp_path / "fingerprint.yaml").exists(), "building writes nothing"


def test_resume_with_another_precision_is_refused(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    run(compose_cfg(_args(tiny_pipeline_dir, out)), "predict")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConfigError, match=r"trainer.precision: '32-true' -> 'bf16-mixed'"):
        run(compose_cfg(_args(tiny_pipeline_dir, out, "trainer.precision=bf16-mixed")), "predict")
    assert sorted(p.name for p in out.rglob("*")) == before
    # resume-free changes are accepted (and change nothing)
    run(compose_cfg(_args(tiny_pipeline_dir, out, "data.batch_size=3", "trainer.deterministic=true")), "predict")


def test_fingerprint_of_an_earlier_equidiff_is_still_accepted(tiny_pipeline_dir, tmp_path):
    cfg = compose_cfg(_args(tiny_pipeline_dir, tmp_path))
    old = _fingerprint(cfg)
    for k in ("trainer", "ckpt_path", "_version"):
        old.pop(k)
    (tmp_path / "fingerprint.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    check_resume_compatible(cfg, tmp_path)
    with pytest.raises(ConfigError, match="sampler.eta"):
        check_resume_compatible(compose_cfg(_args(tiny_pipeline_dir, tmp_path, "sampler.eta=0.5")), tmp_path)


def test_samples_without_a_fingerprint_are_not_resumed(tiny_pipeline_dir, tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "000000.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="no fingerprint.yaml"):
        check_resume_compatible(compose_cfg(_args(tiny_pipeline_dir, tmp_path)), tmp_path)


# ----------------------------------------------------------------------------- failed starts

FAIL = ["+callbacks.fail._target_=tests.helpers.FailAtStart"]


def test_a_run_that_fails_before_its_first_result_leaves_nothing(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(compose_cfg(_args(tiny_pipeline_dir, out, "sampler.eta=0.5", *FAIL)), "predict")
    assert not (tmp_path / "new").exists(), "no config.yaml, fingerprint.yaml, equidiff.log or empty folder"
    # the corrected command (another configuration) is not refused
    run(compose_cfg(_args(tiny_pipeline_dir, out)), "predict")
    assert load_samples(out)["seeds"].tolist() == [0, 1, 2, 3]


def test_a_failed_start_in_an_existing_folder_keeps_what_was_there(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(compose_cfg(_args(tiny_pipeline_dir, out, *FAIL)), "predict")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_failed_resume_keeps_every_file(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    run(compose_cfg(_args(tiny_pipeline_dir, out)), "predict")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(compose_cfg(_args(tiny_pipeline_dir, out, "data.batch_size=3", *FAIL)), "predict")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    changed = [str(k) for k in before if after[k] != before[k]]
    assert changed == ["equidiff.log"], changed  # config.yaml back as it was; the log tells of the failed attempt


# ----------------------------------------------------------------------------- bad input: clear, writes nothing


def _bad(tmp_path, capsys, *args):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["predict", *args, f"paths.output_dir={out}", "logger=none"])
    assert e.value.code not in (0, None)
    assert not out.exists(), "a failed run must not write anything"
    cap = capsys.readouterr()
    return cap.out + cap.err + str(e.value.code)


def test_unknown_keyword_added_with_plus_names_the_nearest_parameter(tiny_pipeline_dir, tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}",
               "+sampler.num_step=10")
    assert "sampler.num_step" in msg and "did you mean sampler.num_steps" in msg and "TypeError" not in msg


def test_unknown_key_names_the_nearest_key_instead_of_hydras_plus_hint(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "experiment=digits/sample", "sampler.num_stepz=3", "trainer.precison=bf16-true")
    assert "'sampler.num_stepz'" in msg and "did you mean 'sampler.num_steps'" in msg
    assert "'trainer.precison'" in msg and "did you mean 'trainer.precision'" in msg
    assert "+sampler.num_stepz" not in msg


@pytest.mark.parametrize(("override", "expected"), [
    ("sampler.num_steps=5000", "trained with 1000 steps"),
    ("sampler.num_steps=0", "1 to 1000"),
    ("sampler.eta=1.5", "eta must be in [0, 1]"),
])
def test_chain_settings_beyond_the_scheduler_are_build_time_errors(tiny_pipeline_dir, tmp_path, capsys, override,
                                                                   expected):
    msg = _bad(tmp_path, capsys, "experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}", override)
    assert expected in msg and override.split("=")[0] in msg and "ValueError" not in msg


def test_weights_of_another_architecture_name_the_file_and_the_mismatch(tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import UNet2DModel

    def pipeline_with_unet_weights_of(name, **arch):
        model = tmp_path / name
        shutil.copytree(tiny_pipeline_dir, model)
        UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=4,
                    **arch).save_pretrained(tmp_path / f"{name}_unet")
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        shutil.copy(tmp_path / f"{name}_unet" / "diffusion_pytorch_model.safetensors", weights)
        return model, weights

    # no attention blocks: 30 weights of the configured architecture are not in the file
    model, weights = pipeline_with_unet_weights_of("no_attn", block_out_channels=(8, 16),
                                                   down_block_types=("DownBlock2D", "DownBlock2D"),
                                                   up_block_types=("UpBlock2D", "UpBlock2D"))
    msg = _bad(tmp_path, capsys, "experiment=digits/sample", f"diffusion.path={model}")
    assert str(weights) in msg and "missing from the file" in msg and "attentions.0" in msg
    assert "meta" not in msg

    # wider channels: shapes differ
    model, weights = pipeline_with_unet_weights_of("wide", block_out_channels=(16, 32),
                                                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    msg = _bad(tmp_path, capsys, "experiment=digits/sample", f"diffusion.path={model}")
    assert str(weights) in msg and "shape mismatch" in msg and "expected (8,), file has (16,)" in msg


def test_parameter_check_names_the_node_and_the_nearest_parameter():
    # (every experiment passes it: tests/test_experiments.py builds each through build(), which runs it)
    from equidiff.utils.config_check import check_targets

    with pytest.raises(ConfigError, match=r"data.num_sample: equidiff.data.SeedDataModule .* did you mean "
                                          r"data.num_samples"):
        check_targets(compose_cfg(["experiment=digits/sample", "+data.num_sample=3"]))
    check_targets(compose_cfg(["experiment=digits/sample", "classifier=digits_cnn",
                               "+callbacks.fail._target_=tests.helpers.FailAtStart"]))
