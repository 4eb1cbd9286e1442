"""ACE's algorithm pieces (equidiff.explain.ace) on tiny random models: mask, inpainting, gradients, bad input."""

import pytest
import torch
from diffusers import DDPMScheduler

from equidiff.diffusion import chain_timesteps
from equidiff.errors import ConfigError
from equidiff.explain.ace import (
    PostProcessing,
    PreExplanation,
    ace_mask,
    classification_loss,
    diffusion_filter,
    draw_filter_noise,
    explanation_target,
    filter_timesteps,
    image_distance,
    pgd_update,
    pre_explanation,
    predicted_class,
    repaint,
    tau_start_index,
)
from equidiff.utils.rng import generators_for
from tests.ace.common import FixedLogits, digits_like, tiny_backbone, tiny_classifier


# ----------------------------------------------------------------------------- the mask (Algorithm 2, lines 7-9)
def _hand_made_pair():
    """x = 0; x_pe differs at (0,0) by 0.5 (channel 1), at (1,1) by 0.5 and -0.5, at (2,3) by 0.25 (channel 0)."""
    x = torch.zeros(1, 2, 4, 4)
    pe = x.clone()
    pe[0, 1, 0, 0] = 0.5
    pe[0, 0, 1, 1], pe[0, 1, 1, 1] = 0.5, -0.5
    pe[0, 0, 2, 3] = -0.25
    return x, pe


def test_the_mask_equals_the_formula_on_a_hand_made_pair():
    x, pe = _hand_made_pair()
    m, dilated, binary = ace_mask(x, pe, dilation=1, threshold=0.3)
    # m = sum_c |x - x'| / max = [0.5, 1.0, 0.25] / 1.0 at the three pixels
    expected = torch.tensor([[0.5, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0.25], [0, 0, 0, 0]])
    torch.testing.assert_close(m[0, 0], expected)
    torch.testing.assert_close(dilated, m)  # d = 1: no dilation
    assert binary.dtype == torch.bool and binary.shape == (1, 1, 4, 4)
    assert binary[0, 0].nonzero().tolist() == [[0, 0], [1, 1]]  # > 0.3
    # the same in the [0, 1] image range (the reference's): the normalisation removes the scale
    torch.testing.assert_close(ace_mask((x + 1) / 2, (pe + 1) / 2, dilation=1, threshold=0.3)[0], m)


def test_dilation_is_a_square_max_filter_and_the_threshold_is_inclusive():
    x, pe = _hand_made_pair()
    _, dilated, binary = ace_mask(x, pe, dilation=3, threshold=0.25)
    expected = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0.25], [1, 1, 1, 0.25], [0, 0, 0.25, 0.25]])
    torch.testing.assert_close(dilated[0, 0], expected)
    # the reference keeps the original where dilated < u: pixels exactly at the threshold are regenerated
    torch.testing.assert_close(binary[0, 0].float(), (expected >= 0.25).float())
    assert binary[0, 0, 3, 3] and not binary[0, 0, 3, 0]
    assert ace_mask(x, pe, dilation=3, threshold=0.3)[2].sum() == (expected >= 0.3).sum() == 9
    # u = 1 keeps the dilated maximum only; u = 0 regenerates the whole image (the reference keeps nothing)
    assert ace_mask(x, pe, dilation=3, threshold=1.0)[2].sum() == 9
    assert ace_mask(x, pe, dilation=3, threshold=0.0)[2].all()


def test_dilation_of_one_pixel_covers_a_d_by_d_square_clipped_at_the_border():
    x = torch.zeros(2, 3, 9, 9)
    pe = x.clone()
    pe[0, :, 4, 4] = 1.0  # centre
    pe[1, 2, 0, 8] = -0.3  # corner
    _, dilated, _ = ace_mask(x, pe, dilation=5, threshold=0.5)
    centre = torch.zeros(9, 9)
    centre[2:7, 2:7] = 1
    torch.testing.assert_close(dilated[0, 0], centre)
    corner = torch.zeros(9, 9)
    corner[0:3, 6:9] = 1
    torch.testing.assert_close(dilated[1, 0], corner)


def test_an_unchanged_image_gives_an_empty_mask():
    x = digits_like(2)
    m, dilated, binary = ace_mask(x, x.clone(), dilation=3, threshold=0.0)
    assert torch.isfinite(m).all() and not m.any() and not binary.any()


@pytest.mark.parametrize("dilation, threshold, match", [
    (4, 0.15, "odd integer"), (0, 0.15, "odd integer"), (15, -0.1, r"in \[0, 1\]"), (15, 1.5, r"in \[0, 1\]")])
def test_bad_mask_settings_are_refused(dilation, threshold, match):
    x = digits_like(1)
    with pytest.raises(ConfigError, match=match):
        ace_mask(x, x, dilation=dilation, threshold=threshold)
    with pytest.raises(ConfigError, match=match):
        PostProcessing(num_steps=10, tau=2, dilation=dilation, threshold=threshold)


