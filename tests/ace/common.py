"""Tiny models for the ACE tests: a random 8x8 DDPM backbone and small classifiers."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from equidiff.classifiers import Classifier, load_small_net
from equidiff.diffusion import UNetBackbone


def tiny_backbone(channels: int = 1, size: int = 8, seed: int = 0, clip_sample: bool = True) -> UNetBackbone:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )
    return UNetBackbone(unet, DDPMScheduler(num_train_timesteps=1000, clip_sample=clip_sample))


def tiny_classifier(num_classes: int = 10, seed: int = 1, channels: int = 1) -> Classifier:
    torch.manual_seed(seed)
    return load_small_net("cnn", in_channels=channels, num_classes=num_classes, width=8, image_size=8)


class FixedLogits(nn.Module):
    """A classifier whose logits are a fixed linear function of the mean pixel: class k scores (k - 4.5) * mean."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("slopes", torch.arange(num_classes, dtype=torch.float32) - (num_classes - 1) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1, keepdim=True) * self.slopes


def digits_like(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
