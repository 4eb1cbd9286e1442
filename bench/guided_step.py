"""Guided DDIM step time / (UNet forward + classifier forward and backward on the same batch).

Target: at most 1.10 (1.0 is the floor: a guided step needs exactly one UNet forward and one
classifier forward + backward with respect to its input; everything else is overhead). The
classifier is a robustness-library CIFAR ResNet (resnet18 by default on CPU; ResNet50 on GPU, the
seed's model), the UNet the benchmark UNet of the other benchmarks, on the same batch.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from bench.common import bench_unet, median, timed
from equidiff.classifiers import Classifier
from equidiff.diffusion import UNetBackbone
from equidiff.guidance import ClassifierGuidance, NegLogLikelihood


def run(batch_size: int = 32, repeats: int = 9, device: str = "cpu", arch: str | None = None) -> dict:
    from robustness import cifar_models

    arch = arch or ("resnet50" if device == "cuda" else "resnet18")
    torch.manual_seed(0)
    net = getattr(cifar_models, arch)(num_classes=10)
    clf = Classifier(net, input_range=(0, 1), mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                     channels=3, image_size=32, num_classes=10).to(device).eval()
    unet = bench_unet().to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    backbone = UNetBackbone(unet, sched)
    guidance = ClassifierGuidance(NegLogLikelihood(clf), scale=10.0).to(device)
    labels = torch.arange(batch_size, device=device) % 10
    guided = guidance(backbone, {"label": labels}, sched)
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False)
    ddim.set_timesteps(100)
    t = ddim.timesteps[50]
    x_t = torch.randn(batch_size, 3, 32, 32, device=device)

    def unet_forward():
        backbone(x_t, t)

    def classifier_forward_backward():
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            torch.autograd.grad(NegLogLikelihood(clf)(x, labels).sum(), x)

    def guided_step():
        ddim.step(guided(x_t, t), t, x_t)

    parts = {"unet": unet_forward, "classifier": classifier_forward_backward, "guided": guided_step}
    times = {k: [] for k in parts}
    with torch.no_grad():
        for f in parts.values():
            f()  # warm-up
        for r in range(repeats):
            order = list(parts) if r % 2 == 0 else list(reversed(parts))
            for k in order:
                times[k].append(timed(parts[k], device))
    med = {k: median(v) for k, v in times.items()}
    ratio = med["guided"] / (med["unet"] + med["classifier"])
    return {"batch_size": batch_size, "device": device, "classifier": arch, "unet_forward_s": med["unet"],
            "classifier_forward_backward_s": med["classifier"], "guided_step_s": med["guided"], "ratio": ratio,
            "target": "<= 1.10", "pass": ratio <= 1.10}
