"""Stand-ins for the FID / IS / precision-recall tests: weight files with random weights, a tiny extractor.

The weight files have the real architectures (torch-fidelity's InceptionV3, torchvision's VGG16) and the
real on-disk format (a ``torch.save`` of a flat state dict), so tests exercise the real loading path.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from torch import nn

from equidiff.metrics.features import INCEPTION_V3_FILE, VGG16_FILE

FIDELITY_SUBDIR = "torch-fidelity"  # ${paths.weights_dir}/torch-fidelity/<file> in the configs


def _no_download(*args, **kwargs):
    return {}  # stands in for load_state_dict_from_url; the (patched) load_state_dict ignores it


def write_fake_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as a flat state dict (about 95 MB, 2-5 s).

    Its constructor downloads the real weights when no path is given: here it runs with the download and
    ``load_state_dict`` patched out. Batch-norm statistics are then set from three images (noise,
    saturated, flat; one forward pass) and the last layer scaled, so that features and logits are O(1)
    rather than vanishing with depth.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with mock.patch.object(tfi, "load_state_dict_from_url", _no_download), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])

    def calibrate(bn, args):  # set each batch norm's statistics from its input, just before it normalises
        bn.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        bn.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    binary = torch.randint(0, 2, (1, 3, 32, 32), dtype=torch.uint8, generator=g) * 255  # saturated samples
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)  # and smooth ones
    images = torch.cat([noise, binary, flat])
    with torch.no_grad():
        (features,) = net.eval()(images)
        for h in hooks:
            h.remove()
        net.fc.weight *= 3.0 / (features @ net.fc.weight.T).std()
    torch.save(net.state_dict(), path)
    return path


def write_fake_vgg16_weights(path: str | Path, seed: int = 0) -> Path:
    """torchvision's VGG16 with random weights (``weights=None``: no download), saved as a flat state dict
    (about 530 MB, 4-5 s)."""
    import torchvision

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return path


def write_fake_fidelity_weights(weights_dir: str | Path, vgg: bool = True) -> Path:
    """``<weights_dir>/torch-fidelity/{weights-inception-2015-12-05-6726825d.pth, vgg16-397923af.pth}``, the
    layout the configs expect (``paths.weights_dir=<weights_dir>``). Existing files are kept, so a
    session-scoped folder is written once. Returns ``weights_dir``."""
    folder = Path(weights_dir) / FIDELITY_SUBDIR
    if not (folder / INCEPTION_V3_FILE).exists():
        write_fake_inception_weights(folder / INCEPTION_V3_FILE)
    if vgg and not (folder / VGG16_FILE).exists():
        write_fake_vgg16_weights(folder / VGG16_FILE)
    return Path(weights_dir)


class FakeExtractor(nn.Module):
    """A tiny stand-in for the fidelity extractors: uint8 NCHW -> fixed random projections of the pixels.

    Provides the features the metrics ask for (``2048``, ``logits_unbiased``, ``fc2_relu``, with small
    sizes), ``extractor_id`` and ``feature_dims``. Each image's features depend on that image alone, bit for
    bit (no matrix product whose blocking could depend on the batch).
    """

    def __init__(self, in_features: int = 3 * 4 * 4, seed: int = 0, extractor_id: str = "fake:0",
                 dims: tuple[int, int, int] = (6, 10, 5)):
        super().__init__()
        self.extractor_id = extractor_id
        self.feature_dims = dict(zip(("2048", "logits_unbiased", "fc2_relu"), dims, strict=True))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(in_features, sum(dims), generator=g, dtype=torch.float64))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        x = images.double().flatten(1) / 255.0
        y = (x[:, :, None] * self.weight[None]).sum(dim=1).float()
        features, logits, vgg = y.split(list(self.feature_dims.values()), dim=1)
        return {"2048": features, "logits_unbiased": 3 * logits, "fc2_relu": vgg.relu()}


def fake_images(n: int, seed: int = 0, shape: tuple[int, int, int] = (3, 4, 4)) -> torch.Tensor:
    """``n`` random uint8 NCHW images."""
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
