"""End-to-end predict through the real configs: invariance, resume, grad mode, outputs.

The same seed and sample index give the same image whatever the batch size, the number of
processes, or an interruption and resume.
"""

import json

import numpy as np
import pytest
import torch

from equidiff.cli import build, run
from equidiff.errors import ConfigError
from tests.helpers import compose_cfg, load_samples, run_cli

N = 7


def _overrides(pipeline, out, *extra):
    return ["experiment=digits/sample", f"diffusion.path={pipeline}", f"paths.output_dir={out}",
            f"data.num_samples={N}", "sampler.num_steps=4", "trainer=cpu", "logger=csv", *extra]


def _predict(pipeline, out, *extra):
    run(compose_cfg(_overrides(pipeline, out, *extra)), "predict")
    return load_samples(out)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, _predict(tiny_pipeline_dir, out, "data.batch_size=4")


def test_outputs_of_a_predict_run(reference):
    out, ref = reference
    assert ref["images"].shape == (N, 8, 8, 1) and ref["images"].dtype == np.uint8
    assert ref["seeds"].tolist() == list(range(N)) and (ref["labels"] == -1).all()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"{i:06d}.png" for i in range(N)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"precision_recall/precision", "judge/mean_confidence", "judge/classes_covered"} <= set(metrics)
    assert (out / "grid.png").exists() and (out / "csv" / "metrics.csv").exists()
    assert len({img.tobytes() for img in ref["images"]}) == N  # every seed gives its own sample


def test_batch_size_does_not_change_any_sample(tiny_pipeline_dir, tmp_path, reference):
    one = _predict(tiny_pipeline_dir, tmp_path / "bs1", "data.batch_size=1")
    np.testing.assert_array_equal(one["images"], reference[1]["images"])
    np.testing.assert_array_equal(one["seeds"], reference[1]["seeds"])


def test_same_seed_same_sample_across_runs_with_different_seed_ranges(tiny_pipeline_dir, tmp_path, reference):
    # seeds 3..9: samples 3..6 exist in the reference too (seed = seed + index)
    shifted = _predict(tiny_pipeline_dir, tmp_path / "shift", "seed=3", "data.batch_size=3")
    assert shifted["seeds"].tolist() == list(range(3, 3 + N))
    np.testing.assert_array_equal(shifted["images"][:4], reference[1]["images"][3:])


