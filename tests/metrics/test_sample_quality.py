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

from equidiff.errors import ConfigError
from equidiff.metrics import ClassifierConfidence, PrecisionRecall
from equidiff.metrics.functional import precision_recall
from equidiff.metrics.invariant import Diversity


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


def test_knn_precision_recall_needs_more_than_k_samples_as_torch_fidelity_does():
    real = _feats(0, 30)
    with pytest.raises(RuntimeError):  # torch-fidelity: kthvalue(k + 1) over 3 samples is out of range
        calculate_precision_recall_full(_feats(1, 3), real, neighborhood=3)
    metric = PrecisionRecall(reference=real, k=3)
    with pytest.raises(ConfigError, match="k=3 needs more than k samples .* at least 4; this run makes 3"):
        metric.check_num_samples(3)  # PredictMetrics asks this before sampling
    metric.check_num_samples(4)
    fake = _feats(1, 4, shift=0.3)
    metric.update(fake)
    out = metric.compute()
    p_ref, r_ref = calculate_precision_recall_full(fake, real, neighborhood=3)
    assert out["precision"].item() == pytest.approx(p_ref, abs=1e-6)
    assert out["recall"].item() == pytest.approx(r_ref, abs=1e-6)
    with pytest.raises(ConfigError, match="more than k reference images, got 3"):
        PrecisionRecall(reference=_feats(0, 3), k=3)


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


def _ddp_worker(rank, port, results, shards):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images, labels = _data()
        real = _feats(0, 30, d=12)
        pr = PrecisionRecall(reference=real.reshape(30, 3, 2, 2))
        cc = ClassifierConfidence(_Linear(), num_classes=4, threshold=0.5)
        div = Diversity()  # a gathered metric of the invariant runs, fed here with labels as queries
        mine = slice(*shards[rank])
        if mine.stop > mine.start:  # a process without samples feeds nothing (no update at all)
            pr.update(images[mine])
            cc.update(images[mine], labels[mine])
            div.update(images[mine], labels[mine], torch.arange(10)[mine])
        out = {**{f"pr/{k}": v.item() for k, v in pr.compute().items()},
               **{f"cc/{k}": v.item() for k, v in cc.compute().items()}, "div": div.compute().item()}
        if rank == 0:
            results.update(out)
    finally:
        dist.destroy_process_group()


# uneven like the predict shards; and one process without samples (fewer samples than processes, or the last
# samples of a resumed run), which torchmetrics syncs as a 1-d float32 tensor([]) against (n, D) float64
@pytest.mark.parametrize("shards", [((0, 7), (7, 10)), ((0, 10), (10, 10))], ids=["uneven", "empty_rank"])
def test_metrics_are_exact_with_two_processes(shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(port, results, shards), nprocs=2, join=True)

    images, labels = _data()
    p, r = precision_recall(_feats(0, 30, d=12), images.flatten(1), k=3)
    assert results["pr/precision"] == pytest.approx(p.item()) and results["pr/recall"] == pytest.approx(r.item())
    for k, v in _direct_confidence(images, labels).items():
        assert results[f"cc/{k}"] == pytest.approx(v.item(), abs=1e-12), k
    div = Diversity()
    div.update(images, labels, torch.arange(10))
    assert results["div"] == pytest.approx(div.compute().item(), rel=1e-12)
