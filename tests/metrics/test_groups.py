import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from equidiff.errors import ConfigError
from equidiff.metrics.groups import WorstGroupAccuracy, worst_group_accuracy

G = 4


def _data(seed=0, n=50, num_groups=G, empty=None):
    g = torch.Generator().manual_seed(seed)
    preds = torch.randint(0, 3, (n,), generator=g)
    target = torch.randint(0, 3, (n,), generator=g)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    if empty is not None:
        groups[groups == empty] = (empty + 1) % num_groups
    return preds, target, groups


def _direct(preds, target, groups, num_groups=G):
    accs = []
    for k in range(num_groups):
        m = groups == k
        accs.append((preds[m] == target[m]).double().mean().item() if m.any() else float("nan"))
    return accs


def test_equals_a_direct_per_group_computation_over_several_batches():
    preds, target, groups = _data()
    metric = WorstGroupAccuracy(G)
    for s in (slice(0, 13), slice(13, 40), slice(40, 50)):
        metric.update(preds[s], target[s], groups[s])
    out = metric.compute()
    accs = _direct(preds, target, groups)
    assert out["group_acc"].tolist() == pytest.approx(accs)
    assert out["worst_group_acc"].item() == pytest.approx(min(accs))
    assert out["avg_acc"].item() == pytest.approx((preds == target).double().mean().item())
    assert "weighted_acc" not in out
    functional = worst_group_accuracy(preds, target, groups, G)
    assert functional["worst_group_acc"].item() == pytest.approx(min(accs))


def test_logits_are_arg_maxed():
    preds, target, groups = _data(1)
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5 + 0.1 * torch.randn(len(preds), 3)
    a = worst_group_accuracy(logits, target, groups, G)
    b = worst_group_accuracy(preds, target, groups, G)
    assert a["group_acc"].tolist() == pytest.approx(b["group_acc"].tolist())


def test_the_weighted_average_uses_the_given_proportions():
    preds, target, groups = _data(2)
    weights = [3498, 184, 56, 1057]  # WaterBirds' training group counts
    out = worst_group_accuracy(preds, target, groups, G, weights=weights)
    accs = _direct(preds, target, groups)
    expected = sum(w * a for w, a in zip(weights, accs, strict=True)) / sum(weights)
    assert out["weighted_acc"].item() == pytest.approx(expected)
    # proportions at any scale give the same average
    scaled = worst_group_accuracy(preds, target, groups, G, weights=[w / 7 for w in weights])
    assert scaled["weighted_acc"].item() == pytest.approx(expected)


def test_an_empty_group_is_nan_and_left_out():
    preds, target, groups = _data(3, empty=2)
    out = WorstGroupAccuracy(G, weights=[1, 1, 5, 1])
    out.update(preds, target, groups)
    res = out.compute()
    assert math.isnan(res["group_acc"][2].item())
    accs = [a for k, a in enumerate(_direct(preds, target, groups)) if k != 2]
    assert res["worst_group_acc"].item() == pytest.approx(min(accs))
    assert res["weighted_acc"].item() == pytest.approx(sum(accs) / 3)


def test_bad_input():
    preds, target, groups = _data(4)
    with pytest.raises(ConfigError, match="group ids must lie in 0..3"):
        WorstGroupAccuracy(G).update(preds, target, groups + 1)
    with pytest.raises(ConfigError, match="group ids"):
        worst_group_accuracy(preds, target, groups - 1, G)
    with pytest.raises(ConfigError, match="one entry per sample"):
        WorstGroupAccuracy(G).update(preds, target[:-1], groups)
    with pytest.raises(ConfigError, match="weights need 4"):
        WorstGroupAccuracy(G, weights=[1, 2])
    with pytest.raises(ConfigError, match="num_groups"):
        WorstGroupAccuracy(0)


def _ddp_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        preds, target, groups = _data(5, n=41)
        shard = [slice(0, 30), slice(30, 41)][rank]  # uneven shards
        metric = WorstGroupAccuracy(G, weights=[4, 3, 2, 1])
        metric.update(preds[shard], target[shard], groups[shard])
        out = metric.compute()
        if rank == 0:
            results.update({k: v.tolist() for k, v in out.items()})
    finally:
        dist.destroy_process_group()


def test_exact_with_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2, join=True)
    preds, target, groups = _data(5, n=41)
    single = worst_group_accuracy(preds, target, groups, G, weights=[4, 3, 2, 1])
    for k, v in single.items():
        assert results[k] == pytest.approx(v.tolist()), k