def test_resume_after_interruption(tiny_pipeline_dir, tmp_path, reference):
    out = tmp_path / "resume"
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=2", "data.batch_size=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _predict(tiny_pipeline_dir, out, *stop)
    written = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert written == ["000000.npz", "000001.npz", "000002.npz", "000003.npz"]
    assert not (out / "samples.npz").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}

    resumed = _predict(tiny_pipeline_dir, out, "data.batch_size=2")
    assert resumed["seeds"].tolist() == list(range(N))  # exactly N, no duplicates
    np.testing.assert_array_equal(resumed["images"], reference[1]["images"])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert all(after[k] == v for k, v in before.items()), "finished samples must not be rewritten"
    # metrics cover the whole set, also the samples of the interrupted run
    ref_metrics = json.loads((reference[0] / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(ref_metrics)

    # a finished run re-run: nothing recomputed but the one-per-process top-up, same result
    again = _predict(tiny_pipeline_dir, out, "data.batch_size=2")
    np.testing.assert_array_equal(again["images"], reference[1]["images"])


def test_resume_into_a_folder_of_another_configuration_is_refused(tiny_pipeline_dir, tmp_path, reference):
    out = reference[0]
    with pytest.raises(ConfigError, match="different configuration"):
        run(compose_cfg(_overrides(tiny_pipeline_dir, out, "sampler.eta=1.0")), "predict")


class GradProbe:
    """A guidance wrapper that takes a gradient of the model output, as real guidance does."""

    def __call__(self, model_fn, batch, scheduler):
        def guided(x_t, t):
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(model_fn(x, t).square().sum(), x)
            assert g.abs().sum() > 0
            return model_fn(x_t, t)

        return guided


@pytest.mark.parametrize("trainer", ["cpu", "default", "gpu", "ddp", "ddp_cpu"])
def test_trainer_configs_never_use_inference_mode(trainer):
    cfg = compose_cfg(["experiment=digits/sample", f"trainer={trainer}"])
    assert cfg.trainer.inference_mode is False


def test_predict_does_not_run_under_inference_mode(tiny_pipeline_dir, tmp_path, monkeypatch):
    # the real config's trainer runs a guidance that needs gradients inside predict_step
    cfg = compose_cfg(_overrides(tiny_pipeline_dir, tmp_path / "g", "data.num_samples=2", "metrics=none"))
    datamodule, model, trainer = build(cfg)
    model.guidance = GradProbe()
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    assert len(load_samples(tmp_path / "g")["seeds"]) == 2

    # and the same run with inference_mode switched on fails loudly
    cfg = compose_cfg(_overrides(tiny_pipeline_dir, tmp_path / "im", "data.num_samples=2", "metrics=none",
                                 "trainer.inference_mode=true"))
    datamodule, model, trainer = build(cfg)
    with pytest.raises(ConfigError, match="inference_mode"):
        trainer.predict(model, datamodule=datamodule, return_predictions=False)


def test_one_process_and_two_ddp_processes_give_the_same_samples(tiny_pipeline_dir, tmp_path, reference):
    out = tmp_path / "ddp"
    r = run_cli(["predict", *_overrides(tiny_pipeline_dir, out, "trainer=ddp_cpu", "trainer.devices=2",
                                        "data.batch_size=2")], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = load_samples(out)
    assert ddp["seeds"].tolist() == list(range(N))
    np.testing.assert_array_equal(ddp["images"], reference[1]["images"])
    # metrics are exact under DDP (sum-reduced / gathered states)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((reference[0] / "metrics.json").read_text()))


def test_resume_is_refused_when_the_weights_changed(tiny_pipeline_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    out = tmp_path / "w"
    _predict(model, out, "data.num_samples=2", "metrics=none")
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # retrained (here: rewritten) in place
    import os

    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="_weights"):
        _predict(model, out, "data.num_samples=2", "metrics=none")


# --------------------------------------------------------------------------- completeness and small N (issue 13)
def _finished_copy(reference, dest):
    """A copy of the reference run's finished folder, to damage."""
    import shutil

    shutil.copytree(reference[0], dest)
    (dest / "equidiff.log").unlink(missing_ok=True)
    return dest


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_a_sample_whose_png_is_lost_is_recomputed_not_merged_without_images(tiny_pipeline_dir, tmp_path, reference):
    out = _finished_copy(reference, tmp_path / "lost")
    (out / "samples" / "000002.png").unlink()  # its sidecar is still there
    (out / "grid.png").write_bytes(b"stale")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    again = _predict(tiny_pipeline_dir, out, "metrics=none")  # without metrics the old merge wrote no images
    np.testing.assert_array_equal(again["images"], reference[1]["images"])
    assert (out / "grid.png").read_bytes() == (reference[0] / "grid.png").read_bytes()
    assert "sample 2 is damaged or half written, it is recomputed" in (out / "equidiff.log").read_text()
    assert "000002.png is missing" in (out / "equidiff.log").read_text()
    after = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert [k for k in before if after[k] != before[k]] == ["000002.npz"]  # only that sample was rewritten
    # this run computes no metrics: the old values are not left behind, only what the (empty) set covers
    assert _metrics(out) == {"_coverage/num_samples": N, "_coverage/first_seed": 0, "_coverage/last_seed": N - 1}


def test_cut_short_files_are_named_and_their_samples_recomputed(tiny_pipeline_dir, tmp_path, reference):
    out = _finished_copy(reference, tmp_path / "cut")
    for name in ("000003.png", "000005.npz"):
        path = out / "samples" / name
        path.write_bytes(path.read_bytes()[:40])  # a copy or a disk that stopped part-way
    again = _predict(tiny_pipeline_dir, out)
    np.testing.assert_array_equal(again["images"], reference[1]["images"])
    assert _metrics(out) == pytest.approx(_metrics(reference[0]))  # read back / recomputed: the same metrics
    log = (out / "equidiff.log").read_text()
    assert f"{out / 'samples' / '000003.png'} is not a whole PNG" in log
    assert f"{out / 'samples' / '000005.npz'} cannot be read" in log


def test_a_larger_run_cut_short_leaves_no_outputs_of_the_smaller_set(tiny_pipeline_dir, tmp_path, reference):
    out = _finished_copy(reference, tmp_path / "grow")
    derived = ["samples.npz", "samples.csv", "metrics.json", "grid.png"]
    assert all((out / name).exists() for name in derived)
    assert _metrics(out)["_coverage/num_samples"] == N  # what the metrics cover is written beside them
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=1", "data.batch_size=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _predict(tiny_pipeline_dir, out, "data.num_samples=10", *stop)
    assert [name for name in derived if (out / name).exists()] == []  # nothing that describes the 7 samples
    grown = _predict(tiny_pipeline_dir, out, "data.num_samples=10")
    assert grown["seeds"].tolist() == list(range(10))
    coverage = {k: v for k, v in _metrics(out).items() if k.startswith("_coverage/")}
    assert coverage == {"_coverage/num_samples": 10, "_coverage/first_seed": 0, "_coverage/last_seed": 9}


def test_too_few_samples_for_a_metric_fail_before_sampling(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "three"
    # k-NN precision/recall (k = 3) needs 4 samples; torch-fidelity fails below that too
    with pytest.raises(ConfigError, match=r"metric 'precision_recall': .* at least 4; this run makes 3"):
        _predict(tiny_pipeline_dir, out, "data.num_samples=3")
    assert not (out / "samples").exists()


def test_one_sample_on_two_processes(tiny_pipeline_dir, tmp_path, reference):
    # the second process has no sample: it runs one padding item that the writer and the metrics ignore, and
    # its empty gathered states (the diversity's cat states) must not break the collective
    diversity = ("+metrics.diversity={_target_:equidiff.callbacks.MetricSpec,inputs:[image,label,seed],"
                 "metric:{_target_:equidiff.metrics.invariant.Diversity}}")
    args = ["data.num_samples=1", "metrics.precision_recall=null", diversity]
    one = tmp_path / "one"
    _predict(tiny_pipeline_dir, one, *args)
    out = tmp_path / "ddp1"
    r = run_cli(["predict", *_overrides(tiny_pipeline_dir, out, "trainer=ddp_cpu", "trainer.devices=2", *args)],
                timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = load_samples(out)
    assert ddp["seeds"].tolist() == [0] and sorted(p.name for p in (out / "samples").iterdir()) == [
        "000000.npz", "000000.png"]
    np.testing.assert_array_equal(ddp["images"], reference[1]["images"][:1])
    assert _metrics(out) == _metrics(one) and _metrics(out)["_coverage/num_samples"] == 1
