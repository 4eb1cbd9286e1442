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
``core/attacks_and_models.py``, ``core/utils.py``), where the seed's listing is ambiguous:

* **tau** counts respaced steps from the clean end: "5 out of 50" is ``tau=5, num_steps=50``, i.e.
  the chain starts at respaced index ``num_steps - tau`` (``tau_start_index``).
* **The DDPM filter** is the respaced DDIM chain at eta = 1, which is DDPM ancestral sampling on the
  respaced schedule with the posterior variance (tested equal to diffusers' ``DDPMScheduler``). The
  reference's guided-diffusion models learn their variance; equidiff backbones predict eps only.
* **PGD** (the reference's ``PGD`` class): x <- clip(Proj_eps(x - step sign(grad L))), in [0, 1] pixel
  units (``step_size=1/255``, ``epsilon=1`` = unbounded, images clipped to the valid range). The
  distance is taken on the attacked input, d(x, x_orig) (``distance_on="input"``, the reference);
  ``distance_on="filtered"`` takes d(F_tau(x), x_orig), the literal reading of Algorithm 1, line 14.
  l1: sum |x - x_orig|, l2: ||x - x_orig||_2 (not squared), both in [0, 1] units, as the reference's
  ``dist_l1`` / ``dist_l2``.
* **Per-sample losses, summed** just before ``autograd.grad``; the reference averages the class loss
  over the batch (``CrossEntropyLoss()``) but sums the distance, so its balance depends on the batch
  size; here a sample's result does not (equal to the reference at batch size 1).
* **The pre-explanation** is the attacked input after n iterations (what the reference saves as
  ``pre-explanation`` and builds the mask from); the filtered image F_tau(x) of the last iteration is
  what Algorithm 2 regenerates inside the mask.
* **The mask** is ``dilated > u`` (seed, Algorithm 2, line 9; the reference keeps ``dilated < u`` from
  the original, which differs only where dilated == u). After the last inpainting step the original
  is pasted back outside the mask (the reference does; Algorithm 2 ends one step before).

Randomness is per sample: every noise (the eps of each outer iteration, each chain step, each
inpainting step) is drawn from the sample's own generator, so a sample's explanation depends on its
seed alone, not on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from equidiff.diffusion.chain import ddim_chain, draw_chain_noise, noise_to_step
from equidiff.diffusion.schedulers import alpha_bar, fresh_scheduler
from equidiff.errors import ConfigError
from equidiff.utils.rng import randn_per_sample

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
    """L_class per sample: cross-entropy toward ``target`` (binary cross-entropy for a single logit)."""
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


# ----------------------------------------------------------------------------- Algorithm 1
def draw_filter_noise(shape: Sequence[int], generators: Sequence[torch.Generator], *, num_steps: int, tau: int,
                      device=None, dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The noises of one filter pass, per sample: eps of line 5, then one z per DDPM step (line 10)."""
    eps = randn_per_sample(shape, generators, device=device, dtype=dtype)
    noises = draw_chain_noise(shape, generators, num_steps, start_index=tau_start_index(num_steps, tau),
                              device=device, dtype=dtype)
    return eps, noises


def diffusion_filter(backbone: nn.Module, x: torch.Tensor, *, num_steps: int, tau: int, eps: torch.Tensor,
                     noises: Sequence[torch.Tensor], checkpoint: bool = True) -> torch.Tensor:
    """F_tau(x): noise x to step tau (Algorithm 1, line 6) and denoise it with DDPM (lines 7-13), differentiably.

    The DDPM steps are the respaced DDIM chain at eta = 1 with the pre-drawn ``noises``; with
    ``checkpoint=True`` each step is recomputed on backward (memory flat in tau).
    """
    start = tau_start_index(num_steps, tau)
    # 6. x' = sqrt(alpha_bar_tau) x + sqrt(1 - alpha_bar_tau) eps
    x_tau, _ = noise_to_step(x, backbone.scheduler, num_steps=num_steps, start_index=start, noise=eps)
    # 8-13. ts = tau - 1 ... 0: x' = mu(x', ts) + Sigma(x', ts) z
    return ddim_chain(backbone, x_tau, backbone.scheduler, num_steps=num_steps, start_index=start, eta=1.0,
                      noises=noises, checkpoint=checkpoint)


def pgd_update(x: torch.Tensor, grad: torch.Tensor, x_orig: torch.Tensor, *, step_size: float,
               epsilon: float) -> torch.Tensor:
    """One L_inf PGD step in [-1, 1] images with ``step_size`` / ``epsilon`` in [0, 1] pixel units."""
    x = x - 2 * step_size * grad.sign()
    x = torch.minimum(torch.maximum(x, x_orig - 2 * epsilon), x_orig + 2 * epsilon)
    return x.clamp(-1, 1)


def pre_explanation(backbone: nn.Module, classifier: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                    generators: Sequence[torch.Generator], num_steps: int, tau: int, iterations: int = 50,
                    step_size: float = 1 / 255, epsilon: float = 1.0, distance: str = "l1", lambda_d: float = 1e-3,
                    distance_on: str = "input", checkpoint: bool = True,
                    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                    ) -> torch.Tensor:
    """Algorithm 1: ``iterations`` PGD steps on L_class(C(F_tau(x)); target) + lambda_d d(x, x_orig).

    ``x``: images in [-1, 1]; ``target``: the class to reach (B,). Returns the attacked input after the
    last iteration, the pre-explanation. ``callback(n, x, x_filtered, loss)`` sees every iteration.
    """
    _check_batch(x, generators, "pre-explanation")
    if distance_on not in DISTANCE_ON:
        raise ConfigError(f"ACE: distance_on must be one of {DISTANCE_ON}, got {distance_on!r}")
    x_orig = x.detach()  # 3.
    x_adv = x_orig.clone()
    for n in range(int(iterations)):  # 4.
        # 5, 10. this iteration's noises, from each sample's generator
        eps, noises = draw_filter_noise(x.shape[1:], generators, num_steps=num_steps, tau=tau,
                                        device=x.device, dtype=x.dtype)
        with torch.enable_grad():
            x_var = x_adv.detach().requires_grad_(True)
            # 6-13. the filtered image x' = F_tau(x), with the graph through all tau steps
            x_filtered = diffusion_filter(backbone, x_var, num_steps=num_steps, tau=tau, eps=eps, noises=noises,
                                          checkpoint=checkpoint)
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
    """Algorithm 2, lines 7-9: (m, dilated m, binary mask), each (B, 1, H, W).

    m = sum_c |x - x_pe| / max (per sample; an unchanged image gives m = 0), dilated with a
    ``dilation`` x ``dilation`` max filter (stride 1, same size), binary = dilated > ``threshold``.
    """
    check_mask_args(dilation, threshold)
    # 7. m = sum_over_channels(|x - x'|)
    m = (x - x_pe).abs().sum(dim=1, keepdim=True)
    # 8. m = m / max(m)
    peak = m.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    m = m / peak.clamp_min(torch.finfo(m.dtype).tiny)
    # 9. dilation(m, size=d) > u
    dilated = F.max_pool2d(m, dilation, stride=1, padding=dilation // 2)
    return m, dilated, dilated > threshold


def repaint(backbone: nn.Module, x: torch.Tensor, x_pe: torch.Tensor, mask: torch.Tensor, *,
            generators: Sequence[torch.Generator], num_steps: int, tau: int, paste_original: bool = True,
            callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Algorithm 2, lines 3-5 and 10-18: regenerate the masked region of ``x_pe``, keep the rest of ``x``.

    From x' = noise(x_pe, tau), each step first sets x' = m x' + (1 - m) noise(x, ts) (the original noised
    to the current step with fresh noise, RePaint), then takes one DDPM step (DDIM, eta = 1) over a fresh
    diffusers scheduler. ``callback(i, ts, x_composited, x_ts_original)`` sees each step's composite.
    Returns the counterfactual in [-1, 1].
    """
    _check_batch(x, generators, "post-processing")
    start = tau_start_index(num_steps, tau)
    sched = fresh_scheduler(backbone.scheduler, DDIMScheduler)
    sched.set_timesteps(num_steps, device=x.device)
    timesteps = sched.timesteps[start:]
    m = mask.to(x.dtype)
    shape = x.shape[1:]

    def noised(image, t):  # q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        ab = alpha_bar(backbone.scheduler, t).to(device=x.device, dtype=x.dtype)
        return ab.sqrt() * image + (1 - ab).sqrt() * randn_per_sample(shape, generators, device=x.device,
                                                                       dtype=x.dtype)

    # 3-4. x' = sqrt(alpha_bar_tau) x' + sqrt(1 - alpha_bar_tau) eps
    x_t = noised(x_pe, timesteps[0])
    for i, t in enumerate(timesteps):  # 10. ts = tau - 1 ... 0
        # 11-12. x_ts = sqrt(alpha_bar_ts) x + sqrt(1 - alpha_bar_ts) eps
        x_ts = noised(x, t)
        # 13. x' = m x' + (1 - m) x_ts
        x_t = m * x_t + (1 - m) * x_ts
        if callback is not None:
            callback(i, t, x_t, x_ts)
        # 14-16. x' = mu(x', ts) + Sigma(x', ts) z
        z = randn_per_sample(shape, generators, device=x.device, dtype=x.dtype)
        x_t = sched.step(backbone(x_t, t), t, x_t, eta=1.0, variance_noise=z).prev_sample
    if paste_original:
        x_t = m * x_t + (1 - m) * x
    return x_t.clamp(-1, 1)


# ----------------------------------------------------------------------------- the two steps, configured
@dataclass(frozen=True)
class PreExplanation:
    """Algorithm 1 with its settings (defaults: the reference's ``main.py`` and CelebA script).

    ``step_size`` and ``epsilon`` are in [0, 1] pixel units (1/255 and 1 = unbounded in the reference);
    ``lambda_d`` 0.001 with ``distance="l1"``, 0.1 with ``"l2"`` (seed, section A).
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

    def __post_init__(self):
        tau_start_index(self.num_steps, self.tau)
        if self.distance not in DISTANCES:
            raise ConfigError(f"ACE: unknown distance {self.distance!r}; choose one of {DISTANCES}")
        if self.distance_on not in DISTANCE_ON:
            raise ConfigError(f"ACE: distance_on must be one of {DISTANCE_ON}, got {self.distance_on!r}")
        if self.iterations < 0 or self.step_size <= 0 or self.epsilon <= 0 or self.lambda_d < 0:
            raise ConfigError(f"ACE: need iterations >= 0, step_size > 0, epsilon > 0 and lambda_d >= 0; got "
                              f"{self.iterations}, {self.step_size}, {self.epsilon}, {self.lambda_d}")

    def __call__(self, backbone, classifier, x, target, *, generators, callback=None) -> torch.Tensor:
        return pre_explanation(backbone, classifier, x, target, generators=generators, num_steps=self.num_steps,
                               tau=self.tau, iterations=self.iterations, step_size=self.step_size,
                               epsilon=self.epsilon, distance=self.distance, lambda_d=self.lambda_d,
                               distance_on=self.distance_on, checkpoint=self.checkpoint, callback=callback)


@dataclass(frozen=True)
class PostProcessing:
    """Algorithm 2 with its settings: mask (dilation d = 15, threshold u) and RePaint inpainting over tau steps."""

    num_steps: int = 50
    tau: int = 5
    dilation: int = 15
    threshold: float = 0.15
    paste_original: bool = True

    def __post_init__(self):
        tau_start_index(self.num_steps, self.tau)
        check_mask_args(self.dilation, self.threshold)

    def __call__(self, backbone, x, x_pe, *, generators, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(binary mask (B, 1, H, W), counterfactual)."""
        _, _, mask = ace_mask(x, x_pe, dilation=self.dilation, threshold=self.threshold)
        ce = repaint(backbone, x, x_pe, mask, generators=generators, num_steps=self.num_steps, tau=self.tau,
                     paste_original=self.paste_original, callback=callback)
        return mask, ce
