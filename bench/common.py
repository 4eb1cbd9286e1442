"""Shared bits of the benchmarks: the benchmark UNet, timing, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def bench_unet(sample_size: int = 32, channels: int = 3):
    """A small CIFAR-shaped UNet2DModel (random weights; speed does not depend on training)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
    ).eval()


def timed(fn, device: str = "cpu") -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measurement_env() -> dict:
    """The environment of a memory-measuring subprocess. On CPU, peak memory is read as the resident set size;
    glibc keeps freed heap blocks mapped (and fragmented), so the RSS of a run that frees and reallocates its
    activations step after step (checkpointed recomputation) grows with the step count even when the live
    memory does not. Serving allocations from 64 KiB up with mmap returns them to the system on free, so the
    RSS follows the live memory (measured: the checkpointed chain's 5 -> 50 step growth went from 132 MiB to
    21 MiB with it). No effect on CUDA memory."""
    import os

    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def peak_memory_mib(fn, device: str = "cpu") -> tuple[object, float]:
    """Run ``fn()`` and return (its result, its peak extra memory in MiB): on CUDA ``max_memory_allocated``
    above what is allocated before; on CPU the peak resident set size (VmHWM) above the resident size before,
    with the peak first reset to the current size (``/proc/self/clear_refs``), so that what building the
    models took and freed does not count. Run it in a fresh process started with ``measurement_env()``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_mib("VmRSS")
    out = fn()
    return out, _status_mib("VmHWM") - base


def median(xs):
    return statistics.median(xs)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
