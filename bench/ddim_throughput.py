"""Unguided DDIM through equidiff vs diffusers' DDIMPipeline on the same UNet (target: >= 0.95x).

Both draw per-sample noise from one generator per seed and run the same number of UNet calls; the
equidiff side is the full ``Sampling.predict_step`` path (generators, x_T, sampler, decode, clamp).
Runs alternate between the two (and which goes first) so that machine drift affects both alike;
the median is reported.
"""

from __future__ import annotations

import torch
from diffusers import DDIMPipeline, DDPMScheduler

from bench.common import bench_unet, median, timed
from equidiff.diffusion import UNetBackbone, sample_ddim
from equidiff.methods import Sampling
from equidiff.utils import generators_for


def run(batch_size: int = 32, num_steps: int = 20, repeats: int = 11, device: str = "cpu") -> dict:
    unet = bench_unet().to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    method = Sampling(UNetBackbone(unet, sched), lambda m, x, s, generators: sample_ddim(
        m, x, s, num_steps=num_steps, eta=0.0, generators=generators)).to(device)
    batch = {"seed": torch.arange(batch_size), "index": torch.arange(batch_size),
             "label": torch.full((batch_size,), -1)}

    def ours():
        method.predict_step(batch, 0)

    def theirs():
        pipe(batch_size=batch_size, generator=generators_for(range(batch_size)), num_inference_steps=num_steps,
             output_type="pt")

    with torch.no_grad():
        ours(), theirs()  # warm-up
        t_ours, t_theirs = [], []
        for r in range(repeats):  # alternate which side goes first
            if r % 2:
                t_theirs.append(timed(theirs, device))
                t_ours.append(timed(ours, device))
            else:
                t_ours.append(timed(ours, device))
                t_theirs.append(timed(theirs, device))
    ips_ours, ips_theirs = batch_size / median(t_ours), batch_size / median(t_theirs)
    return {"batch_size": batch_size, "num_steps": num_steps, "repeats": repeats, "device": device,
            "equidiff_images_per_s": ips_ours, "diffusers_images_per_s": ips_theirs,
            "ratio": ips_ours / ips_theirs, "target": ">= 0.95", "pass": ips_ours / ips_theirs >= 0.95}
