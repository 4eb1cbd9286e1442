"""Counterfactual metrics: functional forms against independent computations (the GSE reference's patch
extraction, a DFS over 4-neighbours, scikit-learn's LOF), sum-reduced aggregates, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor

from equidiff.attacks.density import KDEDensity
from equidiff.errors import ConfigError
from equidiff.metrics.counterfactual import (
    AttackProtocol,
    CounterfactualSummary,
    DensityScore,
    LOFPlausibility,
    PerturbationMetrics,
    changed_patches,
    changed_pixels,
    connected_regions,
    l0_distance,
    l2_distance,
    perturbation_stats,
)


def _pair(seed=0, b=5, c=3, h=12, w=12, density=0.1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    mask = torch.rand(b, 1, h, w, generator=gen) < density
    delta = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * mask
    return x, x + delta


def _dfs_clusters(mask: np.ndarray) -> int:
    """Clusters of non-zero pixels over up/down/left/right neighbours (the GSE reference's countClusters)."""
    seen, n = np.zeros_like(mask, dtype=bool), 0
    for i, j in zip(*np.nonzero(mask), strict=True):
        if seen[i, j]:
            continue
        n += 1
        stack = [(i, j)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return n


def _reference_d20(delta: torch.Tensor, n: int) -> torch.Tensor:
    """d_{2,0} as in the GSE reference: all n x n patches (identity-kernel conv), count those with l2 != 0."""
    b, c = delta.shape[:2]
    kernel = torch.eye(n * n, dtype=delta.dtype).reshape(n * n, 1, n, n).repeat(c, 1, 1, 1)
    patches = F.conv2d(delta, kernel, groups=c).reshape(b, c, n * n, -1)
    return (patches.norm(dim=(1, 2)) != 0).sum(1).double()


def test_distances_and_pixel_counts():
    x, x_cf = _pair()
    delta = x_cf - x
    torch.testing.assert_close(l2_distance(x, x_cf), delta.flatten(1).norm(dim=1))
    torch.testing.assert_close(l0_distance(x, x_cf), (delta != 0).flatten(1).sum(1).double())
    torch.testing.assert_close(changed_pixels(x, x_cf), (delta.abs().mean(1) != 0).flatten(1).sum(1).double())


@pytest.mark.parametrize("n", [2, 8])
def test_changed_patches_equal_the_gse_reference(n):
    x, x_cf = _pair(density=0.03)
    torch.testing.assert_close(changed_patches(x, x_cf, n), _reference_d20(x_cf - x, n))


def test_connected_regions_equal_a_dfs_over_four_neighbours():
    for seed in range(4):
        x, x_cf = _pair(seed, density=0.25)
        masks = ((x_cf - x).abs().mean(1) != 0).numpy()
        assert connected_regions(x, x_cf).tolist() == [float(_dfs_clusters(m)) for m in masks]
    x = torch.zeros(1, 1, 4, 4)
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] = x_cf[0, 0, 1, 1] = 1.0  # diagonal neighbours are two regions
    assert connected_regions(x, x_cf).item() == 2


def test_changes_below_atol_do_not_count():
    x = torch.zeros(2, 1, 4, 4)
    x_cf = x + 1e-8
    stats = perturbation_stats(x, x_cf)
    assert stats["l0"].sum() == 0 and stats["acp"].sum() == 0 and stats["anc"].sum() == 0 and stats["d20"].sum() == 0


def test_summary_means_over_valid_and_all_and_is_sum_reduced():
    gen = torch.Generator().manual_seed(0)
    valid = (torch.rand(50, generator=gen) < 0.7).double()
    a, b = torch.rand(50, generator=gen), torch.rand(50, generator=gen)
    whole = CounterfactualSummary(["a", "b"])
    whole.update(valid, a, b)
    parts = [CounterfactualSummary(["a", "b"]) for _ in range(2)]  # two "processes"
    parts[0].update(valid[:20], a[:20], b[:20])
    parts[1].update(valid[20:], a[20:], b[20:])
    parts[0].merge_state(parts[1])
    for res in (whole.compute(), parts[0].compute()):
        torch.testing.assert_close(res["validity"], valid.mean())
        torch.testing.assert_close(res["a"], a.double()[valid.bool()].mean())
        torch.testing.assert_close(res["b_all"], b.double().mean())
    empty = CounterfactualSummary(["a"])
    empty.update(torch.zeros(3), torch.ones(3))
    assert torch.isnan(empty.compute()["a"])


def test_perturbation_metrics_from_pairs():
    x, x_cf = _pair()
    metric = PerturbationMetrics(images=True, patch_size=2)
    metric.update(x_cf, x)
    stats = perturbation_stats(x, x_cf, patch_size=2)
    out = metric.compute()
    for k in ("l2", "l0", "acp", "anc", "d20"):
        torch.testing.assert_close(out[k], stats[k].mean())
    with pytest.raises(ConfigError, match="images"):
        PerturbationMetrics(images=True).update(x_cf.flatten(1), x.flatten(1))


def test_lof_equals_scikit_learn_per_target_class():
    gen = torch.Generator().manual_seed(1)
    ref_x = torch.randn(120, 3, generator=gen, dtype=torch.float64)
    ref_y = torch.arange(120) % 2
    ref_x[ref_y == 1] += 3
    q = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    t = torch.arange(10) % 2
    metric = LOFPlausibility((ref_x, ref_y), n_neighbors=10)
    metric.update(q, t)
    expected = []
    for c in (0, 1):
        lof = LocalOutlierFactor(n_neighbors=10, novelty=True).fit(ref_x[ref_y == c].numpy())
        expected.append(-lof.score_samples(q[t == c].numpy()))
    expected = torch.tensor(np.concatenate(expected).mean(), dtype=torch.float64)
    torch.testing.assert_close(metric.compute()["lof"], expected)
    with pytest.raises(ConfigError, match="no LOF model"):
        metric.update(q[:1], torch.tensor([5]))


def test_density_score_is_the_mean_log_density():
    gen = torch.Generator().manual_seed(2)
    ref_x, ref_y = torch.randn(60, 2, generator=gen, dtype=torch.float64), torch.arange(60) % 3
    dens = KDEDensity(bandwidth=0.5).fit(ref_x, ref_y)
    q, t = torch.randn(7, 2, generator=gen, dtype=torch.float64), torch.arange(7) % 3
    metric = DensityScore(dens)
    metric.update(q, t, torch.tensor([1, 1, 1, 0, 0, 1, 1]))
    out = metric.compute()
    torch.testing.assert_close(out["log_density_all"], dens(q, t).mean())
    torch.testing.assert_close(out["log_density"], dens(q, t)[[0, 1, 2, 5, 6]].mean())


def test_pixel_metrics_need_images():
    with pytest.raises(ConfigError, match="images"):
        changed_pixels(torch.zeros(2, 5), torch.ones(2, 5))
    with pytest.raises(ConfigError, match="patch_size"):
        changed_patches(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 0)


def _protocol_example():
    """Four inputs (the last not attacked), three targets each, values ACP and l2 of what each attack returned."""
    attacked = torch.tensor([1.0, 1.0, 1.0, 0.0])
    valid = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    # input 0's failed attack returned a perturbation (as PGD would; GSE returns x, all 0)
    acp = torch.tensor([[4, 2, 6], [3, 5, 1], [0, 0, 0], [7, 7, 7]], dtype=torch.float64)
    l2 = torch.tensor([[1.0, 3.0, 2.0], [2.0, 0.5, 4.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    return attacked, valid, acp, l2


def test_attack_protocol_by_hand():
    m = AttackProtocol(["acp", "l2"], cases=["best", "average", "worst", "successful"])
    m.update(*_protocol_example())
    out = m.compute()
    expected = {  # worked out by hand; input 3 is not attacked and counts nowhere
        "inputs": 4, "attacked": 3,
        # best: inputs with a success (0, 1); each value minimised over that input's successful attacks on its own
        "best/asr": 2 / 3, "best/acp": (2 + 1) / 2, "best/l2": (1.0 + 0.5) / 2,
        # average: all 9 attacks, failed ones with the values of what they returned
        "average/asr": 5 / 9, "average/acp": 21 / 9, "average/l2": 12.5 / 9,
        # worst: inputs whose every attack succeeded (1); each value maximised over its attacks
        "worst/asr": 1 / 3, "worst/acp": 5.0, "worst/l2": 4.0,
        # successful: the 5 successful attacks
        "successful/asr": 5 / 9, "successful/acp": 15 / 5, "successful/l2": 10.5 / 5,
    }
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k].item() == pytest.approx(v, abs=1e-12), k


def test_attack_protocol_is_sum_reduced_and_takes_one_attack_per_input():
    attacked, valid, acp, l2 = _protocol_example()
    whole, parts = AttackProtocol(["acp", "l2"]), [AttackProtocol(["acp", "l2"]) for _ in range(2)]
    whole.update(attacked, valid, acp, l2)
    parts[0].update(attacked[:1], valid[:1], acp[:1], l2[:1])  # two "processes"
    parts[1].update(attacked[1:], valid[1:], acp[1:], l2[1:])
    parts[0].merge_state(parts[1])
    a, b = whole.compute(), parts[0].compute()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = AttackProtocol(["acp"], cases=["successful", "best"])  # [B] entries: one attack per input (untargeted)
    one.update(attacked, valid[:, 0], acp[:, 0])
    out = one.compute()
    assert out["successful/asr"] == 2 / 3 and out["successful/acp"] == (4 + 3) / 2 == out["best/acp"]


def test_attack_protocol_bad_input():
    m = AttackProtocol(["acp"])
    m.update(torch.zeros(2), torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="classifies none of them correctly.*only_correct"):
        m.compute()
    with pytest.raises(ConfigError, match="unknown protocol case"):
        AttackProtocol(["acp"], cases=["median"])
    empty = AttackProtocol(["acp"])
    empty.update(torch.ones(1), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 3.0]]))
    assert torch.isnan(empty.compute()["worst/acp"])  # no input with every attack successful
