"""Algorithm 1 on LightningDiT + VA-VAE (tiny, converted from the released formats): per-sample independence,
1 vs 2 processes, resume; the flow chain inside the InvariantSampler; the experiments' fast-run entries."""

import functools

import numpy as np
import pytest
import torch

from equidiff.classifiers import load_small_net
from equidiff.cli import run
from equidiff.diffusion import load_lightningdit
from equidiff.errors import ConfigError
from equidiff.invariant import Logits, LowPass
from equidiff.methods.invariant import InvariantSampler
from tests.diffusion.lightningdit_standins import write_tiny_folder
from tests.helpers import compose_cfg, load_samples, run_cli

STANDIN = "tests.diffusion.lightningdit_standins.tiny_lightningdit"
# the tiny LightningDiT (4 x 4 x 4 latents, 8 px images), fake ImageNet at 8 px, a random ResNet-18 at 32 px,
# a 3-point grid (2 Euler steps), 2 iterations
LDIT_INVARIANT = [f"diffusion._target_={STANDIN}", "diffusion.path={tmp}/ldit", "paths.data_dir={tmp}/data",
                  "data.source._target_=tests.analysis.standins.fake_imagenet", "data.source.image_size=8",
                  "classifier.weights_path=null", "classifier.name=resnet18", "classifier.image_size=32",
                  "data.num_queries=2", "data.samples_per_query=2", "data.batch_size=2", "method.num_steps=3",
                  "method.budget=2"]
LDIT_SAMPLE = [f"diffusion._target_={STANDIN}", "diffusion.path={tmp}/ldit", "data.num_samples=4", "data.batch_size=2",
               "sampler.num_steps=3"]
# entries for tests/test_experiments.py::OVERRIDES
OVERRIDES = {
    "invariant/imagenet_lightningdit_logits": ("predict", LDIT_INVARIANT),
    "invariant/imagenet_lightningdit_sample": ("predict", LDIT_SAMPLE),
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("ldit") / "ldit")


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return load_small_net("cnn", None, in_channels=3, num_classes=10, width=8, image_size=8)


def query_batch(indices, n_queries=2):
    g = torch.Generator().manual_seed(7)
    queries = torch.rand(n_queries, 3, 8, 8, generator=g) * 2 - 1
    idx = torch.as_tensor(indices)
    q = idx % n_queries
    return {"seed": 100 + idx, "index": idx, "label": torch.zeros_like(idx), "query": queries[q], "query_index": q}


def sampler(backbone, cnn, **kw):
    kw = {"num_steps": 4, "budget": 3, "tau": 0.5, "low_pass": LowPass(0.5), **kw}
    return InvariantSampler(backbone, Logits(cnn, classes=[0, 1, 2]),
                            functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), **kw)


def test_algorithm_1_sample_is_the_same_in_a_batch_of_1_and_of_3(tiny_folder, cnn):
    m = sampler(load_lightningdit(str(tiny_folder), timestep_shift=0.3), cnn)
    with torch.no_grad():
        full = m.predict_step(query_batch([0, 1, 2]), 0)
        singles = [m.predict_step(query_batch([i]), 0) for i in range(3)]
    for key in ("image", "loss", "iterations", "converged", "invariance_error", "freq_deviation"):
        torch.testing.assert_close(full[key], torch.cat([s[key] for s in singles]), msg=key, rtol=1e-5, atol=1e-6)
    assert full["loss"].max() > 0 and not torch.equal(full["image"][0], full["image"][1])


def test_the_flow_chain_runs_with_the_null_class_and_optimises_z_T(tiny_folder, cnn):
    bb = load_lightningdit(str(tiny_folder), timestep_shift=0.3)
    m = sampler(bb, cnn, budget=1)
    calls = []
    original = bb.transformer.forward

    def spy(x, t, y):
        calls.append((float(t[0]), y.tolist()))
        return original(x, t, y)

    bb.transformer.forward = spy
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.enable_grad():
        x = m._generate(None)(z, [0, 1])
        (g,) = torch.autograd.grad(m.objective(x).square().sum(), z)
    assert x.shape == (2, 3, 8, 8) and g.abs().sum() > 0
    grid = bb.scheduler.time_grid(4).tolist()
    forward_calls = calls[:3]  # the forward pass; backward recomputes each checkpointed step
    assert [c[0] for c in forward_calls] == pytest.approx(grid[:3]) and all(c[1] == [1000, 1000] for c in calls)


