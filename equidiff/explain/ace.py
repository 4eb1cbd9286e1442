"""ACE: adversarial counterfactual visual explanations (Jeanneret, Simon & Jurie, CVPR 2023; seed 003).

ACE attacks the classifier composed with a diffusion filter, then keeps only the regions the attack
changed:

1. **Pre-explanation** (seed, Algorithm 1): n PGD iterations on
   L(x) = L_class(C(F_tau(x)); y) + lambda_d d(x, x_orig), where the filter F_tau noises x to step tau
   of the respaced chain and denoises it back with DDPM, with gradients through all tau steps.
2. **Post-processing** (seed, Algorithm 2): a mask m = sum_c |x - x_pe| / max, dilated with a d x d
   square (max filter) and thresholded at u; then RePaint-style inpainting from the noised
   pre-explanation that, at every step, takes everything outside the mask from the original noised
   to that step.

Conventions, from the public implementation (guillaumejs2403/ACE: ``main.py``,
``core/attacks_and_models.py``, ``core/utils.py``), where the seed's listing is ambiguous. The
defaults are the reference's; each equidiff variant is an explicit option:

* **tau** counts respaced steps from the clean end: "5 out of 50" is ``tau=5, num_steps=50`` (the
  reference's ``sampling_time_fraction * timestep_respacing``), i.e. the chain starts at respaced index
  ``num_steps - tau`` (``tau_start_index``).
* **Respacing** (``spacing="guided_diffusion"``): guided-diffusion's ``space_timesteps``, which the
  reference's ``SpacedDiffusion`` uses: "25" of 1000 steps keeps 0, 42, 83, ..., 999, so tau = 5 starts at
  t = 166 on ImageNet, 83 on CelebA-HQ (25 of 500) and 41 on CelebA (50 of 500).
  ``spacing="leading"`` is diffusers' (t = 160, 80, 40).
* **The DDPM steps** are guided-diffusion's ``p_mean_variance`` steps on the respaced chain: the posterior
  mean of the x0 prediction clipped to [-1, 1] (``clip_denoised=True``; False: unclipped), and, for a
  model that learns its variance (``UNetBackbone.learned_variance``, all of the reference's DDPMs), the
  interpolated log-variance of guided-diffusion (``learned_variance=True``; False, and models without
  one: the scheduler's fixed variance, the respaced posterior variance for ``fixed_small``). The last step
  (t = 0) adds no noise. See ``equidiff.diffusion.ddpm``.
* **PGD** (the reference's ``PGD`` class): x <- clip(Proj_eps(x - step sign(grad L))), in [0, 1] pixel
  units (``step_size=1/255``, ``epsilon=1`` = unbounded, images clipped to the valid range). The
  distance is taken on the attacked input, d(x, x_orig) (``distance_on="input"``, the reference);
  ``distance_on="filtered"`` takes d(F_tau(x), x_orig), the literal reading of Algorithm 1, line 14.
  l1: sum |x - x_orig|, l2: ||x - x_orig||_2 (not squared), both in [0, 1] units, as the reference's
  ``dist_l1`` / ``dist_l2``.
* **lambda_d is per sample.** Losses are per sample, summed just before ``autograd.grad``, so a sample's
  result does not depend on its batch-mates. The reference averages the class loss over the batch
  (``CrossEntropyLoss()``) but sums the distance, so its effective per-sample weight is its ``dist_l1``
  times its batch size B: equidiff's ``lambda_d`` = reference ``dist_l1`` x B (0.001 x 3 = 0.003 for its
  CelebA script, 0.001 for its batch-1 scripts); with that conversion the two agree at any batch size.
* **The pre-explanation** is the attacked input after n iterations (what the reference saves as
  ``pre-explanation`` and builds the mask from); the filtered image F_tau(x) of the last iteration is
  what Algorithm 2 regenerates inside the mask.
* **The mask** (regenerated region) is ``dilated >= u``: the reference keeps the original where
  ``dilated < u`` (seed, Algorithm 2, line 9 writes ``> u``; they differ only where dilated == u).
  After the last inpainting step the original is pasted back outside the mask (the reference does;
  Algorithm 2 ends one step before). An unchanged image gives an empty mask (the reference divides
  0 by 0 and regenerates everything).

Randomness is per sample: every noise (the eps of each outer iteration, each chain step, each
inpainting step) is drawn from the sample's own generator, so a sample's explanation depends on its
seed alone, not on its batch-mates. Each sample's draws come in the reference's order (per PGD
iteration: eps, then one z per step with t > 0; inpainting: eps of the pre-explanation, then per step
the original's eps and z), so at batch size 1 on CPU they are the reference's draws after
``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from equidiff.diffusion.chain import run_ddpm_steps
from equidiff.diffusion.ddpm import DDPMSteps, ddpm_scheduler
from equidiff.diffusion.schedulers import SPACINGS, alpha_bar, respaced_timesteps
from equidiff.errors import ConfigError
from equidiff.utils.precision import upcast
from equidiff.utils.rng import PerSampleNoise

DISTANCES = ("l1", "l2")
DISTANCE_ON = ("input", "filtered")


# ----------------------------------------------------------------------------- checks
def tau_start_index(num_steps: int, tau: int) -> int:
    """Respaced index where a tau-step chain starts: tau steps before x_0 of a ``num_steps`` chain."""
    if int(num_steps) < 1:
        raise ConfigError(f"ACE: num_steps (the respaced chain) must be >= 1, got {num_steps}")
    if not 1 <= int(tau) <= int(num_steps):
        raise ConfigError(f"ACE: tau={tau} is beyond the {num_steps}-step respaced chain; choose 1 <= tau <= "
                          f"{num_steps} (the seed uses 5 of 50 on CelebA, 5 of 25 on CelebA-HQ and ImageNet, "
                          f"5 of 100 on BDD100k)")
    return int(num_steps) - int(tau)


def check_mask_args(dilation: int, threshold: float) -> None:
    if not isinstance(dilation, int) or dilation < 1 or dilation % 2 == 0:
        raise ConfigError(f"ACE: the mask dilation must be an odd integer >= 1 (a centred d x d square; 1 = no "
                          f"dilation), got {dilation!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"ACE: the mask threshold u must be in [0, 1] (the mask is normalised by its maximum), "
                          f"got {threshold}")


def _check_batch(x: torch.Tensor, generators: Sequence[torch.Generator], what: str) -> None:
    if x.ndim != 4:
        raise ConfigError(f"ACE {what}: images must be NCHW in [-1, 1], got shape {tuple(x.shape)}")
    if len(generators) != x.shape[0]:
        raise ConfigError(f"ACE {what}: one generator per sample is needed ({x.shape[0]}), got {len(generators)}")


# ----------------------------------------------------------------------------- classifier side
def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """The classifier's decision: logit > 0 for a single-logit (binary) classifier, else the argmax."""
    return (logits[:, 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_class per sample: cross-entropy toward ``target`` (binary cross-entropy for a single logit), in fp32."""
    logits = upcast(logits)
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, target.long(), reduction="none")


def explanation_target(rule, source: torch.Tensor, label: torch.Tensor, *, num_classes: int | None = None,
                       misclassified_to_label: bool = True) -> torch.Tensor:
    """The class each explanation should reach.

    Args:
        rule: ``"flip"`` (binary: 1 - the classifier's class, the seed's CelebA/BDD setting), an int (one
            class for all, e.g. sorrel = 339), or a mapping label -> target (a dict, or a list indexed by
            label; e.g. ``{340: 339, 339: 340}`` for the zebra/sorrel pair in both directions).
        source: the classifier's class on the input (B,).
        label: the dataset label (B,), -1 where unknown.
        misclassified_to_label: where the classifier is wrong (label >= 0 and source != label), target the
            true label instead (the reference's ``main.py``).
    """
    if rule == "flip":
        if num_classes is not None and num_classes > 2:
            raise ConfigError(f"ACE: target 'flip' is for binary classifiers, this one has {num_classes} classes; "
                              "give a class (method.target=339) or a label -> target mapping")
        target = 1 - source
    elif isinstance(rule, int) and not isinstance(rule, bool):
        target = torch.full_like(source, int(rule))
    elif isinstance(rule, Mapping | Sequence) and not isinstance(rule, str):
        table = dict(rule) if isinstance(rule, Mapping) else dict(enumerate(rule))
        unknown = sorted({int(v) for v in label.tolist()} - {int(k) for k in table})
        if unknown:
            raise ConfigError(f"ACE: labels {unknown[:10]} have no target in method.target {table}; add them, or "
                              "restrict the data to the mapped classes")
        target = torch.tensor([int(table[int(v)]) for v in label.tolist()], dtype=source.dtype, device=source.device)
    else:
        raise ConfigError(f"ACE: unknown target rule {rule!r}; use 'flip', a class index, or a label -> target map")
    if num_classes is not None and ((target < 0) | (target >= max(num_classes, 2))).any():
        raise ConfigError(f"ACE: targets {sorted(set(target.tolist()))[:10]} are outside the classifier's "
                          f"{num_classes} classes")
    if misclassified_to_label:
        wrong = (label >= 0) & (source != label)
        target = torch.where(wrong, label.to(target.dtype), target)
    return target


def image_distance(x: torch.Tensor, x_orig: torch.Tensor, kind: str) -> torch.Tensor:
    """d(x, x_orig) per sample, in [0, 1] pixel units: l1 = sum |.|, l2 = ||.||_2."""
    diff = (x - x_orig).flatten(1) / 2
    if kind == "l1":
        return diff.abs().sum(1)
    if kind == "l2":
        return torch.linalg.vector_norm(diff, dim=1)
    raise ConfigError(f"ACE: unknown distance {kind!r}; choose one of {DISTANCES}")


# ----------------------------------------------------------------------------- the DDPM steps (both algorithms)
def filter_timesteps(scheduler, *, num_steps: int, tau: int, spacing: str = "guided_diffusion") -> torch.Tensor:
    """The tau training timesteps the filter and the inpainting visit, descending (the last is t_1 of the chain)."""
    start = tau_start_index(num_steps, tau)
    return respaced_timesteps(scheduler, num_steps, spacing)[start:]


def _ddpm_setup(backbone: nn.Module, learned_variance: bool, clip_denoised: bool):
    """(model function, scheduler overrides) of the DDPM steps: eps and v for a learned-variance backbone."""
    learned = bool(learned_variance) and bool(getattr(backbone, "learned_variance", False))
    model_fn = functools.partial(backbone, with_variance=True) if learned else backbone
    return model_fn, {"clip_sample": bool(clip_denoised)}


def _check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ConfigError(f"ACE: unknown timestep spacing {spacing!r}; choose one of {SPACINGS} ('guided_diffusion' "
                          "is the reference's)")


# ----------------------------------------------------------------------------- Algorithm 1
def draw_filter_noise(shape: Sequence[int], generators: Sequence[torch.Generator], timesteps: torch.Tensor, *,
                      device=None, dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The noises of one filter pass over ``timesteps`` (``filter_timesteps``), per sample: eps of line 5, then
    one z per DDPM step with t > 0 (line 10; None at t = 0, which adds no noise). One stream per sample
    (``equidiff.utils.rng.PerSampleNoise``), in this order."""
    ts = [int(t) for t in timesteps]
    noise = PerSampleNoise(shape, generators, 1 + sum(t > 0 for t in ts), device=device, dtype=dtype)
    return noise.next(), [noise.next() if t > 0 else None for t in ts]


def diffusion_filter(backbone: nn.Module, x: torch.Tensor, *, num_steps: int, tau: int, eps: torch.Tensor,
                     noises: Sequence[torch.Tensor | None], checkpoint: bool = True, spacing: str = "guided_diffusion",
                     clip_denoised: bool = True, learned_variance: bool = True,
                     steps: DDPMSteps | None = None) -> torch.Tensor:
    """F_tau(x): noise x to step tau (Algorithm 1, line 6) and denoise it with DDPM (lines 7-13), differentiably.

    The reference's ``JointClassifierDDPM``: q_sample to the respaced step tau, then guided-diffusion's
    ``p_mean_variance`` steps (module docstring) with the pre-drawn ``noises``; with ``checkpoint=True``
    each step is recomputed on backward (memory flat in tau). ``steps``: the chain's ``DDPMSteps`` when the caller
    built them once (``pre_explanation`` does; else they are built here).
    """
    timesteps = filter_timesteps(backbone.scheduler, num_steps=num_steps, tau=tau, spacing=spacing)
    model_fn, overrides = _ddpm_setup(backbone, learned_variance, clip_denoised)
    if steps is None:
        steps = DDPMSteps.build(ddpm_scheduler(backbone.scheduler, timesteps, overrides=overrides), device=x.device)
    # 6. x' = sqrt(alpha_bar_tau) x + sqrt(1 - alpha_bar_tau) eps (alpha_bar a host scalar: no copy to the device)
    ab = alpha_bar(backbone.scheduler, int(timesteps[0]))
    x_tau = ab.sqrt() * x + (1 - ab).sqrt() * eps
    # 8-13. ts = tau - 1 ... 0: x' = mu(x', ts) + Sigma(x', ts) z
    return run_ddpm_steps(model_fn, x_tau, steps, noises, checkpoint=checkpoint)


def pgd_update(x: torch.Tensor, grad: torch.Tensor, x_orig: torch.Tensor, *, step_size: float,
               epsilon: float) -> torch.Tensor:
    """One L_inf PGD step in [-1, 1] images with ``step_size`` / ``epsilon`` in [0, 1] pixel units."""
    x = x - 2 * step_size * grad.sign()
    x = torch.minimum(torch.maximum(x, x_orig - 2 * epsilon), x_orig + 2 * epsilon)
    return x.clamp(-1, 1)


def pre_explanation(backbone: nn.Module, classifier: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                    generators: Sequence[torch.Generator], num_steps: int, tau: int, iterations: int = 50,
                    step_size: float = 1 / 255, epsilon: float = 1.0, distance: str = "l1", lambda_d: float = 1e-3,
                    distance_on: str = "input", checkpoint: bool = True, spacing: str = "guided_diffusion",
                    clip_denoised: bool = True, learned_variance: bool = True,
                    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                    ) -> torch.Tensor:
    """Algorithm 1: ``iterations`` PGD steps on L_class(C(F_tau(x)); target) + lambda_d d(x, x_orig).

    ``x``: images in [-1, 1]; ``target``: the class to reach (B,). ``lambda_d`` is per sample (module
    docstring). Returns the attacked input after the last iteration, the pre-explanation.
    ``callback(n, x, x_filtered, loss)`` sees every iteration.
    """
    _check_batch(x, generators, "pre-explanation")
    _check_spacing(spacing)
    if distance_on not in DISTANCE_ON:
        raise ConfigError(f"ACE: distance_on must be one of {DISTANCE_ON}, got {distance_on!r}")
    timesteps = filter_timesteps(backbone.scheduler, num_steps=num_steps, tau=tau, spacing=spacing).tolist()
    _, overrides = _ddpm_setup(backbone, learned_variance, clip_denoised)
    # the filter's steps, built once for all iterations (no host work or copy per iteration)
    steps = DDPMSteps.build(ddpm_scheduler(backbone.scheduler, timesteps, overrides=overrides), device=x.device)
    x_orig = x.detach()  # 3.
    x_adv = x_orig.clone()
    for n in range(int(iterations)):  # 4.
        # 5, 10. this iteration's noises, from each sample's generator
        eps, noises = draw_filter_noise(x.shape[1:], generators, timesteps, device=x.device, dtype=x.dtype)
        with torch.enable_grad():
            x_var = x_adv.detach().requires_grad_(True)
            # 6-13. the filtered image x' = F_tau(x), with the graph through all tau steps
            x_filtered = diffusion_filter(backbone, x_var, num_steps=num_steps, tau=tau, eps=eps, noises=noises,
                                          checkpoint=checkpoint, spacing=spacing, clip_denoised=clip_denoised,
                                          learned_variance=learned_variance, steps=steps)
            # 14. L_class(x'; y) + lambda_d d(., x_orig), one value per sample, summed just before grad
            loss = classification_loss(classifier(x_filtered), target)
            if lambda_d:
                loss = loss + lambda_d * image_distance(x_filtered if distance_on == "filtered" else x_var, x_orig,
                                                        distance)
            (grad,) = torch.autograd.grad(loss.sum(), x_var)
        # 15. x <- PGD(x, g)
        x_adv = pgd_update(x_adv, grad, x_orig, step_size=step_size, epsilon=epsilon)
        if callback is not None:
            callback(n, x_adv, x_filtered.detach(), loss.detach())
    return x_adv.detach()


# ----------------------------------------------------------------------------- Algorithm 2
def ace_mask(x: torch.Tensor, x_pe: torch.Tensor, *, dilation: int = 15,
             threshold: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2, lines 7-9: (m, dilated m, binary mask of the region to regenerate), each (B, 1, H, W).

    m = sum_c |x - x_pe| / max (per sample; an unchanged image gives m = 0), dilated with a
    ``dilation`` x ``dilation`` max filter (stride 1, same size), binary = dilated >= ``threshold`` (the
    reference keeps the original where dilated < u).
    """
    check_mask_args(dilation, threshold)
    # 7. m = sum_over_channels(|x - x'|)
    m = (x - x_pe).abs().sum(dim=1, keepdim=True)
    # 8. m = m / max(m)
    peak = m.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    m = m / peak.clamp_min(torch.finfo(m.dtype).tiny)
    # 9. dilation(m, size=d) >= u (an unchanged image: nothing to regenerate)
    dilated = F.max_pool2d(m, dilation, stride=1, padding=dilation // 2)
    return m, dilated, (dilated >= threshold) & (peak > 0)


def repaint(backbone: nn.Module, x: torch.Tensor, x_pe: torch.Tensor, mask: torch.Tensor, *,
            generators: Sequence[torch.Generator], num_steps: int, tau: int, paste_original: bool = True,
            spacing: str = "guided_diffusion", clip_denoised: bool = True, learned_variance: bool = True,
            callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Algorithm 2, lines 3-5 and 10-18: regenerate the masked region of ``x_pe``, keep the rest of ``x``.

    The reference's ``filter_fn``: from x' = noise(x_pe, tau), each step first sets x' = m x' + (1 - m)
    noise(x, ts) (the original noised to the current step with fresh noise, RePaint), then takes one DDPM
    step (the same steps as the filter, module docstring). ``callback(i, ts, x_composited, x_ts_original)``
    sees each step's composite. Returns the counterfactual in [-1, 1].
    """
    _check_batch(x, generators, "post-processing")
    _check_spacing(spacing)
    timesteps = filter_timesteps(backbone.scheduler, num_steps=num_steps, tau=tau, spacing=spacing)
    model_fn, overrides = _ddpm_setup(backbone, learned_variance, clip_denoised)
    steps = DDPMSteps.build(ddpm_scheduler(backbone.scheduler, timesteps, overrides=overrides), device=x.device)
    ts = [int(t) for t in timesteps]
    m = mask.to(x.dtype)
    # each sample's noises, one stream in the reference's order: eps of line 4, then per step the original's eps
    # (line 12) and z (line 16, none at t = 0)
    noise = PerSampleNoise(x.shape[1:], generators, 1 + len(ts) + sum(t > 0 for t in ts), device=x.device,
                           dtype=x.dtype, transient=True)
    # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) of q(x_t | x_0) on the host, once
    sq = [(alpha_bar(backbone.scheduler, t).sqrt(), (1 - alpha_bar(backbone.scheduler, t)).sqrt()) for t in ts]

    def noised(image, i):  # q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        return sq[i][0] * image + sq[i][1] * noise.next()

    # 3-4. x' = sqrt(alpha_bar_tau) x' + sqrt(1 - alpha_bar_tau) eps
    x_t = noised(x_pe, 0)
    for i in range(len(steps)):  # 10. ts = tau - 1 ... 0
        t = steps.timesteps[i]
        # 11-12. x_ts = sqrt(alpha_bar_ts) x + sqrt(1 - alpha_bar_ts) eps
        x_ts = noised(x, i)
        # 13. x' = m x' + (1 - m) x_ts
        x_t = m * x_t + (1 - m) * x_ts
        if callback is not None:
            callback(i, t, x_t, x_ts)
        # 14-16. x' = mu(x', ts) + Sigma(x', ts) z (no noise at t = 0)
        z = noise.next() if ts[i] > 0 else None
        x_t, _ = steps.step(i, model_fn(x_t, t), x_t, z)
    if paste_original:
        x_t = m * x_t + (1 - m) * x
    return x_t.clamp(-1, 1)


# ----------------------------------------------------------------------------- the two steps, configured
@dataclass(frozen=True)
class PreExplanation:
    """Algorithm 1 with its settings (defaults: the reference's ``main.py`` and CelebA-HQ / ImageNet scripts).

    ``step_size`` and ``epsilon`` are in [0, 1] pixel units (1/255 and 1 = unbounded in the reference);
    ``lambda_d`` is per sample: the reference's ``dist_l1`` times its batch size (module docstring).
    ``spacing``, ``clip_denoised``, ``learned_variance``: the DDPM steps (module docstring; the defaults
    are the reference's, ``"leading"`` / False / False the earlier equidiff variant).
    """

    num_steps: int = 50
    tau: int = 5
    iterations: int = 50
    step_size: float = 1 / 255
    epsilon: float = 1.0
    distance: str = "l1"
    lambda_d: float = 1e-3
    distance_on: str = "input"
    checkpoint: bool = True
    spacing: str = "guided_diffusion"
    clip_denoised: bool = True
    learned_variance: bool = True

    def __post_init__(self):
        tau_start_index(self.num_steps, self.tau)
        _check_spacing(self.spacing)
        if self.distance not in DISTANCES:
            raise ConfigError(f"ACE: unknown distance {self.distance!r}; choose one of {DISTANCES}")
        if self.distance_on not in DISTANCE_ON:
            raise ConfigError(f"ACE: distance_on must be one of {DISTANCE_ON}, got {self.distance_on!r}")
        if self.iterations < 0 or self.step_size <= 0 or self.epsilon <= 0 or self.lambda_d < 0:
            raise ConfigError(f"ACE: need iterations >= 0, step_size > 0, epsilon > 0 and lambda_d >= 0; got "
                              f"{self.iterations}, {self.step_size}, {self.epsilon}, {self.lambda_d}")

    @property
    def chain(self) -> dict:
        """The DDPM chain settings Algorithm 2 must share."""
        return {"num_steps": self.num_steps, "tau": self.tau, "spacing": self.spacing,
                "clip_denoised": self.clip_denoised, "learned_variance": self.learned_variance}

    def __call__(self, backbone, classifier, x, target, *, generators, callback=None) -> torch.Tensor:
        return pre_explanation(backbone, classifier, x, target, generators=generators, iterations=self.iterations,
                               step_size=self.step_size, epsilon=self.epsilon, distance=self.distance,
                               lambda_d=self.lambda_d, distance_on=self.distance_on, checkpoint=self.checkpoint,
                               callback=callback, **self.chain)


@dataclass(frozen=True)
class PostProcessing:
    """Algorithm 2 with its settings: mask (dilation d = 15, threshold u) and RePaint inpainting over tau steps,
    with the same DDPM chain settings as ``PreExplanation``."""

    num_steps: int = 50
    tau: int = 5
    dilation: int = 15
    threshold: float = 0.15
    paste_original: bool = True
    spacing: str = "guided_diffusion"
    clip_denoised: bool = True
    learned_variance: bool = True

    def __post_init__(self):
        tau_start_index(self.num_steps, self.tau)
        _check_spacing(self.spacing)
        check_mask_args(self.dilation, self.threshold)

    @property
    def chain(self) -> dict:
        return {"num_steps": self.num_steps, "tau": self.tau, "spacing": self.spacing,
                "clip_denoised": self.clip_denoised, "learned_variance": self.learned_variance}

    def __call__(self, backbone, x, x_pe, *, generators, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(binary mask (B, 1, H, W), counterfactual)."""
        _, _, mask = ace_mask(x, x_pe, dilation=self.dilation, threshold=self.threshold)
        ce = repaint(backbone, x, x_pe, mask, generators=generators, paste_original=self.paste_original,
                     callback=callback, **self.chain)
        return mask, ce
