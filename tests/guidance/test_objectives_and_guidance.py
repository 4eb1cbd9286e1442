"""Guidance objectives against closed forms, the guided eps, schedules, per-sample independence."""

import functools
import math

import pytest
import torch
from torch import nn

from equidiff.diffusion import UNetBackbone, sample_ddim
from equidiff.errors import ConfigError
from equidiff.guidance import (
    ClassifierGuidance,
    Constant,
    DualEnergy,
    JointEnergy,
    Linear,
    NegLogLikelihood,
    Power,
    Product,
    Sigmoid,
    Standard,
    TwoStage,
    WeightedSum,
    joint_energy,
    log_p_y_given_x,
    marginal_energy,
)
from equidiff.methods import draw_samples

K, D = 4, 16  # classes, input size (1 x 4 x 4 images)


class LinearClassifier(nn.Module):
    """f(x) = W x + b on flattened inputs: every gradient has a closed form."""

    num_classes = K

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1).double() @ self.W.T + self.b


def _x(n=3, seed=1):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _closed_forms(clf, x, y):
    W, b = clf.W.detach(), clf.b.detach()
    p = (x.flatten(1) @ W.T + b).softmax(-1)
    grad_E_xy = -W[y]  # E(x, y) = -(W_y x + b_y)
    grad_E_x = -(p @ W)  # E(x) = -logsumexp(W x + b)
    return grad_E_xy, grad_E_x


def _direction(objective, x, y):
    return ClassifierGuidance(objective).direction(x, y).flatten(1)


