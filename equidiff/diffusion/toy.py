"""A small diffusion model for low-dimensional points (the 2D concentric circles of seed 000, Fig. 3.1).

``PointDenoiser`` is a diffusers ``ModelMixin`` (so ``save_pretrained`` / ``from_pretrained`` work): an MLP
on (x_t, sinusoidal embedding of t) predicting eps. ``PointBackbone`` puts it behind the model-function
protocol; ``load_point_diffusion`` reads the folder ``DDPMTraining.save_pretrained`` writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.errors import ConfigError


class PointDenoiser(ModelMixin, ConfigMixin):
    """eps_theta(x_t, t) for points in R^dim: an MLP with SiLU on [x_t, emb(t)]."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 4, time_embed_dim: int = 32):
        super().__init__()
        layers, d = [], dim + time_embed_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = get_timestep_embedding(t, self.config.time_embed_dim, flip_sin_to_cos=True).to(x_t.dtype)
        return self.mlp(torch.cat([x_t, emb], dim=-1))


class PointBackbone(DiffusionBackbone):
    """A ``PointDenoiser`` and its scheduler behind the model-function protocol (eps = backbone(x_t, t))."""

    def __init__(self, denoiser: PointDenoiser, scheduler):
        super().__init__(scheduler)
        self.denoiser = denoiser.eval().requires_grad_(False)

    @property
    def sample_shape(self):
        return (self.denoiser.config.dim,)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.denoiser(x_t, t)


def load_point_diffusion(path: str) -> PointBackbone:
    """Load ``denoiser/`` and ``scheduler/`` from a folder written by ``DDPMTraining.save_pretrained``."""
    p = Path(path)
    if not (p / "denoiser" / "config.json").exists():
        raise ConfigError(f"no point diffusion model in {str(p)!r} (expected denoiser/ and scheduler/); train one "
                          "with `equidiff fit experiment=invariant/circles_ddpm`")
    return PointBackbone(PointDenoiser.from_pretrained(p / "denoiser"), DDPMScheduler.from_pretrained(p / "scheduler"))
