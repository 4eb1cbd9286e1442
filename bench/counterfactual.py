"""Counterfactual solvers (seed 001): batched S-CFE throughput, and GSE / PGD time per CIFAR-10-size image.

1. S-CFE on scikit-learn digits (64 flat features in [-1, 1], logistic regression, KDE plausibility, l0
   penalty: the settings of ``conf/experiment/counterfactual/digits_scfe_kde.yaml``): counterfactuals per
   second for one batch of ``n`` test rows against a per-sample loop of the same code. Target: >= 10x.
   Every sample has its own gamma, bracket and stopping, so the batch computes exactly what the loop does
   (``tests/attacks/test_scfe.py`` checks the equality).
2. GSE (the reference's tuned CIFAR-10 targeted setting, ``conf/solver/gse.yaml``) and targeted PGD-l2
   (eps 0.5, 20 steps, ART) on 3x32x32 images with ResNet-20, seconds per image. No CIFAR-10 data or trained
   weights here: random images in [-1, 1] and a randomly initialised ResNet-20 (``torch.manual_seed(0)``).
   PGD's cost does not depend on the weights; GSE's does (a sample stops at its first success in each of
   its 10 search steps), so its time is reported together with its mean number of gradient evaluations.
"""

from __future__ import annotations

import time

import torch

from bench.common import timed


def _scfe_throughput(n: int, device: str) -> dict:
    from equidiff.attacks.density import KDEDensity
    from equidiff.attacks.scfe import scfe
    from equidiff.attacks.targets import TargetRule
    from equidiff.classifiers.tabular import logistic_regression
    from equidiff.data.tabular import TabularDataModule, split_arrays
    from equidiff.utils.rng import generators_for

    dm = TabularDataModule(dataset="digits", scaling="global_pm1")
    (xtr, ytr), (x, y) = split_arrays(dm, "train"), split_arrays(dm, "test")
    x, y = x[:n].to(device), y[:n].to(device)
    clf = logistic_regression(dm).to(device)
    density = KDEDensity().fit(xtr, ytr).to(device)
    target = TargetRule("next", 10)(y, generators_for(range(n))).to(device)
    box = tuple(b.to(device) for b in dm.box)
    settings = dict(box=box, unit_box=True, density=density, tau=15.0, sparsity="l0", beta=25.0, step_size=0.5)

    def batched():
        scfe(clf, x, target, source=y, **settings)

    def loop():
        for i in range(n):
            scfe(clf, x[i:i + 1], target[i:i + 1], source=y[i:i + 1], **settings)

    t_batch = timed(batched, device)
    t_loop = timed(loop, device)
    ratio = t_loop / t_batch
    return {"n": n, "batched_cf_per_s": n / t_batch, "loop_cf_per_s": n / t_loop, "ratio": ratio,
            "target": ">= 10", "pass": ratio >= 10}


def _cifar_attacks(batch_size: int, device: str) -> dict:
    from equidiff.attacks import gse as gse_module
    from equidiff.attacks.baselines import pgd
    from equidiff.attacks.gse import gse
    from equidiff.classifiers.resnet_cifar import load_resnet20

    torch.manual_seed(0)
    clf = load_resnet20().to(device).eval()
    x = (torch.rand(batch_size, 3, 32, 32) * 2 - 1).to(device)
    with torch.no_grad():
        pred = clf(x).argmax(-1)
    target = (pred + 1 + torch.arange(batch_size, device=device) % 9) % 10  # another class than predicted
    counts = {"grads": 0}
    original = gse_module.per_sample_grad

    def counting(objective, w):
        counts["grads"] += len(w)
        return original(objective, w)

    gse_module.per_sample_grad = counting
    try:
        t_gse = timed(lambda: gse(clf, x, target, source=pred), device)
    finally:
        gse_module.per_sample_grad = original
    t_pgd = timed(lambda: pgd(clf, x, target, source=pred, eps=0.5, steps=20), device)
    return {"batch_size": batch_size, "gse_s_per_image": t_gse / batch_size, "pgd_l2_s_per_image": t_pgd / batch_size,
            "gse_gradient_evaluations_per_image": counts["grads"] / batch_size, "gse_max_evaluations": 1 + 10 * 200}


def run(device: str = "cpu", n: int = 32, cifar_batch: int = 16) -> dict:
    start = time.perf_counter()
    out = {"device": device, "torch_threads": torch.get_num_threads(),
           "scfe": _scfe_throughput(n, device), "cifar": _cifar_attacks(cifar_batch, device)}
    out["wall_s"] = time.perf_counter() - start
    return out


def passed(result: dict) -> bool:
    return bool(result["scfe"]["pass"])


def rows(result: dict) -> list[str]:
    s, c = result["scfe"], result["cifar"]
    return [
        f"| batched S-CFE on digits (KDE, l0, 64 features, {s['n']} rows), counterfactuals/s | "
        f"{s['batched_cf_per_s']:.2f} | {s['loop_cf_per_s']:.2f} (per-sample loop) | {s['ratio']:.1f} | "
        f"{s['target']} | {'yes' if s['pass'] else 'NO'} |",
        f"| GSE on 3x32x32, ResNet-20 (random weights, batch {c['batch_size']}), s/image | "
        f"{c['gse_s_per_image']:.3f} | {c['pgd_l2_s_per_image']:.3f} (targeted PGD-l2, 20 steps) | "
        f"{c['gse_s_per_image'] / c['pgd_l2_s_per_image']:.1f} | (none; {c['gse_gradient_evaluations_per_image']:.0f} "
        f"of at most {c['gse_max_evaluations']} gradient evaluations) | - |",
    ]


if __name__ == "__main__":
    import json

    res = run("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(res, indent=1))
    print("\n".join(rows(res)))