# ----------------------------------------------------------------------------- tau and the chain
def test_tau_counts_respaced_steps_from_the_clean_end():
    assert tau_start_index(50, 5) == 45
    assert tau_start_index(25, 25) == 0
    # guided-diffusion's space_timesteps (the reference's): k * (T - 1) / (N - 1) rounded half to even
    # 25 of 1000: stride 999/24 = 41.625 -> 41.625, 83.25, 124.875, 166.5 -> 42, 83, 125, 166 (ImageNet)
    # 25 of 500: stride 499/24 = 20.79 -> 21, 42, 62, 83 (CelebA-HQ); 50 of 500: 499/49 = 10.18 -> 10, 20, 31, 41
    # (CelebA); 100 of 1000: 999/99 = 10.09 -> 10, 20, 30, 40 (BDD100k); 50 of 1000: 999/49 = 20.39 -> 20, 41, 61, 82
    expected = {(1000, 25): [166, 125, 83, 42, 0], (500, 25): [83, 62, 42, 21, 0], (500, 50): [41, 31, 20, 10, 0],
                (1000, 100): [40, 30, 20, 10, 0], (1000, 50): [82, 61, 41, 20, 0]}
    for (steps, n), ts in expected.items():
        sched = DDPMScheduler(num_train_timesteps=steps)
        assert filter_timesteps(sched, num_steps=n, tau=5).tolist() == ts, (steps, n)
    # diffusers' leading spacing, the explicit variant: t = 0, T/N, 2T/N, ...
    sched = DDPMScheduler(num_train_timesteps=1000)
    assert filter_timesteps(sched, num_steps=25, tau=5, spacing="leading").tolist() == [160, 120, 80, 40, 0]
    assert chain_timesteps(sched, 50)[tau_start_index(50, 5):].tolist() == [80, 60, 40, 20, 0]
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        PreExplanation(num_steps=25, tau=5, spacing="uniform")


@pytest.mark.parametrize("tau", [0, 11, -1])
def test_tau_beyond_the_chain_is_refused(tau):
    with pytest.raises(ConfigError, match="beyond the 10-step respaced chain"):
        PreExplanation(num_steps=10, tau=tau)
    with pytest.raises(ConfigError, match="beyond the 10-step"):
        PostProcessing(num_steps=10, tau=tau)
    with pytest.raises(ConfigError, match="beyond"):
        pre_explanation(tiny_backbone(), tiny_classifier(), digits_like(1), torch.tensor([1]),
                        generators=generators_for([0]), num_steps=10, tau=tau, iterations=1)


# ----------------------------------------------------------------------------- gradients through the tau steps
def test_gradients_reach_x_through_the_tau_step_chain():
    backbone = tiny_backbone(clip_sample=False).double()
    classifier = tiny_classifier().double()
    x = digits_like(2).double()
    target = torch.tensor([3, 7])
    timesteps = filter_timesteps(backbone.scheduler, num_steps=10, tau=3)
    eps, noises = draw_filter_noise(x.shape[1:], generators_for([5, 6]), timesteps, dtype=torch.float64)
    assert [z is None for z in noises] == [False, False, True]  # no noise at t = 0

    def loss(inp, checkpoint=True):
        out = diffusion_filter(backbone, inp, num_steps=10, tau=3, eps=eps, noises=noises, checkpoint=checkpoint)
        return classification_loss(classifier(out), target).sum()

    grads = {}
    for ckpt in (True, False):
        xv = x.clone().requires_grad_(True)
        (grads[ckpt],) = torch.autograd.grad(loss(xv, ckpt), xv)
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-10, atol=1e-12)
    # the gradient is the derivative of the whole composition C(F_tau(x)): central finite differences
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    torch.testing.assert_close((grads[True] * v).sum(), fd, rtol=1e-5, atol=1e-8)


def test_the_distance_term_has_the_reference_units():
    x, x0 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 1.0, -0.5  # [0, 1] differences 0.5 and 0.25
    torch.testing.assert_close(image_distance(x, x0, "l1"), torch.tensor([0.75]))
    torch.testing.assert_close(image_distance(x, x0, "l2"), torch.tensor([(0.5**2 + 0.25**2) ** 0.5]))
    with pytest.raises(ConfigError, match="unknown distance"):
        image_distance(x, x0, "l3")


def test_a_pgd_update_is_a_signed_step_projected_and_clipped():
    x0 = torch.tensor([[[[0.0, 0.99, -0.5, 0.2]]]])
    g = torch.tensor([[[[1.0, -2.0, 0.0, -1e-9]]]])
    out = pgd_update(x0, g, x0, step_size=0.01, epsilon=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[-0.02, 1.0, -0.5, 0.22]]]]))  # clip at 1, sign(0) = 0
    far = pgd_update(x0 + 0.5, -g.abs() - 1, x0, step_size=0.1, epsilon=0.1)  # L_inf ball of 0.1 ([0, 1] units)
    assert ((far - x0).abs() <= 0.2 + 1e-6).all()


