"""Small pieces every method shares."""

from __future__ import annotations

import torch

from equidiff.errors import ConfigError


def require_grad_mode() -> None:
    """Fail loudly if predict runs under inference mode (gradients would be silently impossible)."""
    if torch.is_inference_mode_enabled():
        raise ConfigError("predict is running under torch.inference_mode, so guidance and optimisation cannot "
                          "take gradients; build the Trainer with inference_mode=False (equidiff's trainer "
                          "configs do: check trainer.inference_mode)")
