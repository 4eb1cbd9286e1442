"""Proximal operators against brute-force minimisers of their 1-D problems; the l0 + box projection."""

import itertools

import pytest
import torch

from equidiff.attacks.proximal import penalty, project_l0_box, prox, prox_box, sparsity_exponent
from equidiff.errors import ConfigError

STEP = 1e-4
GRID = torch.arange(-80000, 80001, dtype=torch.float64) * STEP  # [-8, 8], exact 0 included
EXPONENTS = [0.0, 0.5, 2 / 3, 1.0]
LAMBDAS = [0.05, 0.4, 1.5]
VALUES = torch.linspace(-5, 5, 81, dtype=torch.float64)


def objective(z, v, lam, p):
    return 0.5 * (z - v) ** 2 + penalty(z, lam, p)


def brute_force(v, lam, p, lo=-8.0, hi=8.0):
    """(argmin, min) of the 1-D problem on the grid (within [lo, hi])."""
    g = GRID[(GRID >= lo - 1e-12) & (GRID <= hi + 1e-12)]
    h = objective(g, v, lam, p)
    i = int(h.argmin())
    return g[i], h[i]


@pytest.mark.parametrize("p", EXPONENTS)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_prox_equals_the_brute_force_minimiser(p, lam):
    z = prox(VALUES, lam, p)
    for v, zv in zip(VALUES, z, strict=True):
        z_bf, h_bf = brute_force(v, lam, p)
        h = objective(zv, v, lam, p)
        assert h <= h_bf + 1e-9, (p, lam, v, zv, z_bf)  # at least as good as every grid point
        # the minimiser itself agrees up to the grid step, except at the threshold where 0 and z tie
        tie = abs(objective(torch.zeros(()), v, lam, p) - h) < 1e-6 and (zv == 0) != (z_bf == 0)
        assert tie or abs(zv - z_bf) <= STEP, (p, lam, v, zv, z_bf)


@pytest.mark.parametrize("p", EXPONENTS)
def test_prox_box_equals_the_brute_force_minimiser_in_the_interval(p):
    for (lo, hi), lam in itertools.product([(-0.4, 0.7), (-3.0, 0.2), (0.0, 1.0), (-0.05, 0.0)], [0.05, 1.0]):
        z = prox_box(VALUES, lam, p, lo, hi)
        assert (z >= lo).all() and (z <= hi).all()
        for v, zv in zip(VALUES, z, strict=True):
            _, h_bf = brute_force(v, lam, p, lo, hi)
            assert objective(zv, v, lam, p) <= h_bf + 1e-9, (p, lo, hi, lam, v, zv)


def test_prox_accepts_per_element_weights_and_names():
    v = torch.tensor([[1.0, -2.0], [0.3, 4.0]], dtype=torch.float64)
    lam = torch.tensor([[0.1], [2.0]], dtype=torch.float64)
    for name, p in [("l1/2", 0.5), ("l2/3", 2 / 3), ("l1", 1.0), ("l0", 0.0)]:
        rows = [prox(v[i:i + 1], lam[i].item(), p) for i in range(2)]
        assert torch.equal(prox(v, lam, name), torch.cat(rows))
    assert sparsity_exponent("1/2") == 0.5 and sparsity_exponent(0.66) == 2 / 3


def test_unknown_exponent_is_a_config_error():
    with pytest.raises(ConfigError, match="sparsity exponent"):
        prox(torch.ones(3), 0.1, 0.3)


def _brute_force_projection(v, m, lo, hi):
    """min ||z - v|| over z in the box with at most m non-zeros, by enumerating supports."""
    c = v.clamp(lo, hi)
    best = (v * v).sum()
    for k in range(1, m + 1):
        for support in itertools.combinations(range(len(v)), k):
            z = torch.zeros_like(v)
            z[list(support)] = c[list(support)]
            best = min(best, ((z - v) ** 2).sum())
    return best


def test_l0_projection_keeps_exactly_the_m_largest_changes_and_respects_the_box():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(20, 7, generator=gen, dtype=torch.float64) * 2
    lo, hi = -torch.rand(7, generator=gen, dtype=torch.float64), torch.rand(7, generator=gen, dtype=torch.float64) * 3
    for m in (1, 3, 7):
        z = project_l0_box(v, m, lo, hi)
        assert ((z >= lo) & (z <= hi)).all()
        assert ((z != 0).sum(1) == m).all()  # every coordinate saves distance here, so exactly m are kept
        kept = z != 0
        assert torch.equal(z[kept], v.clamp(lo, hi)[kept])  # kept coordinates are the clamped values
        gain = v * v - (v.clamp(lo, hi) - v) ** 2
        # the kept ones are the m coordinates that save the most squared distance
        assert (gain[kept].reshape(20, m).amin(1) >= gain.masked_fill(kept, -1).amax(1)).all()
        for i in range(0, 20, 5):
            assert ((z[i] - v[i]) ** 2).sum() <= _brute_force_projection(v[i], m, lo, hi) + 1e-12


def test_l0_projection_per_sample_budget_and_zero_gain():
    v = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.2, 0.1, -0.3, 0.0]], dtype=torch.float64)
    z = project_l0_box(v, torch.tensor([2, 4]), -1.0, 1.0)
    assert z[0].tolist() == [1.0, 0.0, 0.0, 1.0]  # the two largest changes, clamped to the box
    assert z[1].tolist() == [0.2, 0.1, -0.3, 0.0]  # a zero coordinate is not "kept"
    z = project_l0_box(v, 2, 0.0, 1.0)  # the box allows no negative change: those save nothing
    assert z[1].tolist() == [0.2, 0.1, 0.0, 0.0]


@pytest.mark.parametrize("m", [0, -2])
def test_l0_budget_below_one_is_a_config_error(m):
    with pytest.raises(ConfigError, match="l0 budget"):
        project_l0_box(torch.ones(2, 3), m, -1.0, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.5, 2 / 3])
def test_prox_jumps_where_the_brute_force_minimiser_does(p):
    """A dense sweep of v across the jump from 0 to a nonzero minimiser (between 0.6 and 1.0 for lam = 0.4 and
    every non-convex exponent): a threshold off by a fraction of a percent (e.g. 55^(1/3) for 54^(1/3) in the
    half-thresholding rule) leaves some v at 0 where the nonzero minimiser is clearly better."""
    lam = 0.4
    v = torch.arange(6000, 10001, dtype=torch.float64) * STEP  # [0.6, 1.0]
    grid = torch.arange(0, 12001, dtype=torch.float64) * STEP  # z in [0, 1.2] covers every minimiser for v > 0
    z = prox(v, lam, p)
    for chunk in range(0, len(v), 500):
        vc = v[chunk:chunk + 500]
        h_bf = objective(grid[None, :], vc[:, None], lam, p).min(dim=1).values
        h = objective(z[chunk:chunk + 500], vc, lam, p)
        assert (h <= h_bf + 1e-9).all(), (p, vc[h > h_bf + 1e-9][:3])
    assert (z == 0).any() and (z > 0).any()  # the sweep does cross the jump
