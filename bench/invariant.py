"""Invariant-set sampling (seed 000): one optimisation iteration of Algorithm 1.

One iteration = the deterministic DDIM chain from z_T (per-step checkpointing), the objective on x and on its
low-pass copy F(x) (the 10 logits of a robustness-library CIFAR ResNet-18), the loss, the backward pass to z_T
and an SGD step; on the benchmark UNet (3 x 32 x 32, random weights), batch 4.

Targets: peak memory of one iteration at 50 chain steps / at 5 steps <= 1.3 (with checkpointing); time of one
iteration with / without checkpointing <= 1.5 (at 20 steps). Memory is measured in a fresh process per
configuration (CUDA: ``max_memory_allocated``; CPU: peak resident set size above the resident size once the
models are built). The seed's GPU goal (DiT-XL/2 at 256 px, 50 steps, B = 100: at most 10 s per image within
24 GB) needs a GPU and the DiT weights; it is not measured here.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time

import torch
from diffusers import DDPMScheduler

from bench.common import bench_unet, measurement_env, median, peak_memory_mib
from equidiff.classifiers import Classifier
from equidiff.diffusion import UNetBackbone
from equidiff.invariant import Logits, LowPass, invariant_optimize
from equidiff.methods.invariant import InvariantSampler

BATCH = 4


def _sampler(num_steps: int, checkpoint: bool, device: str) -> InvariantSampler:
    from robustness import cifar_models

    torch.manual_seed(0)
    clf = Classifier(cifar_models.resnet18(num_classes=10), input_range=(0, 1), channels=3, image_size=32,
                     num_classes=10).to(device).eval().requires_grad_(False)
    backbone = UNetBackbone(bench_unet().to(device), DDPMScheduler(num_train_timesteps=1000))
    return InvariantSampler(backbone, Logits(clf), functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9),
                            num_steps=num_steps, budget=1, tau=0.0, low_pass=LowPass(0.5), checkpoint=checkpoint)


def _iteration(m: InvariantSampler, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(BATCH, *m.backbone.sample_shape, generator=g).to(device)
    target = torch.randn(BATCH, 10, generator=g).to(device)
    invariant_optimize(m._generate(None), m.objective, z, target, optimizer=m.optimizer, budget=1, tau=0.0,
                       low_pass=m.low_pass)
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(num_steps: int, checkpoint: bool, device: str) -> float:
    """Peak extra memory (MiB) of one iteration (run in its own process)."""
    m = _sampler(num_steps, checkpoint, device)
    return peak_memory_mib(lambda: _iteration(m, device), device)[1]


def measure_time(num_steps: int, repeats: int, device: str) -> dict:
    """Median seconds of one iteration with and without checkpointing (alternating, after a warm-up round)."""
    samplers = {ckpt: _sampler(num_steps, ckpt, device) for ckpt in (False, True)}
    times = {False: [], True: []}
    for rep in range(repeats + 1):
        for ckpt, m in samplers.items():
            t = time.perf_counter()
            _iteration(m, device)
            if rep > 0:
                times[ckpt].append(time.perf_counter() - t)
    return {"checkpoint_s": median(times[True]), "plain_s": median(times[False])}


def run(device: str = "cpu", time_steps: int = 20, repeats: int = 3) -> dict:
    mem = {}
    for ckpt in (True, False):
        for steps in (5, 50):
            cmd = [sys.executable, "-m", "bench.invariant", str(steps), str(int(ckpt)), device]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=measurement_env())
            mem[f"{'checkpoint' if ckpt else 'plain'}_{steps}"] = json.loads(res.stdout.splitlines()[-1])
    t = measure_time(time_steps, repeats, device)
    return {"device": device, "batch_size": BATCH, "memory_mib": mem,
            "memory_ratio": mem["checkpoint_50"] / mem["checkpoint_5"], "time_steps": time_steps, "time": t,
            "time_ratio": t["checkpoint_s"] / t["plain_s"]}


def passed(result: dict) -> bool:
    return result["memory_ratio"] <= 1.3 and result["time_ratio"] <= 1.5


def rows(result: dict) -> list[str]:
    m, t = result["memory_mib"], result["time"]
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    return [
        f"| invariant sets: one Algorithm 1 iteration, peak memory with checkpointing, 50 vs 5 steps (batch "
        f"{result['batch_size']}), MiB | {m['checkpoint_50']:.0f} | {m['checkpoint_5']:.0f} | "
        f"{result['memory_ratio']:.2f} | <= 1.3 | {ok(result['memory_ratio'] <= 1.3)} |",
        f"| invariant sets: one Algorithm 1 iteration ({result['time_steps']} steps), with vs without "
        f"checkpointing, s | {t['checkpoint_s']:.2f} | {t['plain_s']:.2f} | {result['time_ratio']:.2f} | <= 1.5 | "
        f"{ok(result['time_ratio'] <= 1.5)} |",
        f"| invariant sets: one iteration without checkpointing, 50 vs 5 steps, MiB (context) | "
        f"{m['plain_50']:.0f} | {m['plain_5']:.0f} | {m['plain_50'] / m['plain_5']:.2f} | - | - |",
    ]


if __name__ == "__main__":
    steps, ckpt, dev = int(sys.argv[1]), bool(int(sys.argv[2])), sys.argv[3]
    print(json.dumps(measure_memory(steps, ckpt, dev)))
