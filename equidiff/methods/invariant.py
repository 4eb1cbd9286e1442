"""Invariant-set sampling, "EquiDiff" (seed 000): a thin LightningModule around Algorithm 1."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.diffusion.chain import ddim_chain, draw_chain_noise
from equidiff.diffusion.ddim import sample_ddim
from equidiff.diffusion.flow import flow_chain
from equidiff.errors import ConfigError
from equidiff.guidance.guided import ClassifierGuidance
from equidiff.invariant.algorithm import evaluate, invariant_optimize
from equidiff.invariant.filters import check_cutoffs, low_pass
from equidiff.invariant.objectives import as_vector
from equidiff.methods.common import require_grad_mode
from equidiff.utils.images import to_uint8, uint8_to_float
from equidiff.utils.precision import full_precision
from equidiff.utils.rng import generators_for, randn_per_sample


def clamp_straight_through(x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """x clamped to the image range [-1, 1] (and with ``quantize`` rounded to the 256 levels of the stored
    uint8 image) in the forward pass, with the identity's gradient.

    A plain clamp has zero gradient wherever the chain overshoots the range (most of the background of a
    digit), which stalls the optimisation of z_T. The forward value is exactly what is stored, so the loss
    that decides convergence (loss < tau) is the loss of the saved image.
    """
    stored = uint8_to_float(to_uint8(x)).to(x) if quantize else x.clamp(-1, 1)
    return x + (stored - x).detach()


class InvarianceLoss(nn.Module):
    """lambda (||L(x) - t||^2 + ||L(F(x)) - t||^2) as a guidance objective(x, targets) (the baseline)."""

    def __init__(self, objective: nn.Module, lam: float, low_pass: Callable | None):
        super().__init__()
        self.objective, self.lam, self.low_pass = objective, lam, low_pass

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return evaluate(self.objective, x, target, self.lam, self.low_pass)[0]


class InvariantSampler(L.LightningModule):
    """``predict_step``: (query, seed) -> z_T -> Algorithm 1 -> the sample closest to the invariant set.

    Args:
        backbone: a ``DiffusionBackbone`` (pixel UNet, latent DiT, or a point model for toy data).
        objective: L, ``objective(x) -> [B, m]`` (``equidiff.invariant.Logits``, ``Neuron``...).
        optimizer: ``optimizer(params)`` partial: SGD with momentum, ``pytorch_optimizer.Shampoo``, Adam.
        num_steps, eta: the deterministic DDIM chain (eta = 0; eta > 0 uses per-sample noise fixed across
            iterations); for a flow backbone the points of the ODE's time grid (num_steps - 1 steps, as the
            reference's ``num_sampling_steps``), eta must be 0.
        budget, tau, lam: B, the loss threshold tau and the loss weight lambda of Algorithm 1.
        low_pass: F (``equidiff.invariant.LowPass``) or None.
        renormalize: rescale z_T to its initial norm after every step (DiG-IN).
        cutoffs: low-pass cutoffs f_c of the frequency analysis (deviation |L(F_fc(x)) - t| per cutoff).
        class_label: the label for class-conditional backbones (DiT); None uses the null class
            (unconditional generation, C_t = empty set in Algorithm 1).
        mode: ``optimize`` (Algorithm 1) or ``guidance`` (the baseline: classifier guidance toward the
            same target through x0_hat with ``guidance_steps`` DDIM steps, by default B x num_steps capped at
            the training steps, about the same number of denoiser evaluations).
        checkpoint: per-step gradient checkpointing of the chain.
        chain: the differentiable chain, ``chain(model_fn, z, scheduler, *, num_steps, eta, noises, checkpoint)``
            (``ddim_chain``'s signature); None takes the backbone's own: the DDIM chain (deterministic with eta = 0,
            no clipping) for DDPM backbones, the Euler flow ODE (``flow_chain``) for flow backbones (LightningDiT).
    """

    def __init__(self, backbone: DiffusionBackbone, objective: nn.Module, optimizer: Callable, *,
                 num_steps: int = 50, eta: float = 0.0, budget: int = 100, tau: float = 1e-3, lam: float = 1.0,
                 low_pass: nn.Module | None = None, renormalize: bool = False,
                 cutoffs: Sequence[float] = (0.125, 0.25, 0.5, 1.0), class_label: int | None = None,
                 mode: str = "optimize", guidance_scale: float = 1.0, guidance_steps: int | None = None,
                 checkpoint: bool = True, quantize: bool = True, chain: Callable | None = None):
        super().__init__()
        if mode not in ("optimize", "guidance"):
            raise ConfigError(f"mode must be 'optimize' or 'guidance', got {mode!r}")
        self.is_flow = getattr(backbone, "is_flow", False)
        if self.is_flow and mode == "guidance":
            raise ConfigError("the guidance baseline (method.mode=guidance) guides DDIM through x0_hat and needs a "
                              "DDPM backbone; a flow backbone (LightningDiT) runs Algorithm 1 only (mode=optimize)")
        if self.is_flow and eta != 0:
            raise ConfigError(f"a flow backbone (LightningDiT) integrates a deterministic ODE: method.eta must be 0, "
                              f"got {eta}")
        self.chain = chain
        if budget < 1:
            raise ConfigError(f"the step budget B must be >= 1, got {budget}")
        self.backbone, self.objective, self.optimizer = backbone, objective, optimizer
        self.num_steps, self.eta, self.budget, self.tau, self.lam = num_steps, eta, budget, tau, lam
        self.low_pass, self.renormalize, self.cutoffs = low_pass, renormalize, check_cutoffs(cutoffs)
        self.class_label, self.mode, self.checkpoint = class_label, mode, checkpoint
        self.guidance_scale = guidance_scale
        T = None if self.is_flow else backbone.scheduler.config.num_train_timesteps
        self.guidance_steps = None if self.is_flow else min(T, guidance_steps or budget * num_steps)
        self.is_image = len(backbone.image_shape) == 3
        self.quantize = quantize and self.is_image

    # ----------------------------------------------------------------------------------- pieces
    def _model_fn(self, b: int):
        bb = self.backbone
        if bb.num_classes is None:
            return bb
        label = bb.num_classes if self.class_label is None else int(self.class_label)  # null class: unconditional
        return functools.partial(bb, class_labels=torch.full((b,), label, device=self.device, dtype=torch.long))

    def _generate(self, noises_all):
        """z -> x through the checkpointed chain (noise for eta > 0 fixed per sample) and the decoder."""

        def generate(z: torch.Tensor, active: list[int]) -> torch.Tensor:
            noises = None
            if noises_all is not None:  # the active samples' fixed noises (one index copy, then device gathers)
                idx = torch.tensor(active, dtype=torch.long).to(z.device)
                noises = [n.index_select(0, idx) for n in noises_all]
            chain = self.chain or (flow_chain if self.is_flow
                                   else functools.partial(ddim_chain, scheduler_overrides={"clip_sample": False}))
            z_0 = chain(self._model_fn(len(z)), z, self.backbone.scheduler, num_steps=self.num_steps, eta=self.eta,
                        noises=noises, checkpoint=self.checkpoint)
            x = self.backbone.decode(z_0)
            return clamp_straight_through(x, self.quantize) if self.is_image else x

        return generate

    def _target(self, batch: dict) -> torch.Tensor:
        if "target" in batch:
            return batch["target"].float()
        with torch.no_grad(), full_precision():  # the target in fp32 whatever the run's precision
            return as_vector(self.objective(batch["query"]), len(batch["query"])).float()  # line 2: t = L(x*)

    # ----------------------------------------------------------------------------------- Algorithm 1
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        require_grad_mode()
        target = self._target(batch)
        generators = generators_for(batch["seed"])
        z_T = randn_per_sample(self.backbone.sample_shape, generators, device=self.device)  # line 1
        noises = (draw_chain_noise(self.backbone.sample_shape, generators, self.num_steps, device=self.device)
                  if self.eta > 0 else None)
        if self.mode == "optimize":
            out = invariant_optimize(self._generate(noises), self.objective, z_T, target, optimizer=self.optimizer,
                                     budget=self.budget, tau=self.tau, lam=self.lam, low_pass=self.low_pass,
                                     renormalize=self.renormalize)
            x, iterations, converged = out["x"], out["iterations"], out["converged"]
        else:
            x = self._guided(z_T, target)
            iterations = torch.full((len(x),), self.budget, dtype=torch.long)
            converged = None
        if self.quantize:  # measure what is stored: the image rounded to uint8
            x = uint8_to_float(to_uint8(x)).to(x.device)
        return self._record(batch, x, target, iterations, converged)

    def _guided(self, z_T, target):
        loss = InvarianceLoss(self.objective, self.lam, self.low_pass)
        guidance = ClassifierGuidance(loss, scale=self.guidance_scale, input="x0_hat", label_key="target",
                                      schedule=None)
        model_fn = guidance(self._model_fn(len(z_T)), {"target": target}, self.backbone.scheduler)
        z_0 = sample_ddim(model_fn, z_T, self.backbone.scheduler, num_steps=self.guidance_steps, eta=0.0,
                          scheduler_overrides={"clip_sample": False})
        with torch.no_grad():
            x = self.backbone.decode(z_0)
        return x.clamp(-1, 1) if self.is_image else x

    def _record(self, batch, x, target, iterations, converged) -> dict:
        with torch.no_grad(), full_precision():  # recorded values in fp32 whatever the run's precision
            loss, values, filtered = evaluate(self.objective, x, target, self.lam, self.low_pass)
            err = (values - target).norm(dim=-1)
            err_f = (filtered - target).norm(dim=-1) if filtered is not None else err
            freq = torch.stack([(as_vector(self.objective(low_pass(x, c)), len(x)) - target).norm(dim=-1)
                                for c in self.cutoffs], dim=-1) if self.is_image else err[:, None]
        conv = converged.to(loss.device) if converged is not None else loss < self.tau
        rec = {"seed": batch["seed"], "index": batch["index"], "label": batch["label"],
               "query_index": batch["query_index"], "loss": loss, "invariance_error": err,
               "invariance_error_filtered": err_f, "freq_deviation": freq, "converged": conv.long(),
               "iterations": iterations.to(loss.device), "value": values, "target": target}
        if self.is_image:
            rec["image"] = x
            if "query" in batch:
                rec["query"] = to_uint8(batch["query"])
                with torch.no_grad(), full_precision():  # the query's deviation under F_fc: the reference
                    q = batch["query"]
                    rec["query_freq_deviation"] = torch.stack(
                        [(as_vector(self.objective(low_pass(q, c)), len(q)) - target).norm(dim=-1)
                         for c in self.cutoffs], dim=-1)
        else:
            rec["x"] = x
            if "query" in batch:
                rec["query"] = batch["query"]
        return rec
