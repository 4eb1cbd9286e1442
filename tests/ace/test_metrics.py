"""ACE metrics (equidiff.metrics.ace) against direct computations on hand-made records."""

import numpy as np
import pytest
import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.metrics.ace import (
    COUT,
    FVA,
    MNAC,
    CounterfactualFID,
    EditSize,
    FlipRate,
    PixelFeatures,
    cout_scores,
    sfid_half,
)
from equidiff.metrics.functional import frechet_distance
from equidiff.utils.images import uint8_to_float


def _images(n, seed, c=1, size=4):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_flip_rate_and_edit_size():
    success = torch.tensor([True, False, True, True, False])
    already = torch.tensor([False, False, True, False, False])
    target = torch.tensor([1, 2, 3, 4, 5])
    pe_pred = torch.tensor([1, 0, 3, 0, 5])
    source, label = torch.tensor([0, 2, 3, 1, 1]), torch.tensor([0, 1, 3, -1, 1])
    fr = FlipRate()
    fr.update(success[:2], already[:2], pe_pred[:2], target[:2], source[:2], label[:2])
    fr.update(success[2:], already[2:], pe_pred[2:], target[2:], source[2:], label[2:])
    out = fr.compute()
    assert out["flip_rate"].item() == pytest.approx(3 / 5)
    assert out["input_flip_rate"].item() == pytest.approx(1 / 5)
    assert out["attacked_flip_rate"].item() == pytest.approx(2 / 4)
    assert out["pre_explanation_flip_rate"].item() == pytest.approx(3 / 5)
    assert out["clean_accuracy"].item() == pytest.approx(3 / 4)  # the unlabelled sample is left out

    l1, l2, linf = torch.rand(5), torch.rand(5), torch.rand(5)
    area = torch.tensor([0.1, 0.2, 0.0, 0.4, 0.5])
    es = EditSize()
    es.update(l1, l2, linf, area, success, already)
    out = es.compute()
    assert out["l1"].item() == pytest.approx(l1.mean().item())
    assert out["l2_success"].item() == pytest.approx(l2[success].mean().item())
    assert out["linf_success"].item() == pytest.approx(linf[success].mean().item())
    assert out["mask_area"].item() == pytest.approx(area[~already].mean().item())  # over attacked inputs


def test_the_sfid_split_is_a_fixed_balanced_hash_of_the_seed():
    seeds = torch.arange(2000)
    half = sfid_half(seeds)
    assert torch.equal(half, sfid_half(seeds.tolist()))
    assert torch.equal(half[500:510], sfid_half(seeds[500:510]))  # a sample's half does not depend on the batch
    assert 0.45 < half.float().mean().item() < 0.55
    assert not torch.equal(half, seeds % 2 == 0)


def _fid_inputs(n=60, seed=0):
    x, cf = _images(n, seed), _images(n, seed + 1)
    success = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) < 0.8
    return x, cf, success, torch.arange(100, 100 + n)


def test_fid_and_sfid_equal_frechet_distances_of_the_right_sets():
    x, cf, success, seeds = _fid_inputs()
    metric = CounterfactualFID(PixelFeatures(16), feature="pixels", min_samples=0)
    for part in (slice(0, 25), slice(25, 60)):  # two batches
        metric.update(x[part], cf[part], success[part], seeds[part])
    out = metric.compute()
    fx, fc = x.flatten(1).double() / 255, cf.flatten(1).double() / 255
    a = sfid_half(seeds)
    # FID: the successful counterfactuals against all inputs
    torch.testing.assert_close(out["fid"], frechet_distance(fc[success], fx), rtol=1e-6, atol=1e-8)
    ab = frechet_distance(fc[~a & success], fx[a])
    ba = frechet_distance(fc[a & success], fx[~a])
    torch.testing.assert_close(out["sfid"], (ab + ba) / 2, rtol=1e-6, atol=1e-8)
    assert out["n_counterfactuals"].item() == success.sum().item() and out["n_inputs"].item() == 60


def test_fid_refuses_too_few_samples_unless_allowed():
    x, cf, success, seeds = _fid_inputs(10)
    metric = CounterfactualFID(PixelFeatures(16), feature="pixels", min_samples=2048)
    metric.update(x, cf, success, seeds)
    with pytest.raises(ConfigError, match="min_samples=2048"):
        metric.compute()
    none = CounterfactualFID(PixelFeatures(16), feature="pixels", min_samples=0)
    none.update(x, cf, torch.zeros(10, dtype=torch.bool), seeds)
    assert torch.isnan(none.compute()["fid"])
    with pytest.raises(ConfigError, match="no feature"):
        CounterfactualFID(PixelFeatures(16), feature="2048")