def test_the_guidance_baseline_eta_and_a_ddim_chain_are_refused_for_a_flow_backbone(tiny_folder, cnn):
    from equidiff.diffusion import ddim_chain

    bb = load_lightningdit(str(tiny_folder))
    with pytest.raises(ConfigError, match="guidance baseline"):
        sampler(bb, cnn, mode="guidance")
    with pytest.raises(ConfigError, match="eta must be 0"):
        sampler(bb, cnn, eta=0.5)
    m = sampler(bb, cnn, chain=ddim_chain)
    with pytest.raises(ConfigError, match="flow-matching backbone"):
        with torch.no_grad():
            m.predict_step(query_batch([0]), 0)


# ------------------------------------------------------------------------------------ through the real config
def _overrides(tmp, out, folder, *extra, trainer="cpu"):
    """The fast-run entry with the prebuilt tiny folder (two DDP processes must not both convert it), 2 queries x
    3 seeds, and ``extra`` (whose keys replace the entry's)."""
    keys = {e.split("=", 1)[0] for e in extra}
    given = [o.format(tmp=tmp) for o in LDIT_INVARIANT
             if o.split("=", 1)[0] not in keys | {"diffusion.path", "data.samples_per_query", "data.batch_size"}]
    return ["experiment=invariant/imagenet_lightningdit_logits", f"diffusion.path={folder}",
            f"paths.output_dir={out}", f"trainer={trainer}", "logger=csv", "trainer.enable_progress_bar=false", *given,
            "data.samples_per_query=3", *extra]


@pytest.fixture(scope="module")
def reference_run(tiny_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ldit_runs")
    out = tmp / "ref"
    run(compose_cfg(_overrides(tmp, out, tiny_folder, "data.batch_size=3")), "predict")
    return tmp, out, load_samples(out)


def test_config_run_writes_one_image_per_query_and_seed(reference_run):
    tmp, out, ref = reference_run
    assert ref["images"].shape == (6, 8, 8, 3) and ref["seeds"].tolist() == list(range(6))
    assert (out / "queries.png").exists() and (out / "metrics.json").exists()


def test_resume_after_interruption_gives_the_same_samples(reference_run, tiny_folder):
    tmp, _, ref = reference_run
    out = tmp / "resume"
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=1", "data.batch_size=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(compose_cfg(_overrides(tmp, out, tiny_folder, *stop)), "predict")
    written = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert written == ["000000.npz", "000001.npz"] and not (out / "samples.npz").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.npz")}
    run(compose_cfg(_overrides(tmp, out, tiny_folder, "data.batch_size=2")), "predict")
    resumed = load_samples(out)
    assert resumed["seeds"].tolist() == list(range(6))
    np.testing.assert_array_equal(resumed["images"], ref["images"])  # batch 2 (resumed) vs batch 3
    assert all((out / "samples" / k).stat().st_mtime_ns == v for k, v in before.items())


# about 40 s on 2 CPU cores; DDP sharding by seed is guarded by default in tests/methods/test_sampling_runs.py
@pytest.mark.slow
def test_one_process_and_two_ddp_processes_give_the_same_samples(reference_run, tiny_folder):
    tmp, _, ref = reference_run
    out = tmp / "ddp"
    r = run_cli(["predict", *_overrides(tmp, out, tiny_folder, "trainer.devices=2", "data.batch_size=2",
                                        trainer="ddp_cpu")], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = load_samples(out)
    assert ddp["seeds"].tolist() == list(range(6))
    np.testing.assert_array_equal(ddp["images"], ref["images"])


@pytest.mark.slow  # one CLI run through the script (about 30 s here)
def test_slurm_script_runs_the_lightningdit_experiment_by_default(tmp_path):
    import subprocess

    from tests.helpers import REPO
    from tests.test_slurm import _env, _fake_bin

    bin_dir = _fake_bin(tmp_path, 'exec "$@"')  # a one-task srun
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "slurm" / "invariant.sh"), *[o.format(tmp=tmp_path) for o in LDIT_INVARIANT],
                        f"paths.output_dir={out}", "logger=csv"], env=_env(bin_dir, TRAINER="cpu"),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "invariant_imagenet_lightningdit_logits" in (out / "config.yaml").read_text()
    assert load_samples(out)["seeds"].tolist() == [0, 1, 2, 3]
