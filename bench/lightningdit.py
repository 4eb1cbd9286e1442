"""Invariant-set sampling on seed 000's own backbone: one Algorithm 1 iteration through LightningDiT + VA-VAE.

One iteration = the Euler flow ODE from z_T over a 50-point grid (49 LightningDiT evaluations, per-step
checkpointing, null class, timestep shift 0.3), the VA-VAE decoder, the 1000 logits of a torchvision ResNet-50
(resized to 224 px) on x and on its low-pass copy F(x), the loss, the backward pass to z_T and an SGD step;
batch 1, random weights (they time like the real ones). On CUDA: LightningDiT-XL/1 at 256 px, the seed's
configuration, with the network in float32 and in bfloat16 (``load_lightningdit(dtype=...)``); on CPU the
LightningDiT-B/2 preset at 64 px (the full VA-VAE f16d32 decoder).

Measured: seconds per iteration (median, after a warm-up) with checkpointing, and without it for context; peak
memory of one iteration with checkpointing (fresh process; CUDA ``max_memory_allocated``, CPU peak resident set
size, see ``bench.common.peak_memory_mib``); where the time goes: the chain's forward pass alone (no grad), the
decoder's forward + backward, the objective's forward + backward on x and F(x); the rest of the iteration is the
chain's backward pass (each step's forward recomputed, then its backward). The seed's goal, an invariant image
in <= 10 s on one H200-class GPU with B = 100 iterations, needs <= 0.1 s per iteration.

The floating-point work of one iteration is counted for the seed's configuration (XL/1 at 256 px, 50 points)
with ``torch.utils.flop_counter`` on the meta device (matrix products and convolutions; no weights needed), and
turned into the time it would take at the H200's peak dense rates (NVIDIA's H200 SXM data sheet: FP32 67,
TF32 494.7 and BF16 989.5 TFLOP/s without sparsity; 4.8 TB/s memory bandwidth): floors no implementation
goes below at batch 1, for the arithmetic and for reading the network's weights three times per step
(forward, recomputed forward, backward).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time

import torch

from bench.common import measurement_env, median, peak_memory_mib, timed

CONFIGS = {"cuda": ("LightningDiT-XL/1", 256), "cpu": ("LightningDiT-B/2", 64)}
NUM_STEPS = 50  # grid points: 49 Euler steps
TARGET_S = 0.1  # B = 100 iterations in 10 s
H200_PEAK_TFLOPS = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.5}
H200_BANDWIDTH_TBS = 4.8  # HBM3e, the same data sheet


def _sampler(model: str, image_size: int, device: str, dtype: str | None = None, checkpoint: bool = True):
    from diffusers import AutoencoderKL

    from equidiff.classifiers import load_torchvision
    from equidiff.diffusion.flow import FlowMatchScheduler
    from equidiff.diffusion.lightningdit import LightningDiT, LightningDiTBackbone, preset
    from equidiff.diffusion.vavae import ldm_vae_config
    from equidiff.invariant import Logits, LowPass
    from equidiff.methods.invariant import InvariantSampler

    torch.manual_seed(0)
    cfg = preset(model, input_size=image_size // 16)
    net = LightningDiT(cfg)
    if dtype:
        net = net.to(getattr(torch, dtype))
    vae = AutoencoderKL(**ldm_vae_config())
    backbone = LightningDiTBackbone(net, vae, FlowMatchScheduler(timestep_shift=0.3),
                                    latent_mean=torch.zeros(cfg.in_channels), latent_std=torch.ones(cfg.in_channels))
    clf = load_torchvision("resnet50", weights_path=None, num_classes=1000, image_size=224, resize=True)
    clf = clf.eval().requires_grad_(False)
    m = InvariantSampler(backbone, Logits(clf), functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9),
                         num_steps=NUM_STEPS, budget=1, tau=0.0, low_pass=LowPass(0.5), checkpoint=checkpoint)
    return m.to(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _iteration(m, device: str) -> None:
    from equidiff.invariant import invariant_optimize

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *m.backbone.sample_shape, generator=g).to(device)
    target = torch.randn(1, 1000, generator=g).to(device)
    invariant_optimize(m._generate(None), m.objective, z, target, optimizer=m.optimizer, budget=1, tau=0.0,
                       low_pass=m.low_pass)
    _sync(device)


def _parts(m, device: str) -> dict:
    """Seconds of the iteration's parts, each alone."""
    from equidiff.diffusion.flow import flow_chain

    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, *m.backbone.sample_shape, generator=g).to(device)
    fn = m._model_fn(1)
    with torch.no_grad():
        one = timed(lambda: fn(z, torch.tensor(0.5)), device)
        chain = timed(lambda: flow_chain(fn, z, m.backbone.scheduler, num_steps=NUM_STEPS), device)
        z0 = flow_chain(fn, z, m.backbone.scheduler, num_steps=NUM_STEPS)

    def decode():
        zz = z0.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(m.backbone.decode(zz).square().sum(), zz)

    with torch.no_grad():
        x = m.backbone.decode(z0).clamp(-1, 1)

    def objective():
        xx = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = m.objective(xx).square().sum() + m.objective(m.low_pass(xx)).square().sum()
            torch.autograd.grad(loss, xx)

    return {"network_forward_s": one, "chain_forward_s": chain, "decode_forward_backward_s": timed(decode, device),
            "objective_forward_backward_s": timed(objective, device)}


