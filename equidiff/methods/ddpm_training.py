"""Training an unconditional DDPM (Ho et al. 2020, Algorithm 1) with diffusers parts."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.training_utils import EMAModel
from torchmetrics import MeanMetric

from equidiff.utils.rng import generators_for, randn_per_sample


class DDPMTraining(L.LightningModule):
    """eps-prediction training of a ``UNet2DModel`` with an EMA copy, exported via ``save_pretrained``.

    Args:
        unet: the diffusers model to train (built by Hydra): a ``UNet2DModel`` for images, or any
            ``ModelMixin`` with ``forward(x_t, t)`` (e.g. ``equidiff.diffusion.toy.PointDenoiser``).
        scheduler: the diffusers noise scheduler (DDPMScheduler) defining q(x_t | x_0).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra partial).
        lr_scheduler: optional ``lr_scheduler(optimizer) -> LRScheduler``, stepped every step.
        ema_decay, ema_power: diffusers ``EMAModel`` with warm-up (decay 1 - (1 + step)^-power,
            capped at ``ema_decay``), so short trainings get a useful average too.
        image_key: the batch entry holding images in [-1, 1].
    """

    def __init__(self, unet, scheduler, optimizer: Callable, lr_scheduler: Callable | None = None,
                 ema_decay: float = 0.9999, ema_power: float = 2 / 3, image_key: str = "image"):
        super().__init__()
        self.unet, self.scheduler = unet, scheduler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.image_key = image_key
        self.ema = EMAModel(self.unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=ema_power)
        self.val_loss = MeanMetric()  # sum-reduced: exact with unequal shards under DDP
        self.save_hyperparameters(ignore=["unet", "scheduler", "optimizer", "lr_scheduler"])

    def on_fit_start(self) -> None:
        # different diffusion noise on every process (the data shards differ too)
        torch.manual_seed(torch.initial_seed() + self.global_rank)
        self.ema.to(self.device)

    def _loss(self, x_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Algorithm 1, line 5: || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t) ||^2
        x_t = self.scheduler.add_noise(x_0, eps, t)
        out = self.unet(x_t, t)
        return F.mse_loss(getattr(out, "sample", out), eps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x_0 = batch[self.image_key]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x_0.shape[0],), device=self.device)
        loss = self._loss(x_0, torch.randn_like(x_0), t)
        self.log("train/loss", loss, prog_bar=True, batch_size=x_0.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows every optimizer step, inside it: a checkpoint written at the end of the batch (by a
        # callback's on_train_batch_end, which Lightning calls before the module's) then holds this step's EMA
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.unet.parameters())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # a fixed (per-sample seeded) noise and timestep, so the validation loss is comparable
        x_0 = batch[self.image_key]
        gens = generators_for(batch["seed"])
        eps = randn_per_sample(x_0.shape[1:], gens, device=self.device)
        t = torch.stack([torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=g)
                         for g in gens]).to(self.device)
        self.val_loss.update(self._loss(x_0, eps, t), weight=x_0.shape[0])
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=x_0.shape[0])

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.unet.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    # -- checkpoints carry the EMA weights
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # -- export
    def ema_unet(self):
        unet = copy.deepcopy(self.unet).to("cpu").eval()
        self.ema.copy_to(unet.parameters())
        return unet

    def save_pretrained(self, path: str) -> None:
        """Write the EMA weights: a ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/) for a UNet,
        else ``denoiser/`` + ``scheduler/`` (read by ``equidiff.diffusion.toy.load_point_diffusion``)."""
        if isinstance(self.unet, UNet2DModel):
            DDPMPipeline(unet=self.ema_unet(), scheduler=self.scheduler).save_pretrained(path)
        else:
            self.ema_unet().save_pretrained(f"{path}/denoiser")
            self.scheduler.save_pretrained(f"{path}/scheduler")