def test_energy_identity():
    logits = torch.randn(5, K, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    torch.testing.assert_close(log_p_y_given_x(logits, y), marginal_energy(logits) - joint_energy(logits, y))
    torch.testing.assert_close(log_p_y_given_x(logits, y), logits.log_softmax(-1)[torch.arange(5), y])


def test_objective_gradients_equal_their_closed_forms():
    clf, x, y = LinearClassifier(), _x(), torch.tensor([0, 2, 3])
    grad_E_xy, grad_E_x = _closed_forms(clf, x, y)
    # guidance direction g = -grad loss
    torch.testing.assert_close(_direction(JointEnergy(clf), x, y), -grad_E_xy)  # -grad E(x, y)
    torch.testing.assert_close(_direction(NegLogLikelihood(clf), x, y), grad_E_x - grad_E_xy)  # grad log p(y|x)
    means = torch.tensor([-3.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    lam = 0.3
    e_x = marginal_energy(clf(x)).detach()
    sign = torch.sign(means[y] - e_x)[:, None]  # d|m - E(x)|/dx = -sign(m - E(x)) grad E(x)
    torch.testing.assert_close(_direction(DualEnergy(clf, lam=lam, class_means=means.tolist()), x, y),
                               -(grad_E_xy - lam * sign * grad_E_x))
    both = WeightedSum([JointEnergy(clf), NegLogLikelihood(clf)], [0.5, 2.0])
    torch.testing.assert_close(_direction(both, x, y), -0.5 * grad_E_xy + 2.0 * (grad_E_x - grad_E_xy))


def test_accumulated_and_pgd_directions_follow_their_definitions():
    clf, x, y = LinearClassifier(), _x(2), torch.tensor([1, 3])
    nll = NegLogLikelihood(clf)

    def g_at(z):  # closed-form grad log p(y | z)
        grad_E_xy, grad_E_x = _closed_forms(clf, z, y)
        return (grad_E_x - grad_E_xy).reshape(z.shape)

    def unit(g):
        return g / g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)

    # section 4.3: sum of n directions along x_{i+1} = x_i + gamma g_i / ||g_i||
    z, total = x.clone(), torch.zeros_like(x)
    for _ in range(3):
        g = g_at(z)
        total, z = total + g, z + 0.2 * unit(g)
    ours = ClassifierGuidance(nll, accumulate_steps=3, accumulate_gamma=0.2).direction(x, y)
    torch.testing.assert_close(ours, total)

    # Algorithm 8: n steps x <- (1 + gamma) x - gamma grad L / ||grad L||, direction at the last point
    z = x.clone()
    for _ in range(4):
        z = (1 + 0.05) * z + 0.05 * unit(g_at(z))  # grad L = -g
    ours = ClassifierGuidance(nll, pgd_steps=4, pgd_gamma=0.05).direction(x, y)
    torch.testing.assert_close(ours, g_at(z))


def test_guided_eps_is_algorithm_6(ddpm_scheduler):
    clf, x, y = LinearClassifier(), _x(2), torch.tensor([0, 1])
    eps_theta = torch.randn_like(x)
    model_fn = lambda x_t, t: eps_theta  # noqa: E731
    t = torch.tensor(700)
    ab = ddpm_scheduler.alphas_cumprod[700].double()
    guided = ClassifierGuidance(NegLogLikelihood(clf), scale=3.0)(model_fn, {"label": y}, ddpm_scheduler)
    g = _direction(NegLogLikelihood(clf), x, y).reshape(x.shape)
    torch.testing.assert_close(guided(x, t), eps_theta - (1 - ab).sqrt() * 3.0 * g)
    # a schedule of the timestep (not of alpha_bar): w = 2 + (0.5 - 2) (1 - 700 / 1000) = 1.55 at t = 700
    timed = ClassifierGuidance(NegLogLikelihood(clf), scale=3.0, schedule=Linear(2.0, 0.5))(model_fn, {"label": y},
                                                                                            ddpm_scheduler)
    torch.testing.assert_close(timed(x, t), eps_theta - 1.55 * 3.0 * g)
    # guidance starts after a fraction of the reverse process: off at t=700 (progress 0.3) for 0.5
    late = ClassifierGuidance(NegLogLikelihood(clf), scale=3.0, start_fraction=0.5)(model_fn, {"label": y},
                                                                                   ddpm_scheduler)
    assert torch.equal(late(x, t), eps_theta) and not torch.equal(late(x, torch.tensor(400)), eps_theta)


def test_gradient_through_x0_hat(tiny_unet, ddpm_scheduler):
    backbone = UNetBackbone(tiny_unet.double(), ddpm_scheduler)

    class Pixels(nn.Module):  # a 4-class classifier on 8x8 images
        num_classes = 4

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4).double()

        def forward(self, x):
            return self.lin(x.flatten(1))

    clf = Pixels()
    x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y, t = torch.tensor([1, 2]), torch.tensor(500)
    ab = ddpm_scheduler.alphas_cumprod[500].double()
    with torch.no_grad():
        eps = backbone(x_t, t)
    x0_hat = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    detached = ClassifierGuidance(JointEnergy(clf), input="x0_hat_detached")(backbone, {"label": y}, ddpm_scheduler)
    g0 = _direction(JointEnergy(clf), x0_hat, y).reshape(x_t.shape)
    torch.testing.assert_close(detached(x_t, t), eps - (1 - ab).sqrt() * g0)

    through = ClassifierGuidance(JointEnergy(clf), input="x0_hat")(backbone, {"label": y}, ddpm_scheduler)
    x = x_t.clone().requires_grad_(True)
    x0 = (x - (1 - ab).sqrt() * backbone(x, t)) / ab.sqrt()
    (grad,) = torch.autograd.grad(JointEnergy(clf)(x0, y).sum(), x)
    torch.testing.assert_close(through(x_t, t), eps + (1 - ab).sqrt() * grad)


def _guided_samples(tiny_unet, scheduler, seeds, labels, scale, eta=1.0):
    backbone = UNetBackbone(tiny_unet, scheduler)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    clf.num_classes = 4
    guidance = ClassifierGuidance(NegLogLikelihood(clf), scale=scale) if scale is not None else None
    batch = {"seed": torch.tensor(seeds), "label": torch.tensor(labels)}
    sampler = functools.partial(sample_ddim, num_steps=6, eta=eta, scheduler_overrides={"clip_sample": False})
    with torch.no_grad():
        return draw_samples(backbone, sampler, batch, guidance=guidance)


def test_scale_zero_equals_unguided_exactly(tiny_unet, ddpm_scheduler):
    unguided = _guided_samples(tiny_unet, ddpm_scheduler, [1, 2, 3], [0, 1, 2], None)
    zero = _guided_samples(tiny_unet, ddpm_scheduler, [1, 2, 3], [0, 1, 2], 0.0)
    assert torch.equal(zero, unguided)
    assert not torch.allclose(_guided_samples(tiny_unet, ddpm_scheduler, [1, 2, 3], [0, 1, 2], 5.0), unguided)


def test_a_samples_guidance_does_not_depend_on_its_batch_mates(tiny_unet, ddpm_scheduler):
    seeds, labels = [5, 6, 7, 8], [3, 0, 2, 1]
    batch = _guided_samples(tiny_unet, ddpm_scheduler, seeds, labels, 5.0)
    alone = torch.cat([_guided_samples(tiny_unet, ddpm_scheduler, [s], [y], 5.0)
                       for s, y in zip(seeds, labels, strict=True)])
    # float32 convolutions sum in a batch-dependent order (about 1e-5 here with one thread); a guidance
    # that mixed batch-mates (a norm over the batch) changes samples by O(0.1)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)


def test_labels_outside_the_classifier_are_refused(ddpm_scheduler):
    guidance = ClassifierGuidance(JointEnergy(LinearClassifier()))
    with pytest.raises(ConfigError, match=r"outside the classifier's 4 classes"):
        guidance(lambda x, t: x, {"label": torch.tensor([0, 4])}, ddpm_scheduler)
    with pytest.raises(ValueError, match="outside"):
        joint_energy(torch.randn(2, K), torch.tensor([1, -1]))


# ----------------------------------------------------------------------------- schedules

T = 1000


@pytest.mark.parametrize("t, ab", [(999, 0.0001), (500, 0.3), (0, 0.9999)])
def test_schedules_equal_their_formulas(t, ab):
    assert Constant(2.5)(t, ab, T) == 2.5
    assert Standard()(t, ab, T) == pytest.approx(math.sqrt(1 - ab))
    assert Power(2)(t, ab, T) == pytest.approx((1 - ab) ** 2)
    assert Power(8)(t, ab, T) == pytest.approx((1 - ab) ** 8)
    s = Sigmoid(t0=650, y0=0.1, k=0.01)
    assert s(t, ab, T) == pytest.approx(0.9 / (1 + math.exp(-0.01 * (t - 650))) + 0.1)
    assert Linear(1.0, 0.0)(t, ab, T) == pytest.approx(t / T)
    assert Product([TwoStage(30, 11, 0.5), Standard()])(t, ab, T) == pytest.approx(
        (30 if t > 500 else 11) * math.sqrt(1 - ab))


def test_schedule_landmarks():
    # the sigmoid is y0 + (1 - y0) / 2 at t0, tends to 1 early and to y0 late
    s = Sigmoid(t0=500, y0=0.05, k=0.02)
    assert s(500, 0.5, T) == pytest.approx(0.05 + 0.95 / 2)
    assert s(999, 0.0, T) == pytest.approx(1.0, abs=1e-4) and s(0, 1.0, T) == pytest.approx(0.05, abs=1e-4)
    # two-stage: first strength for the first half of the reverse process (large t), then the second
    two = TwoStage(30, 11, 0.5)
    assert (two(990, 0, T), two(501, 0, T), two(500, 0, T), two(0, 0, T)) == (30, 30, 11, 11)
    assert Linear(2.0, 0.5)(1000, 0, T) == 2.0 and Linear(2.0, 0.5)(0, 0, T) == 0.5
    assert Linear(2.0, 0.5)(500, 0, T) == pytest.approx(1.25)


@pytest.mark.parametrize("make, msg", [
    (lambda: Sigmoid(t0=500, y0=1.5, k=0.02), "y0 must be in"),
    (lambda: Sigmoid(t0=500, y0=0.1, k=0.0), "steepness"),
    (lambda: Sigmoid(t0=-1, y0=0.1, k=0.1), "t0"),
    (lambda: Power(0), "exponent"),
    (lambda: TwoStage(30, 11, 1.5), "fraction"),
    (lambda: TwoStage(-1, 11, 0.5), "strengths"),
    (lambda: Constant(-1), "value"),
    (lambda: Linear(-1, 0), "start and end"),
    (lambda: Product([]), "at least one"),
    (lambda: ClassifierGuidance(JointEnergy(LinearClassifier()), start_fraction=1.0), "start_fraction"),
    (lambda: ClassifierGuidance(JointEnergy(LinearClassifier()), accumulate_steps=2, pgd_steps=2), "not both"),
    (lambda: ClassifierGuidance(JointEnergy(LinearClassifier()), input="x_0"), "input"),
    (lambda: DualEnergy(LinearClassifier(), class_means=[0.0] * 3), "3 class means"),
])
def test_impossible_parameters_are_refused(make, msg):
    with pytest.raises(ConfigError, match=msg):
        make()


def test_guidance_with_ddpm_ancestral_sampling(tiny_unet, ddpm_scheduler):
    from equidiff.diffusion import sample_ddpm

    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    clf.num_classes = 4
    batch = {"seed": torch.tensor([1, 2]), "label": torch.tensor([0, 3])}
    sampler = functools.partial(sample_ddpm, num_steps=5)
    with torch.no_grad():
        unguided = draw_samples(backbone, sampler, batch)
        zero = draw_samples(backbone, sampler, batch, guidance=ClassifierGuidance(NegLogLikelihood(clf), scale=0.0))
        guided = draw_samples(backbone, sampler, batch, guidance=ClassifierGuidance(NegLogLikelihood(clf), scale=50.0))
    assert torch.equal(zero, unguided) and not torch.allclose(guided, unguided)
    # guidance raises log p(y | x) of the samples
    with torch.no_grad():
        lp = lambda x: log_p_y_given_x(clf(x), batch["label"]).mean()  # noqa: E731
        assert lp(guided) > lp(unguided)


def test_x0_hat_is_the_tweedie_estimate_on_a_nonlinear_classifier(ddpm_scheduler):
    # x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDPM eq. 15). A classifier whose
    # gradient depends on where it is evaluated (tanh features, then NLL) makes the direction taken at
    # x0_hat differ from one taken at any other point (a linear classifier would hide a wrong x0_hat).
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, K)).double()
    clf.num_classes = K
    x_t, y, t = _x(2, seed=5), torch.tensor([0, 3]), torch.tensor(300)
    ab = ddpm_scheduler.alphas_cumprod[300].double()
    eps_theta = 0.7 * x_t + 0.1  # a stand-in denoiser with a closed-form Jacobian (0.7 I)
    model_fn = lambda x, t: 0.7 * x + 0.1  # noqa: E731
    x0_hat = (x_t - (1 - ab).sqrt() * eps_theta) / ab.sqrt()
    g = _direction(NegLogLikelihood(clf), x0_hat, y).reshape(x_t.shape)
    detached = ClassifierGuidance(NegLogLikelihood(clf), scale=2.0, input="x0_hat_detached")
    torch.testing.assert_close(detached(model_fn, {"label": y}, ddpm_scheduler)(x_t, t),
                               eps_theta - 2.0 * (1 - ab).sqrt() * g)
    # through the denoiser: d x0_hat / d x_t = (1 - 0.7 sqrt(1 - alpha_bar)) / sqrt(alpha_bar) (a scalar here)
    jac = (1 - 0.7 * (1 - ab).sqrt()) / ab.sqrt()
    through = ClassifierGuidance(NegLogLikelihood(clf), scale=2.0, input="x0_hat")
    torch.testing.assert_close(through(model_fn, {"label": y}, ddpm_scheduler)(x_t, t),
                               eps_theta - 2.0 * (1 - ab).sqrt() * jac * g)


@pytest.mark.parametrize("start", [0.2, 0.5])
def test_guidance_switches_on_exactly_at_the_start_fraction(ddpm_scheduler, start):
    # progress p = 1 - t / T (T = 1000): guidance is off while p < start, on from p = start on.
    clf, x, y = LinearClassifier(), _x(2), torch.tensor([0, 1])
    eps_theta = torch.randn_like(x)
    model_fn = lambda x_t, t: eps_theta  # noqa: E731
    guided = ClassifierGuidance(NegLogLikelihood(clf), start_fraction=start)(model_fn, {"label": y}, ddpm_scheduler)
    first_on = round(1000 * (1 - start))  # the largest t with 1 - t/T >= start
    assert torch.equal(guided(x, torch.tensor(first_on + 1)), eps_theta)
    assert not torch.equal(guided(x, torch.tensor(first_on)), eps_theta)