class Linear(nn.Module):
    def __init__(self, d_in, d_out, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_mnac_counts_changed_oracle_attributes_over_successful_counterfactuals():
    oracle = Linear(16, 6, seed=0)
    x, cf, success, _ = _fid_inputs(20)
    metric = MNAC(oracle)
    metric.update(x, cf, success)
    with torch.no_grad():
        a, b = oracle(uint8_to_float(x[success])) > 0, oracle(uint8_to_float(cf[success])) > 0
    counts = (a != b).sum(1).double()
    out = metric.compute()
    assert out["mnac"].item() == pytest.approx(counts.mean().item())
    assert out["mnac_std"].item() == pytest.approx(counts.std(unbiased=False).item())
    ignored = MNAC(oracle, ignore=[0, 1])
    ignored.update(x, cf, success)
    assert ignored.compute()["mnac"].item() == pytest.approx((a != b)[:, 2:].sum(1).double().mean().item())


def test_fva_is_the_fraction_of_cosine_similarities_above_a_half():
    embed = Linear(16, 8, seed=1)
    x, cf, success, _ = _fid_inputs(20)
    metric = FVA(embed)
    metric.update(x, cf, success)
    with torch.no_grad():
        sim = torch.nn.functional.cosine_similarity(embed(uint8_to_float(x[success])),
                                                    embed(uint8_to_float(cf[success])))
    out = metric.compute()
    assert out["fva"].item() == pytest.approx((sim > 0.5).double().mean().item())
    assert out["fs"].item() == pytest.approx(sim.double().mean().item())


def _cout_by_hand(classifier, x, cf, source, target, num_steps):
    """COUT written out sample by sample (C3LT): insert cf pixels by decreasing |diff|, trapezoid AUCs."""
    scores = []
    for i in range(len(x)):
        h, w = x.shape[-2:]
        step = max(1, h * w // num_steps)
        order = np.argsort(-(cf[i] - x[i]).abs().sum(0).flatten().numpy(), kind="stable")
        ps, pt = [], []
        for k in range(0, h * w + step, step):
            m = torch.zeros(h * w)
            m[order[: min(k, h * w)]] = 1
            img = cf[i] * m.view(1, h, w) + x[i] * (1 - m.view(1, h, w))
            p = classifier(img[None]).softmax(-1)[0]
            ps.append(p[source[i]].item())
            pt.append(p[target[i]].item())
            if k >= h * w:
                break
        auc_t, auc_s = ((c[0] / 2 + sum(c[1:-1]) + c[-1] / 2) * step / (h * w) for c in (pt, ps))
        scores.append(auc_t - auc_s)
    return torch.tensor(scores)


def test_cout_equals_a_sample_by_sample_computation():
    clf = Linear(3 * 16, 5, seed=2)
    x, cf = uint8_to_float(_images(3, 5, c=3)), uint8_to_float(_images(3, 6, c=3))
    source, target = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    with torch.no_grad():
        torch.testing.assert_close(cout_scores(clf, x, cf, source, target, num_steps=5),
                                   _cout_by_hand(clf, x, cf, source, target, 5), atol=1e-6, rtol=1e-5)
        # no change: flat curves, COUT = p(target | x) - p(source | x)
        p = clf(x).softmax(-1)
        torch.testing.assert_close(cout_scores(clf, x, x, source, target), p[range(3), target] - p[range(3), source])


def test_cout_metric_keeps_correct_attacked_inputs_and_handles_one_logit():
    binary = Linear(16, 1, seed=3)
    x, cf = _images(4, 7), _images(4, 8)
    source, target, label = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 0, 0]), torch.tensor([1, 1, -1, 0])
    metric = COUT(binary, num_steps=4)
    metric.update(x, cf, source, target, label)
    keep = torch.tensor([True, False, True, False])  # wrong on 1, already at its target on 3
    out = metric.compute()
    assert out["n"].item() == 2
    with torch.no_grad():
        s = cout_scores(binary, uint8_to_float(x[keep]), uint8_to_float(cf[keep]), source[keep], target[keep], 4)
        # one logit: p(source) is sigmoid(logit) for source 1 and 1 - sigmoid(logit) for source 0
        same = cout_scores(binary, uint8_to_float(x[keep]), uint8_to_float(x[keep]), source[keep], target[keep], 4)
        p1 = torch.sigmoid(binary(uint8_to_float(x[keep]))[:, 0])
    assert out["cout"].item() == pytest.approx(s.mean().item(), abs=1e-6)
    p_source = torch.where(source[keep] == 1, p1, 1 - p1)
    torch.testing.assert_close(same, 1 - 2 * p_source)
