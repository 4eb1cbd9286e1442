"""Sample-quality metrics: reference equivalence (torch-fidelity) and exactness under 2-process DDP."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch_fidelity.metric_prc import calculate_precision_recall_full

from equidiff.metrics import ClassifierConfidence, PrecisionRecall
from equidiff.metrics.functional import precision_recall


def _feats(seed, n, d=5, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_precision_recall_equals_torch_fidelity(shift):
    real, fake = _feats(0, 120), _feats(1, 90, shift=shift)
    p, r = precision_recall(real, fake, k=3, batch_size=37)  # batching must not matter
    p_ref, r_ref = calculate_precision_recall_full(fake, real, neighborhood=3)  # input1 = generated
    # torch-fidelity averages in float32
    assert p.item() == pytest.approx(p_ref, abs=1e-6) and r.item() == pytest.approx(r_ref, abs=1e-6)


def test_precision_recall_against_a_brute_force_definition():
    real, fake = _feats(2, 40).double().numpy(), _feats(3, 30, shift=0.5).double().numpy()

    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, 3]  # k-th neighbour, the 0th is the point itself

    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean([(d_fr[i] <= radii(real)).any() for i in range(len(fake))])
    recall = np.mean([(d_fr[:, j] <= radii(fake)).any() for j in range(len(real))])
    p, r = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)
    assert (p.item(), r.item()) == pytest.approx((precision, recall))


def test_precision_recall_bad_input():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(_feats(0, 3), _feats(1, 10))
    with pytest.raises(ValueError, match="feature sizes differ"):
        precision_recall(_feats(0, 10, d=4), _feats(1, 10, d=5))


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _direct_confidence(images, labels):
    probs = _Linear()(images).softmax(-1).double()
    conf, pred = probs.max(-1)
    hist = torch.bincount(pred, minlength=4).double()
    p = hist / hist.sum()
    known = labels >= 0
    return {"mean_confidence": conf.mean(), "frac_confidence_above_0.5": (conf > 0.5).double().mean(),
            "classes_covered": (hist > 0).sum().double(),
            "class_entropy": -(p[p > 0] * p[p > 0].log()).sum() / np.log(4),
            "accuracy": (pred[known] == labels[known]).double().mean()}


def _data():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(10, 3, 2, 2, generator=g) * 2 - 1
    labels = torch.randint(0, 4, (10,), generator=g)
    labels[3] = -1  # unlabelled samples are left out of the accuracy
    return images, labels


def test_classifier_confidence_equals_a_direct_computation():
    images, labels = _data()
    m = ClassifierConfidence(_Linear(), num_classes=4, threshold=0.5)
    m.update(images[:6], labels[:6])
    m.update(images[6:], labels[6:])
    out = m.compute()
    for k, v in _direct_confidence(images, labels).items():
        assert out[k].item() == pytest.approx(v.item(), abs=1e-12), k


def _ddp_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images, labels = _data()
        real = _feats(0, 30, d=12)
        shards = [slice(0, 7), slice(7, 10)]  # uneven, like Lightning's predict sampler
        pr = PrecisionRecall(reference=real.reshape(30, 3, 2, 2))
        cc = ClassifierConfidence(_Linear(), num_classes=4, threshold=0.5)
        pr.update(images[shards[rank]])
        cc.update(images[shards[rank]], labels[shards[rank]])
        out = {**{f"pr/{k}": v.item() for k, v in pr.compute().items()},
               **{f"cc/{k}": v.item() for k, v in cc.compute().items()}}
        if rank == 0:
            results.update(out)
    finally:
        dist.destroy_process_group()


def test_metrics_are_exact_with_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2, join=True)

    images, labels = _data()
    p, r = precision_recall(_feats(0, 30, d=12), images.flatten(1), k=3)
    assert results["pr/precision"] == pytest.approx(p.item()) and results["pr/recall"] == pytest.approx(r.item())
    for k, v in _direct_confidence(images, labels).items():
        assert results[f"cc/{k}"] == pytest.approx(v.item(), abs=1e-12), k
