"""Differentiable chain: peak memory and backward time with and without per-step checkpointing.

Targets: peak memory with checkpointing at 50 steps / at 5 steps <= 1.3 (flat in the number of
steps); time of one backward with / without checkpointing <= 1.5.

Memory is measured in a fresh process per configuration: on CUDA ``max_memory_allocated``; on CPU
the peak resident set size (``ru_maxrss``) minus the resident size just before the forward pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from diffusers import DDPMScheduler

from bench.common import bench_unet, measurement_env, median, peak_memory_mib
from equidiff.diffusion import UNetBackbone, ddim_chain


def measure_memory(num_steps: int, checkpoint: bool, batch_size: int, device: str) -> float:
    """Peak extra memory (MiB) of one forward + backward through the chain (run in its own process)."""
    backbone = UNetBackbone(bench_unet().to(device), DDPMScheduler(num_train_timesteps=1000))
    z = torch.randn(batch_size, *backbone.sample_shape, device=device, requires_grad=True)

    def forward_backward():
        x_0 = ddim_chain(backbone, z, backbone.scheduler, num_steps=num_steps, checkpoint=checkpoint)
        return torch.autograd.grad(x_0.square().mean(), z)

    return peak_memory_mib(forward_backward, device)[1]


def saved_for_backward_mib(num_steps: int, checkpoint: bool, batch_size: int, device: str) -> float:
    """MiB of tensors the forward pass keeps for the backward pass (autograd's saved tensors, counted as they
    are packed; with checkpointing, what each checkpoint keeps: its inputs). This is the memory that grows
    with the number of steps, read without the allocator: the RSS peak adds fragmentation on top."""
    backbone = UNetBackbone(bench_unet().to(device), DDPMScheduler(num_train_timesteps=1000))
    z = torch.randn(batch_size, *backbone.sample_shape, device=device, requires_grad=True)
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storage counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_0 = ddim_chain(backbone, z, backbone.scheduler, num_steps=num_steps, checkpoint=checkpoint)
    del x_0
    return sum(sizes.values()) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_time(num_steps: int, batch_size: int, repeats: int, device: str) -> dict:
    """Median forward and backward times through the chain, without and with checkpointing (alternating)."""
    backbone = UNetBackbone(bench_unet().to(device), DDPMScheduler(num_train_timesteps=1000))
    z0 = torch.randn(batch_size, *backbone.sample_shape, device=device)
    times = {ckpt: {"forward_s": [], "backward_s": []} for ckpt in (False, True)}
    for rep in range(repeats + 1):  # the first round is warm-up
        for ckpt in (False, True):
            z = z0.clone().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            x_0 = ddim_chain(backbone, z, backbone.scheduler, num_steps=num_steps, checkpoint=ckpt)
            _sync(device)
            t1 = time.perf_counter()
            torch.autograd.grad(x_0.square().mean(), z)
            _sync(device)
            t2 = time.perf_counter()
            if rep > 0:
                times[ckpt]["forward_s"].append(t1 - t0)
                times[ckpt]["backward_s"].append(t2 - t1)
    out = {}
    for ckpt, t in times.items():
        fb = [a + b for a, b in zip(t["forward_s"], t["backward_s"], strict=True)]
        out["checkpoint" if ckpt else "plain"] = {
            "forward_s": median(t["forward_s"]), "backward_s": median(t["backward_s"]),
            "forward_backward_s": median(fb)}
    out["backward_ratio"] = out["checkpoint"]["backward_s"] / out["plain"]["backward_s"]
    out["forward_backward_ratio"] = out["checkpoint"]["forward_backward_s"] / out["plain"]["forward_backward_s"]
    return out


def run(batch_size: int = 4, time_steps: int = 20, repeats: int = 3, device: str = "cpu") -> dict:
    mem = {}
    for ckpt in (True, False):
        for steps in (5, 50):
            cmd = [sys.executable, "-m", "bench.chain_memory", str(steps), str(int(ckpt)), str(batch_size), device]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=measurement_env())
            mem[f"{'checkpoint' if ckpt else 'plain'}_{steps}_steps_mib"] = json.loads(res.stdout.splitlines()[-1])
    mem_ratio = mem["checkpoint_50_steps_mib"] / mem["checkpoint_5_steps_mib"]
    saved = {f"{'checkpoint' if ckpt else 'plain'}_{steps}_steps_mib": saved_for_backward_mib(steps, ckpt, batch_size,
                                                                                              device)
             for ckpt in (True, False) for steps in (5, 50)}
    t = measure_time(time_steps, batch_size, repeats, device)
    return {
        "batch_size": batch_size, "device": device,
        "memory": mem, "memory_ratio_ckpt_50_over_5": mem_ratio, "saved_for_backward": saved, "memory_target": "<= 1.3",
        "memory_pass": mem_ratio <= 1.3,
        "time_steps": time_steps, "time": t, "time_target": "backward with / without checkpointing <= 1.5",
        "time_pass": t["backward_ratio"] <= 1.5,
    }


if __name__ == "__main__":
    steps, ckpt, bs, dev = int(sys.argv[1]), bool(int(sys.argv[2])), int(sys.argv[3]), sys.argv[4]
    print(json.dumps(measure_memory(steps, ckpt, bs, dev)))
