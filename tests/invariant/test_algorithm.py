"""Algorithm 1 of seed 000: per-sample optimisation of z_T, stopping, best iterates; the InvariantSampler."""

import functools

import pytest
import pytorch_optimizer
import torch

from equidiff.classifiers import load_small_net
from equidiff.diffusion import UNetBackbone
from equidiff.errors import ConfigError
from equidiff.invariant import Logits, LowPass, invariant_optimize
from equidiff.methods.invariant import InvariantSampler, clamp_straight_through

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def linear_problem(b=4, d=6, m=3, seed=0):
    """generate(z) = A z, objective(x) = W x: the invariant set is an affine subspace, reachable from any z."""
    g = torch.Generator().manual_seed(seed)
    A, W = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d), torch.randn(m, d, generator=g) / d**0.5

    def generate(z, active):
        return z @ A.T

    objective = torch.nn.Linear(d, m, bias=False)
    objective.weight.data.copy_(W)
    objective.requires_grad_(False)
    z = torch.randn(b, d, generator=g)
    target = torch.randn(b, m, generator=g)
    return generate, objective, z, target


def test_converges_below_tau_on_a_reachable_set():
    generate, objective, z, target = linear_problem()
    start = ((objective(generate(z, None)) - target) ** 2).sum(-1)
    out = invariant_optimize(generate, objective, z, target, optimizer=SGD, budget=300, tau=1e-6)
    assert out["converged"].all()
    assert (out["loss"] < 1e-6).all() and (start > 1e-2).all()
    assert ((objective(out["x"]) - target) ** 2).sum(-1).max() < 1e-6
    torch.testing.assert_close(out["x"], generate(out["z_T"], None))
    assert (out["iterations"] < 300).all()


def test_a_converged_sample_stops_changing_while_the_others_go_on():
    generate, objective, z, target = linear_problem()
    target[1] = objective(generate(z[1:2], None))[0]  # sample 1 starts in the set
    seen = []
    out = invariant_optimize(generate, objective, z, target, optimizer=SGD, budget=5, tau=1e-8,
                             callback=lambda step, active, loss: seen.append(active))
    assert out["iterations"][1] == 0 and out["converged"][1]
    torch.testing.assert_close(out["z_T"][1], z[1])
    assert seen[0] == [0, 1, 2, 3] and all(1 not in a for a in seen[1:])  # never run again
    assert not out["converged"][[0, 2, 3]].any() and (out["iterations"][[0, 2, 3]] == 5).all()


def test_each_sample_keeps_its_best_iterate():
    generate, objective, z, target = linear_problem()
    losses = []
    big = functools.partial(torch.optim.SGD, lr=1.5)  # overshoots: the loss goes up and down
    out = invariant_optimize(generate, objective, z, target, optimizer=big, budget=12, tau=0.0,
                             callback=lambda step, active, loss: losses.append(loss))
    best = torch.stack(losses).min(0).values
    torch.testing.assert_close(out["loss"], best.double().float(), rtol=1e-6, atol=0)
    assert (best < torch.stack(losses)[-1]).any()  # the last iterate is worse for some sample
    torch.testing.assert_close(objective(out["x"]), objective(generate(out["z_T"], None)))


def test_renormalisation_keeps_each_latent_on_its_initial_sphere():
    generate, objective, z, target = linear_problem()
    out = invariant_optimize(generate, objective, z, target, optimizer=SGD, budget=10, tau=0.0, renormalize=True)
    torch.testing.assert_close(out["z_T"].norm(dim=1), z.norm(dim=1))


def test_a_diverging_optimiser_is_a_clear_error():
    generate, objective, z, target = linear_problem()
    huge = functools.partial(torch.optim.SGD, lr=1e30)
    with pytest.raises(ConfigError, match="non-finite.*learning rate"):
        invariant_optimize(generate, objective, z, target, optimizer=huge, budget=50, tau=0.0)


def test_bad_budget_tau_lambda_and_target_shape():
    generate, objective, z, target = linear_problem()
    with pytest.raises(ConfigError, match="budget"):
        invariant_optimize(generate, objective, z, target, optimizer=SGD, budget=0)
    with pytest.raises(ConfigError, match="lambda"):
        invariant_optimize(generate, objective, z, target, optimizer=SGD, lam=0.0)
    with pytest.raises(ConfigError, match="target has shape"):
        invariant_optimize(generate, objective, z, target[:, :2], optimizer=SGD, budget=2)