def test_pre_explanation_moves_toward_the_target():
    # class k scores (k - 4.5) * mean pixel: reaching class 9 means brightening the image through the filter
    backbone, classifier = tiny_backbone(), FixedLogits()
    x = digits_like(2) * 0.5 - 0.3
    target = torch.tensor([9, 9])
    losses = []
    pe = pre_explanation(backbone, classifier, x, target, generators=generators_for([0, 1]), num_steps=10, tau=2,
                         iterations=4, step_size=4 / 255, lambda_d=0.0,
                         callback=lambda n, xa, xf, loss: losses.append(loss))
    assert pe.shape == x.shape and pe.min() >= -1 and pe.max() <= 1
    assert (pe - x).abs().amax() <= 4 * 2 * 4 / 255 + 1e-6  # at most n signed steps
    assert (pe.mean((1, 2, 3)) > x.mean((1, 2, 3)) + 0.05).all()
    assert len(losses) == 4 and (losses[-1] < losses[0]).all(), losses


# ----------------------------------------------------------------------------- the inpainting (Algorithm 2)
def test_outside_the_mask_the_output_equals_the_noised_original_at_each_inpainting_step():
    backbone = tiny_backbone()
    x, pe = digits_like(2, seed=1), digits_like(2, seed=2)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 2:5, 3:6] = True
    mask[1, :, 0:8, 0:2] = True
    seeds, num_steps, tau = [11, 12], 10, 4
    steps = []
    ts = filter_timesteps(backbone.scheduler, num_steps=num_steps, tau=tau)
    # guided-diffusion's space_timesteps(1000, "10"): stride 999/9 = 111 -> 333, 222, 111, 0
    assert ts.tolist() == [333, 222, 111, 0]

    class Probe(torch.nn.Module):  # the backbone, recording what each step returns
        def __init__(self):
            super().__init__()
            self.scheduler = backbone.scheduler

        def forward(self, x_t, t):
            return backbone(x_t, t)

    def callback(i, t, composite, x_ts):
        steps.append((int(t), composite.clone(), x_ts.clone()))

    out = repaint(Probe(), x, pe, mask, generators=generators_for(seeds), num_steps=num_steps, tau=tau,
                  callback=callback)
    # the same draws, in the same order, from fresh generators: eps of line 4, then per step (x_ts eps, z);
    # the step is diffusers' DDPMScheduler on the respaced timesteps, x0 clipped, drawing z from the generators
    gens = generators_for(seeds)
    draw = lambda: torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])  # noqa: E731
    ab = backbone.scheduler.alphas_cumprod
    prev = ab[ts[0]].sqrt() * pe + (1 - ab[ts[0]]).sqrt() * draw()
    sched = DDPMScheduler.from_config(backbone.scheduler.config, clip_sample=True)
    sched.set_timesteps(timesteps=ts.tolist())
    assert [t for t, _, _ in steps] == ts.tolist()
    m = mask.expand_as(x)
    for t, composite, x_ts in steps:
        noised_original = ab[t].sqrt() * x + (1 - ab[t]).sqrt() * draw()
        torch.testing.assert_close(x_ts, noised_original)
        assert torch.equal(composite[~m], x_ts[~m])  # 13. outside the mask: the noised original, exactly
        assert torch.equal(composite[m], prev[m])  # inside: the chain's own sample
        prev = sched.step(backbone(composite, t), t, composite, generator=gens).prev_sample
    assert torch.equal(out[~m], x[~m])  # the original pasted back after the last step
    torch.testing.assert_close(out[m], prev.clamp(-1, 1)[m])


def test_post_processing_of_an_unchanged_image_returns_the_image():
    x = digits_like(2)
    mask, ce = PostProcessing(num_steps=10, tau=3, dilation=3)(tiny_backbone(), x, x.clone(),
                                                               generators=generators_for([0, 1]))
    assert not mask.any() and torch.equal(ce, x)


# ----------------------------------------------------------------------------- targets
def test_explanation_targets():
    source, label = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, -1])
    # flip: 1 - the classifier's class; a misclassified input targets its label (here also the flip)
    assert explanation_target("flip", source, label, num_classes=1).tolist() == [1, 0, 0, 1]
    assert explanation_target(7, source, label, misclassified_to_label=False).tolist() == [7, 7, 7, 7]
    assert explanation_target(7, source, label).tolist() == [7, 7, 0, 7]  # sample 2 is misclassified
    src, lab = torch.tensor([340, 339, 5]), torch.tensor([340, 339, 340])
    assert explanation_target({340: 339, 339: 340}, src, lab).tolist() == [339, 340, 340]
    assert explanation_target([1, 0], torch.tensor([0, 1]), torch.tensor([0, 1])).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="no target"):
        explanation_target({340: 339}, src, lab)
    with pytest.raises(ConfigError, match="binary"):
        explanation_target("flip", source, label, num_classes=10)
    with pytest.raises(ConfigError, match="outside the classifier's 10 classes"):
        explanation_target(12, source, label, num_classes=10)
    with pytest.raises(ConfigError, match="unknown target rule"):
        explanation_target("runner_up", source, label)


def test_binary_classifiers_have_one_logit():
    logits = torch.tensor([[2.0], [-1.0]])
    assert predicted_class(logits).tolist() == [1, 0]
    torch.testing.assert_close(classification_loss(logits, torch.tensor([0, 0])),
                               torch.nn.functional.softplus(logits[:, 0]))
