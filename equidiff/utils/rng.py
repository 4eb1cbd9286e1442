"""Randomness per sample seed (the EDM ``StackedRandomGenerator`` idea), drawn in blocks.

Every sample owns one ``torch.Generator`` seeded with its own integer seed, so the noise that sample ``i`` sees
depends on its seed alone: not on its batch-mates, the batch size, the rank it landed on or the number of
processes.

How the draws are made, and why they cost no more than one batched draw:

* A sample's noises form one stream from its generator, in the order the algorithm uses them (x_T, then the
  step noises of the chain in step order; ACE documents its own order). ``randn_per_sample`` draws one tensor
  per sample (x_T); ``PerSampleNoise`` draws the chain's step noises.
* ``PerSampleNoise`` draws a sample's next ``k`` noises with one call, ``randn((k, *shape), generator=g)``, in
  blocks of ``k = block_steps(shape)`` = max(1, 2**16 // numel) noises (256 KiB of fp32 per sample), and never
  more noises than the chain uses (``total``). A batch of B samples pays B calls per block instead of B calls
  per step (at batch 256 the per-call overhead was most of the per-step draw), and the block size bounds the
  memory a long chain takes (1000 DDPM steps at batch 500 would need 6 GB drawn at once).
* The numbers do not depend on how a stream is cut into blocks for the default CPU generators when a sample
  has a multiple of 16 values (every image and latent shape: 1x8x8, 3x32x32, 4x32x32, 3x256x256, ...):
  torch's CPU normal sampler fills 16-value blocks from the uniform stream, so one draw of k x N values equals
  k draws of N values (``tests/utils/test_rng.py`` checks it). The samples are then the same as with one
  draw per step, and equal to diffusers' pipelines given the same generators. For other sizes (2-D points)
  the block size is part of the definition (still a function of the seed and the shape alone).
* CPU generators (the default of ``generators_for``) give the same numbers on every machine. When the model
  runs on CUDA, each block is drawn into pinned host memory and copied with ``non_blocking=True``: no host
  sync, and the host draws the next block while the device computes. Generators made on a CUDA device
  (``generators_for(seeds, device="cuda")``) draw on the device with no host work, but their numbers are not
  the CPU generators' (a sample then depends on its seed and the device type).
* Noise is drawn in float32 (float64 if asked) and cast to the sampler's dtype on the device, so a bf16 run
  sees the fp32 run's noise, rounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK_ELEMENTS = 1 << 16  # fp32 values per sample per block: 256 KiB


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


def block_steps(shape: Sequence[int]) -> int:
    """How many noises of ``shape`` a sample draws per call (module docstring): max(1, 2**16 // numel)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return max(1, BLOCK_ELEMENTS // max(numel, 1))


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _draw(shape: Sequence[int], generators: Sequence[torch.Generator], count: int, device, dtype,
          reuse: torch.Tensor | None = None) -> torch.Tensor:
    """[B, count, *shape]: each sample's next ``count`` standard normals from its generator, one call per sample
    (into ``reuse[:, :count]`` when given: a host buffer of an earlier block, for a host target)."""
    if len(generators) == 0:
        raise ValueError("per-sample noise needs at least one generator")
    gen_device = generators[0].device
    if any(g.device != gen_device for g in generators):
        devices = sorted({str(g.device) for g in generators})
        raise ValueError(f"the per-sample generators live on several devices ({devices}); make them all on one "
                         "(generators_for(seeds, device=...))")
    target = torch.device(device) if device is not None else gen_device
    draw_dtype = _draw_dtype(dtype)
    # pinned host memory for an asynchronous copy to a CUDA device (no host sync; the caching host allocator keeps the
    # block alive until the copy has run)
    pin = gen_device.type == "cpu" and target.type == "cuda" and torch.cuda.is_available()
    if reuse is not None and target == gen_device and reuse.shape[1] >= count and reuse.dtype == draw_dtype:
        buf = reuse[:, :count]
    else:
        buf = torch.empty((len(generators), count, *shape), dtype=draw_dtype, device=gen_device, pin_memory=pin)
    for i, g in enumerate(generators):
        torch.randn((count, *shape), generator=g, dtype=draw_dtype, device=gen_device, out=buf[i])
    if target != gen_device:
        buf = buf.to(target, non_blocking=True)
    return buf if buf.dtype == dtype else buf.to(dtype)


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
    return _draw(tuple(shape), generators, 1, device, dtype)[:, 0]


class PerSampleNoise:
    """The next ``total`` standard-normal draws of ``shape`` of every sample, from its own generator, in blocks.

    ``next()`` returns the next draw of every sample, ``[B, *shape]`` on ``device`` in ``dtype``. Blocks of
    ``block_steps(shape)`` draws are made as they are needed (module docstring), so a chain's loop pays one
    call per sample per block, and the host draws a block while the device computes the previous steps.

    ``transient=True`` (the samplers, which use each draw at once): a draw is valid until the next block is drawn,
    and on the CPU the blocks reuse one buffer (a fresh 66 MB block per 21 steps at batch 256 cost 1.6 ms a step
    in page faults, measured; on CUDA the pinned host blocks come from torch's caching host allocator anyway).
    """

    def __init__(self, shape: Sequence[int], generators: Sequence[torch.Generator], total: int, *,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 transient: bool = False):
        if len(generators) == 0:
            raise ValueError("per-sample noise needs at least one generator")
        if total < 0:
            raise ValueError(f"the number of draws must be >= 0, got {total}")
        self.shape, self.generators, self.total = tuple(shape), list(generators), int(total)
        self.device, self.dtype, self.transient = device, dtype, bool(transient)
        self.block = block_steps(self.shape)
        self._taken = 0
        self._buf: torch.Tensor | None = None
        self._pos = 0

    @property
    def remaining(self) -> int:
        return self.total - self._taken

    def next(self) -> torch.Tensor:
        if self._taken >= self.total:
            raise RuntimeError(f"all {self.total} noise draws of this stream are used")
        if self._buf is None or self._pos == self._buf.shape[1]:
            reuse = self._buf if self.transient else None
            self._buf = _draw(self.shape, self.generators, min(self.block, self.remaining), self.device, self.dtype,
                              reuse=reuse)
            self._pos = 0
        z = self._buf[:, self._pos]
        self._pos += 1
        self._taken += 1
        return z

    def take(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` draws, as a list."""
        return [self.next() for _ in range(n)]
