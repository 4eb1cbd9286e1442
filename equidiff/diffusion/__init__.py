"""Diffusion backbones (one model-function protocol) and samplers over diffusers schedulers."""

from equidiff.diffusion.backbones import (
    DiffusionBackbone,
    LatentDiTBackbone,
    UNetBackbone,
    load_dit,
    load_unet,
)
from equidiff.diffusion.chain import chain_timesteps, ddim_chain, ddpm_chain, draw_chain_noise, noise_to_step
from equidiff.diffusion.ddim import sample_ddim
from equidiff.diffusion.ddpm import ddpm_scheduler, ddpm_step, draw_ddpm_noise, sample_ddpm
from equidiff.diffusion.flow import FlowMatchScheduler, flow_chain, flow_step, sample_flow, shifted_time_grid
from equidiff.diffusion.lightningdit import LightningDiTBackbone, load_lightningdit
from equidiff.diffusion.schedulers import SPACINGS, alpha_bar, fresh_scheduler, respaced_timesteps, space_timesteps

__all__ = [
    "DiffusionBackbone",
    "FlowMatchScheduler",
    "LatentDiTBackbone",
    "LightningDiTBackbone",
    "SPACINGS",
    "UNetBackbone",
    "alpha_bar",
    "chain_timesteps",
    "ddim_chain",
    "ddpm_chain",
    "ddpm_scheduler",
    "ddpm_step",
    "draw_chain_noise",
    "draw_ddpm_noise",
    "flow_chain",
    "flow_step",
    "fresh_scheduler",
    "load_dit",
    "load_lightningdit",
    "load_unet",
    "noise_to_step",
    "respaced_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sample_flow",
    "shifted_time_grid",
    "space_timesteps",
]
