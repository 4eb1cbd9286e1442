"""Per-sample noise drawn in blocks (equidiff.utils.rng): the documented stream, its independence of batch-mates,
and the torch property that makes it equal to one draw per step for image shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from equidiff.utils.rng import BLOCK_ELEMENTS, PerSampleNoise, block_steps, generators_for, randn_per_sample


def _per_step(seed: int, shape, n: int) -> torch.Tensor:
    """n draws of ``shape`` from a fresh generator, one call per draw (the former scheme, and diffusers')."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=g) for _ in range(n)])


def _stream(seeds, shape, n: int, **kw) -> torch.Tensor:
    """[n, B, *shape]: n draws of a PerSampleNoise stream."""
    noise = PerSampleNoise(shape, generators_for(seeds), n, **kw)
    return torch.stack([noise.next() for _ in range(n)])


@pytest.mark.parametrize("shape", [(16,), (1, 8, 8), (3, 32, 32), (4, 4, 4)])
def test_torch_draws_multiples_of_16_values_in_16_value_blocks(shape):
    # the property the docstring relies on: one draw of k x N values equals k draws of N values (N % 16 == 0)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(torch.randn((7, *shape), generator=g), _per_step(5, shape, 7))


def test_and_not_otherwise():  # why the block size is part of the definition for other sizes
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(torch.randn((9, 3), generator=g), _per_step(5, (3,), 9))


@pytest.mark.parametrize("shape, n", [((1, 8, 8), 30), ((3, 32, 32), 50)])
def test_image_streams_are_the_per_step_draws(shape, n):
    if shape == (3, 32, 32):
        assert block_steps(shape) == BLOCK_ELEMENTS // 3072 == 21  # three blocks: 21, 21, 8
    out = _stream([3, 11], shape, n)
    for b, seed in enumerate([3, 11]):
        assert torch.equal(out[:, b], _per_step(seed, shape, n))


def test_other_shapes_follow_the_block_rule():
    shape, n = (5, 7, 11), 400  # 385 values: blocks of 2^16 // 385 = 170 draws: 170, 170, 60
    assert block_steps(shape) == 170
    g = torch.Generator().manual_seed(4)
    expected = torch.cat([torch.randn((k, *shape), generator=g) for k in (170, 170, 60)])
    assert torch.equal(_stream([4], shape, n)[:, 0], expected)


def test_a_stream_draws_exactly_its_total():
    noise = PerSampleNoise((1, 8, 8), gens := generators_for([9]), 3)
    noise.take(3)
    with pytest.raises(RuntimeError, match="all 3 noise draws"):
        noise.next()
    after = torch.randn(4, generator=gens[0])  # the generator went on exactly 3 x 64 values
    g = torch.Generator().manual_seed(9)
    torch.randn(3 * 64, generator=g)
    assert torch.equal(after, torch.randn(4, generator=g))


def test_a_samples_noise_does_not_depend_on_its_batch_mates():
    batch = _stream([1, 2, 3], (2,), 40)
    alone = torch.cat([_stream([s], (2,), 40) for s in (1, 2, 3)], dim=1)
    assert torch.equal(batch, alone)
    assert not torch.equal(batch[:, 0], batch[:, 1])


def test_low_precision_noise_is_the_fp32_noise_rounded():
    fp32 = _stream([7], (1, 8, 8), 5)
    assert torch.equal(_stream([7], (1, 8, 8), 5, dtype=torch.bfloat16), fp32.bfloat16())
    assert torch.equal(randn_per_sample((1, 8, 8), generators_for([7]), dtype=torch.bfloat16),
                       randn_per_sample((1, 8, 8), generators_for([7])).bfloat16())


def test_generators_on_several_devices_are_refused():
    gens = [torch.Generator(), SimpleNamespace(device=torch.device("cuda", 0))]  # (no CUDA generator here)
    with pytest.raises(ValueError, match="several devices"):
        randn_per_sample((2,), gens)


def test_a_transient_stream_draws_the_same_numbers_into_one_buffer():
    shape, n = (3, 32, 32), 50  # blocks of 21, 21, 8
    kept = _stream([3, 11], shape, n)
    noise = PerSampleNoise(shape, generators_for([3, 11]), n, transient=True)
    draws = [noise.next() for _ in range(n)]
    assert draws[0].data_ptr() == draws[21].data_ptr() == draws[42].data_ptr()  # one buffer, reused
    noise = PerSampleNoise(shape, generators_for([3, 11]), n, transient=True)
    for i in range(n):
        assert torch.equal(noise.next(), kept[i])  # each draw, read before the next block
