"""One conversion between model images and stored images, used everywhere.

Model images live in [-1, 1] (diffusion convention). Stored images are uint8, rounded the
way EDM and torchvision's ``save_image`` round (``x * 127.5 + 128`` then floor, i.e. round
half up), so that metrics fed in memory equal metrics recomputed from the PNG files.
"""

from __future__ import annotations

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW (rounded, clamped)."""
    return (x.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> [-1, 1] float NCHW (exact inverse of ``to_uint8`` on its image)."""
    return x.float() / 127.5 - 1.0
