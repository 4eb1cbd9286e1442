"""Randomness per sample seed (the EDM ``StackedRandomGenerator`` idea).

Every sample owns one ``torch.Generator`` seeded with its own integer seed, so the noise
that sample ``i`` sees depends on its seed alone: not on its batch-mates, the batch size,
the rank it landed on or the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generators_for(seeds: Sequence[int] | torch.Tensor, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample seed.

    CPU generators are the default: they give the same numbers on every machine (diffusers'
    "reusing seeds" advice), and the draws are moved to the model's device afterwards.
    """
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.reshape(-1).tolist()
    gens = []
    for s in seeds:
        s = int(s)
        if s < 0:
            raise ValueError(f"sample seeds must be non-negative integers, got {s}")
        gens.append(torch.Generator(device=device).manual_seed(s % (1 << 63)))
    return gens


def randn_per_sample(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``len(generators)`` standard-normal tensors of ``shape`` (one per sample), stacked.

    ``shape`` is the per-sample shape (C, H, W). The draws equal diffusers' ``randn_tensor``
    with a generator list, which draws each sample with its own generator in turn.
    """
    if len(generators) == 0:
        raise ValueError("randn_per_sample needs at least one generator")
    draws = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    out = torch.stack(draws)
    return out if device is None else out.to(device)