def iteration_flops(model: str = "LightningDiT-XL/1", image_size: int = 256) -> dict:
    """Floating-point operations of one iteration, counted on the meta device (no weights, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = _sampler(model, image_size, "meta")
        fn = m._model_fn(1)
        t = torch.tensor(0.5)
        z = lambda: torch.randn(1, *m.backbone.sample_shape, requires_grad=True)  # noqa: E731
        x = torch.zeros(1, 3, image_size, image_size, requires_grad=True)
        counts = {}
        # (.backward(): the counter's module hooks do not support autograd.grad on a leaf)
        for name, run in {
            "network_forward": lambda: fn(z(), t),
            "network_forward_backward": lambda: fn(z(), t).sum().backward(),
            "decode_forward_backward": lambda: m.backbone.decode(z()).sum().backward(),
            "objective_forward_backward": lambda: (m.objective(x).sum() + m.objective(m.low_pass(x)).sum()).backward(),
        }.items():
            with torch.enable_grad(), FlopCounterMode(display=False) as fc:
                run()
            counts[name] = fc.get_total_flops()
    steps = NUM_STEPS - 1
    # checkpointed chain: each step's forward, then on backward its forward again and its backward
    chain = steps * (counts["network_forward"] + counts["network_forward_backward"])
    total = chain + counts["decode_forward_backward"] + counts["objective_forward_backward"]
    # at batch 1 the network's weights are read three times per step (forward, recomputed forward, backward)
    params = sum(p.numel() for p in m.backbone.transformer.parameters())
    reads = {"fp32": 4 * params * 3 * steps, "bf16": 2 * params * 3 * steps}
    return {"model": model, "image_size": image_size, "per_part": counts, "chain_checkpointed": chain,
            "iteration": total, "h200_floor_s": {k: total / (v * 1e12) for k, v in H200_PEAK_TFLOPS.items()},
            "network_parameters": params,
            "h200_weight_read_floor_s": {k: v / (H200_BANDWIDTH_TBS * 1e12) for k, v in reads.items()}}


def measure_memory(model: str, image_size: int, device: str, dtype: str | None) -> float:
    m = _sampler(model, image_size, device, dtype)
    return peak_memory_mib(lambda: _iteration(m, device), device)[1]


def measure(model: str, image_size: int, device: str, dtype: str | None, repeats: int) -> dict:
    samplers = {ckpt: _sampler(model, image_size, device, dtype, checkpoint=ckpt) for ckpt in (True, False)}
    times = {True: [], False: []}
    for rep in range(repeats + 1):
        for ckpt, m in samplers.items():
            t = time.perf_counter()
            _iteration(m, device)
            if rep > 0:
                times[ckpt].append(time.perf_counter() - t)
    parts = [_parts(samplers[True], device) for _ in range(repeats)]
    parts = {k: median([p[k] for p in parts]) for k in parts[0]}
    it = median(times[True])
    parts["chain_backward_s (rest)"] = it - parts["chain_forward_s"] - parts["decode_forward_backward_s"] \
        - parts["objective_forward_backward_s"]
    return {"iteration_s": it, "iteration_plain_s": median(times[False]), "parts": parts}


def run(device: str = "cpu", repeats: int = 3) -> dict:
    model, size = CONFIGS["cuda" if device == "cuda" else "cpu"]
    out = {"device": device, "model": model, "image_size": size, "num_steps": NUM_STEPS, "batch_size": 1, "runs": {}}
    for dtype in (["float32", "bfloat16"] if device == "cuda" else ["float32"]):
        cmd = [sys.executable, "-m", "bench.lightningdit", model, str(size), device, dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=measurement_env())
        r = measure(model, size, device, None if dtype == "float32" else dtype, repeats)
        r["peak_memory_mib"] = json.loads(res.stdout.splitlines()[-1])
        out["runs"][dtype] = r
    out["flops"] = iteration_flops()
    if device != "cuda":  # the measured configuration's own count, for the CPU's effective rate
        out["flops_measured_config"] = iteration_flops(model, size)["iteration"]
    return out


def passed(result: dict) -> bool:
    if result["device"] != "cuda":
        return True  # the target is a GPU one; on CPU the numbers are context
    return min(r["iteration_s"] for r in result["runs"].values()) <= TARGET_S


def rows(result: dict) -> list[str]:
    out = []
    cuda = result["device"] == "cuda"
    for dtype, r in result["runs"].items():
        what = f"{result['model']} at {result['image_size']} px, {dtype}"
        it, p = r["iteration_s"], r["parts"]
        ratio = f"{it / TARGET_S:.1f}x the target" if cuda else "-"
        out.append(
            f"| invariant sets on LightningDiT: one Algorithm 1 iteration ({what}, {result['num_steps']}-point "
            f"Euler grid, batch 1, checkpointing), s / peak MiB | {it:.2f} / {r['peak_memory_mib']:.0f} | "
            f"{r['iteration_plain_s']:.2f} (no checkpointing) | {ratio} | <= {TARGET_S} s "
            f"(GPU, XL/1 at 256 px) | {('yes' if it <= TARGET_S else 'NO') if cuda else '-'} |")
        out.append(
            f"| ... where the time goes ({dtype}): chain forward / chain backward (recompute + backward) / VA-VAE "
            f"decode fwd+bwd / ResNet-50 on x and F(x) fwd+bwd, s | {p['chain_forward_s']:.2f} / "
            f"{p['chain_backward_s (rest)']:.2f} / {p['decode_forward_backward_s']:.2f} / "
            f"{p['objective_forward_backward_s']:.2f} | one network forward {p['network_forward_s'] * 1e3:.1f} ms | - "
            "| context | - |")
    f = result["flops"]
    floor = f["h200_floor_s"]
    out.append(
        f"| floating-point work of one iteration, {f['model']} at {f['image_size']} px (counted), TFLOP | "
        f"{f['iteration'] / 1e12:.1f} (chain {f['chain_checkpointed'] / f['iteration']:.0%}) | H200 floor: "
        f"{floor['bf16']:.3f} s bf16, {floor['tf32']:.3f} s tf32, {floor['fp32']:.2f} s fp32 (arithmetic); "
        f"{f['h200_weight_read_floor_s']['bf16']:.3f} s bf16, {f['h200_weight_read_floor_s']['fp32']:.3f} s "
        f"fp32/tf32 (reading the weights) | - | context | - |")
    if "flops_measured_config" in result:
        r = result["runs"]["float32"]
        out.append(f"| ... this machine's effective rate on the measured configuration, GFLOP/s | "
                   f"{result['flops_measured_config'] / r['iteration_s'] / 1e9:.1f} | - | - | context | - |")
    return out


if __name__ == "__main__":
    model, size, dev, dt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(json.dumps(measure_memory(model, size, dev, None if dt == "float32" else dt)))