# ------------------------------------------------------------------------------------ InvariantSampler
@pytest.fixture
def backbone(tiny_unet, ddpm_scheduler):
    return UNetBackbone(tiny_unet, ddpm_scheduler)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return load_small_net("cnn", None, in_channels=1, num_classes=10, width=8, image_size=8)


def query_batch(indices, n_queries=2):
    g = torch.Generator().manual_seed(7)
    queries = torch.rand(n_queries, 1, 8, 8, generator=g) * 2 - 1
    idx = torch.as_tensor(indices)
    q = idx % n_queries
    return {"seed": 100 + idx, "index": idx, "label": torch.zeros_like(idx), "query": queries[q], "query_index": q}


def sampler(backbone, cnn, optimizer=SGD, **kw):
    kw = {"num_steps": 3, "budget": 3, "tau": 1e-3, "low_pass": LowPass(0.5), **kw}
    return InvariantSampler(backbone, Logits(cnn, classes=[0, 1, 2]), optimizer, **kw)


def test_checkpointed_chain_gives_the_same_images_and_gradients(backbone, cnn):
    grads = []
    for ckpt in (True, False):
        m = sampler(backbone, cnn, checkpoint=ckpt)
        z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with torch.enable_grad():
            x = m._generate(None)(z, [0, 1])
            loss = (m.objective(x) ** 2).sum() + (m.objective(m.low_pass(x)) ** 2).sum()
            grads.append((x.detach(), torch.autograd.grad(loss, z)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("optimizer", [SGD, functools.partial(pytorch_optimizer.Shampoo, lr=0.1)],
                         ids=["sgd", "shampoo"])
def test_a_sample_is_the_same_in_a_batch_of_1_and_of_4(backbone, cnn, optimizer):
    m = sampler(backbone, cnn, optimizer, budget=4, tau=0.5)  # a loose tau: some stop early, others go on
    with torch.no_grad():
        full = m.predict_step(query_batch([0, 1, 2, 3]), 0)
        singles = [m.predict_step(query_batch([i]), 0) for i in range(4)]
    for key in ("image", "loss", "iterations", "converged", "invariance_error", "freq_deviation"):
        torch.testing.assert_close(full[key], torch.cat([s[key] for s in singles]), msg=key)


def test_record_holds_errors_frequency_analysis_and_the_query(backbone, cnn):
    m = sampler(backbone, cnn, cutoffs=[0.25, 0.5, 1.0])
    with torch.no_grad():
        rec = m.predict_step(query_batch([0, 1, 2]), 0)
    target = m.objective(query_batch([0, 1, 2])["query"])
    torch.testing.assert_close(rec["target"], target)
    torch.testing.assert_close(rec["invariance_error"], (m.objective(rec["image"]) - target).norm(dim=-1))
    torch.testing.assert_close(rec["freq_deviation"][:, 1], rec["invariance_error_filtered"])  # f_c = 0.5 is F
    assert rec["freq_deviation"].shape == (3, 3) and rec["query"].dtype == torch.uint8
    assert rec["image"].min() >= -1 and rec["image"].max() <= 1


def test_given_target_values_replace_a_query(backbone, cnn):
    m = sampler(backbone, cnn)
    batch = query_batch([0, 1])
    del batch["query"]
    batch["target"] = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        rec = m.predict_step(batch, 0)
    torch.testing.assert_close(rec["target"], batch["target"])
    batch["target"] = torch.zeros(2, 5)
    with pytest.raises(ConfigError, match="target has shape"):
        with torch.no_grad():
            m.predict_step(batch, 0)


def test_guidance_baseline_runs_at_equal_denoiser_budget(backbone, cnn):
    m = sampler(backbone, cnn, mode="guidance", guidance_scale=0.5)
    assert m.guidance_steps == m.budget * m.num_steps
    with torch.no_grad():
        rec = m.predict_step(query_batch([0, 1]), 0)
    assert torch.isfinite(rec["invariance_error"]).all() and (rec["iterations"] == m.budget).all()


def test_stochastic_chain_uses_fixed_per_sample_noise(backbone, cnn):
    m = sampler(backbone, cnn, eta=1.0, budget=2)
    with torch.no_grad():
        a, b = m.predict_step(query_batch([0, 1]), 0), m.predict_step(query_batch([1]), 0)
    torch.testing.assert_close(a["image"][1:], b["image"])


def test_bad_sampler_settings(backbone, cnn):
    with pytest.raises(ConfigError, match="budget"):
        sampler(backbone, cnn, budget=0)
    with pytest.raises(ConfigError, match="mode"):
        sampler(backbone, cnn, mode="magic")
    with pytest.raises(ConfigError, match="cutoffs"):
        sampler(backbone, cnn, cutoffs=[0.0])


def test_straight_through_clamp():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = clamp_straight_through(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, 0.5, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_quantising_straight_through_gives_the_stored_image():
    from equidiff.utils.images import to_uint8, uint8_to_float

    x = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2).requires_grad_(True)
    y = clamp_straight_through(x, quantize=True)
    torch.testing.assert_close(y.detach(), uint8_to_float(to_uint8(x)))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_converged_flags_hold_for_the_stored_images(backbone, cnn):
    m = sampler(backbone, cnn, budget=4, tau=0.5)
    with torch.no_grad():
        rec = m.predict_step(query_batch([0, 1, 2, 3]), 0)
    assert rec["converged"].any()
    assert ((rec["loss"] < 0.5) == rec["converged"].bool()).all()


def test_invariance_loss_is_lambda_times_both_distances_to_the_target():
    # Algorithm 1, lines 18-20, written out by hand on numbers where every term differs:
    # lambda * (||L(x) - t||^2 + ||L(F(x)) - t||^2); L(F(x)) is compared with the target t, not with L(x).
    from equidiff.invariant.algorithm import invariance_loss

    values = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    filtered = torch.tensor([[3.0, 0.0], [2.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # sample 0: (1 + 1) + (9 + 1) = 12; sample 1: (1 + 4) + (1 + 1) = 7; lambda = 2.5
    torch.testing.assert_close(invariance_loss(values, filtered, target, 2.5), torch.tensor([30.0, 17.5]))
    torch.testing.assert_close(invariance_loss(values, None, target, 2.5), torch.tensor([5.0, 12.5]))


def test_one_sgd_step_of_algorithm_1_scales_with_lambda():
    # generate = identity, L(x) = W x, no filter: loss = lam ||W z - t||^2, so plain SGD moves
    # z_1 = z_0 - lr * lam * 2 W^T (W z_0 - t) (lines 24-25), derived by hand.
    g = torch.Generator().manual_seed(4)
    W, z0, t = torch.randn(2, 3, generator=g), torch.randn(1, 3, generator=g), torch.randn(1, 2, generator=g)
    objective = torch.nn.Linear(3, 2, bias=False)
    objective.weight.data.copy_(W)
    objective.requires_grad_(False)
    seen = []
    lr, lam = 0.01, 3.0
    invariant_optimize(lambda z, active: z, objective, z0, t, optimizer=functools.partial(torch.optim.SGD, lr=lr),
                       budget=2, tau=0.0, lam=lam, callback=lambda step, active, loss: seen.append(loss))
    z1 = z0 - lr * lam * 2 * (z0 @ W.T - t) @ W
    torch.testing.assert_close(seen[0], lam * ((z0 @ W.T - t) ** 2).sum(-1))
    torch.testing.assert_close(seen[1], lam * ((z1 @ W.T - t) ** 2).sum(-1))


def test_the_filtered_term_pulls_the_low_pass_image_towards_the_target():
    # With a filter F(x) = x / 2 and L = identity, the loss is lam (||x - t||^2 + ||x/2 - t||^2),
    # minimised at x = 6 t / 5 (d/dx: 2(x - t) + (x/2 - t) = 0); comparing L(F(x)) with L(x)
    # instead would move the minimum to x = t.
    t = torch.tensor([[1.0, -2.0]])
    objective = torch.nn.Identity()
    out = invariant_optimize(lambda z, active: z, objective, torch.zeros(1, 2), t,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.1), budget=400, tau=0.0, lam=2.0,
                             low_pass=lambda x: x / 2)
    torch.testing.assert_close(out["x"], 1.2 * t, atol=1e-3, rtol=0)  # float32 near a flat minimum
