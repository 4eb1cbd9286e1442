"""Reduced precision end to end on the CPU (equidiff.utils.precision): bf16 networks, by their dtype or by
autocast (``trainer.precision=bf16-mixed``), around an fp32 sampler state, fp32 losses and fp32 records.

Tolerance. bf16 keeps 8 significant bits: rounding a value moves it by at most u = 2^-9 of itself, and a network
evaluated in bf16 (inputs, weights, activations rounded at every layer, fp32 accumulation) returns eps with a
relative error of a few u, about 2^-8 = 0.4% (measured on the tiny UNet: 0.3-0.4% per evaluation). The samplers
keep x_t in fp32 and update it linearly in eps with coefficients of size <= 1 (DDIM: sqrt(alpha_bar_{t-1}) /
sqrt(alpha_bar_t) and the direction coefficient), so the per-step errors add rather than multiply: over the
10-50 steps used here the final relative L2 error measured 0.2-0.4% per sample. We assert <= 2% (5 x 2^-8)
per sample, while two different seeds differ by more than 50%: a test that bf16 is the same computation, not
a bound on bf16's accuracy. Per-seed invariance is asserted exactly in fp32 by the runs' tests
(tests/methods/test_sampling_runs.py and others), unchanged.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from equidiff.classifiers import load_small_net
from equidiff.classifiers.wrapper import Classifier
from equidiff.diffusion import UNetBackbone, ddim_chain, load_dit, load_unet, sample_ddim
from equidiff.errors import ConfigError
from equidiff.guidance import ClassifierGuidance, NegLogLikelihood
from equidiff.invariant import Logits, LowPass
from equidiff.invariant.algorithm import evaluate
from equidiff.methods.invariant import InvariantSampler
from equidiff.utils import generators_for, randn_per_sample
from equidiff.utils.precision import check_predict_precision, full_precision, set_tf32

BF16_REL = 0.02  # module docstring
autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L2 distance of a to b."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def _classifier(dtype=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(512, 4))
    return Classifier(net, input_range=(-1, 1), channels=1, image_size=8, num_classes=4, dtype=dtype)


def _guided_samples(backbone, classifier, seeds, *, enabled=False, steps=10):
    guidance = ClassifierGuidance(NegLogLikelihood(classifier), scale=3.0)
    gens = generators_for(seeds)
    x_T = randn_per_sample(backbone.sample_shape, gens)
    model_fn = guidance(backbone, {"label": torch.arange(len(seeds)) % 4}, backbone.scheduler)
    with torch.no_grad(), autocast(enabled=enabled):
        return sample_ddim(model_fn, x_T, backbone.scheduler, num_steps=steps, eta=1.0, generators=gens,
                           scheduler_overrides={"clip_sample": False})


@pytest.fixture(scope="module")
def fp32_reference(tiny_pipeline_dir):
    backbone = load_unet(str(tiny_pipeline_dir))
    return backbone, _guided_samples(backbone, _classifier(), [3, 4, 5])


def test_a_bf16_backbone_and_classifier_sample_close_to_fp32(tiny_pipeline_dir, fp32_reference):
    backbone32, ref = fp32_reference
    backbone = load_unet(str(tiny_pipeline_dir), dtype="bfloat16")  # crashed: "Input type (float) and bias type"
    assert backbone.unet.dtype == torch.bfloat16 and backbone._alphas_cumprod.dtype == torch.float32
    out = _guided_samples(backbone, _classifier("bfloat16"), [3, 4, 5])
    assert out.dtype == torch.float32  # the sampler state stays fp32
    assert (rel(out, ref) <= BF16_REL).all(), rel(out, ref)
    assert (rel(out, ref) > 0).any()  # bf16 did run
    other = _guided_samples(backbone32, _classifier(), [6, 7, 8])
    assert (rel(other, ref) > 0.5).all()


def test_autocast_samples_close_to_fp32(fp32_reference):
    backbone, ref = fp32_reference
    out = _guided_samples(backbone, _classifier(), [3, 4, 5], enabled=True)
    assert out.dtype == torch.float32
    assert (rel(out, ref) <= BF16_REL).all() and (rel(out, ref) > 0).any(), rel(out, ref)


def test_a_bf16_latent_dit_samples_and_decodes_close_to_fp32(tiny_dit_dir):
    def run(dtype):
        bb = load_dit(str(tiny_dit_dir), dtype=dtype, guidance_scale=2.0)
        gens = generators_for([1, 2])
        z_T = randn_per_sample(bb.sample_shape, gens)
        with torch.no_grad():
            z = sample_ddim(functools.partial(bb, class_labels=torch.tensor([3, 7])), z_T, bb.scheduler,
                            num_steps=5, eta=1.0, generators=gens)
            return z, bb.decode(z)

    (z32, x32), (z16, x16) = run(None), run("bfloat16")
    assert z16.dtype == x16.dtype == torch.float32
    assert (rel(z16, z32) <= BF16_REL).all() and (rel(x16, x32) <= BF16_REL).all(), (rel(z16, z32), rel(x16, x32))


def test_the_invariant_chain_in_bf16_keeps_z_T_and_its_gradient_in_fp32(tiny_unet, ddpm_scheduler):
    def run(unet):
        z = randn_per_sample((1, 8, 8), generators_for([1, 2])).requires_grad_(True)
        with torch.enable_grad():
            x = ddim_chain(UNetBackbone(unet, ddpm_scheduler), z, ddpm_scheduler, num_steps=5,
                           scheduler_overrides={"clip_sample": False})
            (grad,) = torch.autograd.grad(x.square().sum(), z)
        return x.detach(), grad

    x32, g32 = run(tiny_unet)
    x16, g16 = run(copy.deepcopy(tiny_unet).to(torch.bfloat16))
    assert x16.dtype == g16.dtype == torch.float32
    assert (rel(x16, x32) <= BF16_REL).all(), rel(x16, x32)
    # the gradient goes back through the same bf16 networks: the same kind of error, twice
    assert (rel(g16, g32) <= 2 * BF16_REL).all(), rel(g16, g32)


def test_algorithm_1_losses_are_fp32_under_autocast(tiny_unet, ddpm_scheduler):
    torch.manual_seed(0)
    cnn = load_small_net("cnn", None, in_channels=1, num_classes=10, width=8, image_size=8)
    objective, low_pass = Logits(cnn, classes=[0, 1, 2]), LowPass(0.5)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    target = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    plain = evaluate(objective, x, target, 1.0, low_pass)
    with autocast():
        inside = evaluate(objective, x, target, 1.0, low_pass)
        assert not torch.equal(objective(x), plain[1])  # autocast is on here: bf16-rounded logits
        with full_precision():
            assert torch.equal(objective(x), plain[1])
    for a, b in zip(plain, inside, strict=True):
        assert torch.equal(a, b) and b.dtype == torch.float32

    sampler = InvariantSampler(UNetBackbone(tiny_unet, ddpm_scheduler), objective,
                               functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), num_steps=3, budget=2,
                               low_pass=low_pass)
    idx = torch.arange(2)
    batch = {"seed": 100 + idx, "index": idx, "label": idx * 0, "query": x[:2], "query_index": idx}
    with torch.no_grad(), autocast():
        rec = sampler.predict_step(batch, 0)
    for key in ("loss", "invariance_error", "freq_deviation", "value", "target", "image"):
        assert rec[key].dtype == torch.float32, key
    torch.testing.assert_close(rec["loss"], evaluate(objective, rec["image"], rec["target"], 1.0, low_pass)[0])


def test_ace_runs_in_bf16_close_to_fp32():
    from equidiff.explain.ace import PostProcessing, PreExplanation
    from equidiff.methods.ace import ACE
    from tests.ace.common import digits_like, tiny_backbone, tiny_classifier

    backbone, classifier = tiny_backbone(), tiny_classifier()
    pre = PreExplanation(num_steps=10, tau=3, iterations=3, step_size=4 / 255)
    post = PostProcessing(num_steps=10, tau=3)
    x = digits_like(3)
    batch = {"image": x, "label": torch.full((3,), -1), "seed": torch.arange(3), "index": torch.arange(3)}

    def run(bb, enabled=False):
        with autocast(enabled=enabled):
            return ACE(bb, classifier, pre, post, target=7).predict_step(batch, 0)

    ref = run(backbone)
    assert not ref["already_flipped"].any()
    bf16 = UNetBackbone(copy.deepcopy(backbone.unet).to(torch.bfloat16), backbone.scheduler)
    for out in (run(bf16), run(backbone, enabled=True)):
        assert out["image"].dtype == torch.float32
        # PGD follows sign(grad): a pixel whose fp32 gradient is within bf16 rounding of 0 may step the other
        # way, 2 x step_size per iteration at most; most pixels step alike and the masks agree
        pe = (out["pre_explanation_uint8"].int() - ref["pre_explanation_uint8"].int()).abs()
        assert pe.max() <= 2 * 4 * pre.iterations and pe.float().mean() < 1.0
        assert (out["image"] - ref["image"]).abs().mean() < 0.01
        assert torch.equal(out["mask"], ref["mask"])


def test_counterfactual_solvers_ignore_autocast():
    from equidiff.attacks.baselines import cfe_l2
    from equidiff.attacks.targets import TargetRule
    from equidiff.methods.counterfactual import Counterfactual

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 4))
    classifier = Classifier(net, input_range=(-1, 1), num_classes=4, channels=1, image_size=8)
    method = Counterfactual(classifier, functools.partial(cfe_l2, iters=30, gamma_steps=2, gamma=100.0),
                            TargetRule("next"), box=(-1.0, 1.0))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"image": x, "label": torch.tensor([1, 2, 3]), "seed": torch.arange(3), "index": torch.arange(3)}
    plain = method.predict_step(batch, 0)
    assert plain["valid"].sum() >= 2 and not torch.equal(plain["image"], x)  # the solver moved
    with autocast():
        mixed = method.predict_step(batch, 0)
    for key in ("image", "pred", "valid", "l2"):
        assert torch.equal(plain[key], mixed[key]), key


def test_precisions_that_cast_the_sampler_state_are_refused():
    for ok in ("32-true", "bf16-mixed", "64-true", 32):
        check_predict_precision(ok)
    for bad in ("bf16-true", "16-true", "16-mixed"):
        with pytest.raises(ConfigError, match="bf16-mixed"):
            check_predict_precision(bad)


def test_tf32_and_channels_last_do_nothing_on_the_cpu(tiny_unet, ddpm_scheduler):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(None)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(400)
    nhwc = UNetBackbone(copy.deepcopy(tiny_unet), ddpm_scheduler, channels_last=True)
    with torch.no_grad():
        assert torch.equal(nhwc(x, t), UNetBackbone(tiny_unet, ddpm_scheduler)(x, t))
    assert all(p.is_contiguous() for p in nhwc.unet.parameters())  # weights left as they were on the CPU


def test_predict_refuses_bf16_true_before_writing_anything(tmp_path, tiny_pipeline_dir):
    from equidiff.cli import run
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}", "trainer=cpu",
                       f"paths.output_dir={tmp_path}/out", "trainer.precision=bf16-true", "logger=none"])
    with pytest.raises(ConfigError, match="bf16-mixed"):
        run(cfg, "predict")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_bf16_predict_run_writes_the_fp32_runs_samples_within_rounding(tmp_path, tiny_pipeline3_dir):
    import numpy as np

    from tests.helpers import load_samples, run_cli

    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["trainer.precision=bf16-mixed", "+diffusion.dtype=bfloat16"])):
        r = run_cli(["predict", "experiment=digits/sample", f"diffusion.path={tiny_pipeline3_dir}", "trainer=cpu",
                     f"paths.output_dir={tmp_path}/{name}", "data.num_samples=4", "data.batch_size=2",
                     "sampler.num_steps=10", "metrics=none", "logger=none", "trainer.enable_progress_bar=false",
                     *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_samples(tmp_path / name)
    np.testing.assert_array_equal(runs["bf16"]["seeds"], runs["fp32"]["seeds"])
    a, b = runs["fp32"]["images"].astype(float), runs["bf16"]["images"].astype(float)
    # with clip_sample (this experiment's scheduler) a random UNet's large eps carries its bf16 error straight into
    # the clipped image (measured 11 levels mean): compared with the distance between two seeds' images instead
    same_seed, other_seed = np.abs(a - b).mean(), np.abs(a[:2] - a[2:]).mean()
    assert same_seed < 0.25 * other_seed, (same_seed, other_seed)
