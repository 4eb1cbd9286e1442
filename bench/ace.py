"""ACE: time and peak memory per counterfactual against tau, with and without per-step checkpointing.

One counterfactual = Algorithm 1 (``iterations`` PGD steps, each a forward and backward through the tau-step
DDPM filter and the classifier) + Algorithm 2 (mask and tau inpainting steps), for one image, on the
benchmark UNet (3 x 32 x 32, random weights) and a robustness-library CIFAR ResNet-18. Each configuration
runs in a fresh process: its wall time, and its peak memory above the memory held once the models are
built (CUDA: ``max_memory_allocated``; CPU: peak resident set size, ``ru_maxrss``).

Targets:
* memory with checkpointing is flat in tau: peak(tau_max) / peak(tau_min) <= 1.3;
* time is linear in tau (no quadratic cost, unlike DiME's re-denoising): (time(tau_max) / time(tau_min)) /
  (tau_max / tau_min) <= 1.2, with checkpointing;
* checkpointing costs at most 1.5x the time without it (one extra UNet forward per step on backward).

Context row: the memory added per unit of tau (MiB per step, from tau_min to tau_max) with and without
checkpointing. On CPU with one 32 x 32 image a step's activations are small (about 11 MiB), so what
non-reentrant checkpointing still keeps per step shows in the flatness ratio: the forward graph (about 260
autograd nodes per step, without their saved tensors) held about 0.35 MiB per step of resident memory when
measured alone; the rest of the measured growth (about 1.7 MiB per step in all) is presumably allocator
fragmentation of the per-step recomputation (not verified). At CelebA's 128 px a step's activations are
far larger, and the ratio should approach 1 (not measured here: no GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from diffusers import DDPMScheduler

from bench.common import bench_unet, measurement_env, peak_memory_mib
from equidiff.classifiers import Classifier
from equidiff.diffusion import UNetBackbone
from equidiff.explain.ace import PostProcessing, PreExplanation
from equidiff.utils.rng import generators_for

TAUS = (2, 5, 10, 20)
NUM_STEPS = 50


def _models(device: str):
    from robustness import cifar_models

    torch.manual_seed(0)
    clf = Classifier(cifar_models.resnet18(num_classes=10), input_range=(0, 1), channels=3, image_size=32,
                     num_classes=10).to(device).eval().requires_grad_(False)
    return UNetBackbone(bench_unet().to(device), DDPMScheduler(num_train_timesteps=1000)), clf


def measure(tau: int, checkpoint: bool, iterations: int, device: str) -> dict:
    """One counterfactual in this process: wall seconds and peak extra memory (MiB)."""
    torch.set_num_threads(1) if device == "cpu" else None
    backbone, clf = _models(device)
    x = torch.rand(1, 3, 32, 32, device=device) * 2 - 1
    target = torch.tensor([3], device=device)
    pre = PreExplanation(num_steps=NUM_STEPS, tau=tau, iterations=iterations, checkpoint=checkpoint)
    post = PostProcessing(num_steps=NUM_STEPS, tau=tau)
    def counterfactual():
        with torch.no_grad():
            pe = pre(backbone, clf, x, target, generators=generators_for([0]))
            return post(backbone, x, pe, generators=generators_for([0]))

    t0 = time.perf_counter()
    _, peak = peak_memory_mib(counterfactual, device)
    return {"seconds": time.perf_counter() - t0, "peak_mib": peak}


def run(device: str = "cpu", iterations: int = 5, taus=TAUS) -> dict:
    configs = {}
    for ckpt in (True, False):
        for tau in taus:
            cmd = [sys.executable, "-m", "bench.ace", str(tau), str(int(ckpt)), str(iterations), device]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=measurement_env())
            configs[f"{'checkpoint' if ckpt else 'plain'}_tau{tau}"] = json.loads(res.stdout.splitlines()[-1])
    lo, hi = min(taus), max(taus)
    ck, pl = (lambda tau: configs[f"checkpoint_tau{tau}"]), (lambda tau: configs[f"plain_tau{tau}"])
    mid = 5 if 5 in taus else hi
    return {
        "device": device, "iterations": iterations, "num_steps": NUM_STEPS, "taus": list(taus), "configs": configs,
        "memory_ratio": ck(hi)["peak_mib"] / max(ck(lo)["peak_mib"], 1e-9), "memory_target": "<= 1.3",
        "time_linearity": (ck(hi)["seconds"] / ck(lo)["seconds"]) / (hi / lo), "time_linearity_target": "<= 1.2",
        "checkpoint_time_ratio": ck(mid)["seconds"] / pl(mid)["seconds"], "checkpoint_time_target": "<= 1.5",
        "tau_mid": mid,
    }


def passed(result: dict) -> bool:
    return (result["memory_ratio"] <= 1.3 and result["time_linearity"] <= 1.2
            and result["checkpoint_time_ratio"] <= 1.5)


def rows(result: dict) -> list[str]:
    """Markdown rows: | benchmark | equidiff | reference | ratio | target | pass |."""
    r, lo, hi, mid = result["configs"], min(result["taus"]), max(result["taus"]), result["tau_mid"]
    it = f"{result['iterations']} PGD iterations, 1 image, {result['device']}"
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    out = [
        f"| ACE peak memory with checkpointing, tau {hi} vs {lo} ({it}), MiB | "
        f"{r[f'checkpoint_tau{hi}']['peak_mib']:.0f} | {r[f'checkpoint_tau{lo}']['peak_mib']:.0f} | "
        f"{result['memory_ratio']:.2f} | <= 1.3 | {ok(result['memory_ratio'] <= 1.3)} |",
        f"| ACE time per counterfactual with checkpointing, tau {hi} vs {lo} ({it}), s | "
        f"{r[f'checkpoint_tau{hi}']['seconds']:.2f} | {r[f'checkpoint_tau{lo}']['seconds']:.2f} | "
        f"{result['time_linearity']:.2f} (per unit of tau) | <= 1.2 | {ok(result['time_linearity'] <= 1.2)} |",
        f"| ACE time per counterfactual, checkpointing vs not, tau {mid} ({it}), s | "
        f"{r[f'checkpoint_tau{mid}']['seconds']:.2f} | {r[f'plain_tau{mid}']['seconds']:.2f} | "
        f"{result['checkpoint_time_ratio']:.2f} | <= 1.5 | {ok(result['checkpoint_time_ratio'] <= 1.5)} |",
    ]
    slope = {k: (r[f"{k}_tau{hi}"]["peak_mib"] - r[f"{k}_tau{lo}"]["peak_mib"]) / (hi - lo)
             for k in ("checkpoint", "plain")}
    out.append(f"| ACE memory added per unit of tau, checkpointing vs not ({it}), MiB per step | "
               f"{slope['checkpoint']:.2f} | {slope['plain']:.2f} | "
               f"{slope['checkpoint'] / max(slope['plain'], 1e-9):.2f} | context | - |")
    for tau in result["taus"]:
        c, p = r[f"checkpoint_tau{tau}"], r[f"plain_tau{tau}"]
        mem_ratio = c["peak_mib"] / max(p["peak_mib"], 1e-9)
        out.append(f"| ACE tau {tau} of {result['num_steps']}: time s / peak MiB, checkpointing | "
                   f"{c['seconds']:.2f} / {c['peak_mib']:.0f} | {p['seconds']:.2f} / {p['peak_mib']:.0f} (no "
                   f"checkpointing) | {c['seconds'] / p['seconds']:.2f} / {mem_ratio:.2f} | context | - |")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5:
        tau, ckpt, iters, dev = int(sys.argv[1]), bool(int(sys.argv[2])), int(sys.argv[3]), sys.argv[4]
        print(json.dumps(measure(tau, ckpt, iters, dev)))
    else:
        res = run(device="cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(res, indent=1))
        print("\n".join(rows(res)))
        print("all targets met" if passed(res) else "some targets NOT met")
