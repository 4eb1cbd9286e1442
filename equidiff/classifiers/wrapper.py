"""The classifier input contract, owned in one place.

Diffusion images are float NCHW in [-1, 1]. Every classifier in equidiff is wrapped in
``Classifier``, which maps that to what the network was trained on: its value range ([0, 1]
or [-1, 1]), optionally clamped to that range, its mean/std normalisation (skip it when the network
normalises internally), its channel count and its input size (resized only when ``resize=True``;
otherwise a size mismatch is an error, never a silent resample).

Precision and speed options (``equidiff.utils.precision``): ``dtype`` holds the network's weights in that dtype
(e.g. ``"bfloat16"``; the mapped input is cast to it and the logits back to the input's dtype, so gradients
w.r.t. the input and every loss stay fp32), ``channels_last`` (NHWC on CUDA; nothing on the CPU) and ``compile``
(``torch.compile`` of the network: False, True or a dict of options).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from equidiff.errors import ConfigError
from equidiff.utils.precision import compile_module, module_dtype, prepare_input, resolve_dtype, to_channels_last


def _size2(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return tuple(int(s) for s in size)


class Classifier(nn.Module):
    """Wrap ``net`` so that ``forward(x)`` takes diffusion images in [-1, 1] and returns logits.

    Args:
        net: the network; it receives images in ``input_range``, normalised by ``mean``/``std``.
        input_range: (low, high) the network expects, (0, 1) or (-1, 1).
        clamp: clamp the mapped input to ``input_range`` before normalising, as MadryLab robustness'
            ``InputNormalize`` does (``torch.clamp(x, 0, 1)``). Its gradient is zero for every input
            value outside the range, so guidance computed on a noisy x_t gets no classifier gradient
            on the pixels outside [-1, 1] (README, robust-energy section).
        mean, std: per-channel normalisation applied after the range mapping (None: none).
        channels: input channels the network expects (None: not checked).
        image_size: input size the network expects, int or (H, W) (None: not checked).
        resize: resize inputs of another size to ``image_size`` (bilinear, antialiased).
        gray_to_rgb: repeat 1-channel inputs to 3 channels when the network wants 3.
        num_classes: number of logits (None: not checked).
        class_names: optional names of the classes, for plots and reports.
        dtype, channels_last, compile: module docstring.
    """

    def __init__(self, net: nn.Module, *, input_range: Sequence[float] = (0.0, 1.0), clamp: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels: int | None = None, image_size=None, resize: bool = False,
                 gray_to_rgb: bool = False, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, dtype: str | None = None, channels_last: bool = False,
                 compile=False):
        super().__init__()
        lo, hi = (float(v) for v in input_range)
        if hi <= lo:
            raise ConfigError(f"classifier input_range must be (low, high) with low < high, "
                              f"got {input_range}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std for the classifier's normalisation, or neither")
        self.net = net.eval()
        self.input_range, self.clamp = (lo, hi), bool(clamp)
        self.channels, self.image_size = channels, _size2(image_size)
        self.resize, self.gray_to_rgb = resize, gray_to_rgb
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        else:
            self.mean = self.std = None
        if dtype is not None:
            self.net.to(resolve_dtype(dtype))
        self.channels_last, self._nhwc_done = bool(channels_last), False
        compile_module(self.net, compile)

    # ---------------------------------------------------------------- contract
    def check_compatible(self, image_shape: Sequence[int]) -> None:
        """Raise a ConfigError if images of ``image_shape`` (C, H, W) cannot be fed to this classifier."""
        c, h, w = (int(v) for v in image_shape)
        if self.channels is not None and c != self.channels and not (self.gray_to_rgb and c == 1
                                                                     and self.channels == 3):
            raise ConfigError(
                f"the classifier expects {self.channels}-channel images but the diffusion model makes "
                f"{c}-channel ones; pick a matching classifier/diffusion pair"
                + (" or set classifier.gray_to_rgb=true" if c == 1 and self.channels == 3 else ""))
        if self.image_size is not None and (h, w) != self.image_size and not self.resize:
            raise ConfigError(
                f"the classifier expects {self.image_size[0]}x{self.image_size[1]} images but the diffusion "
                f"model makes {h}x{w} ones; set classifier.resize=true to resize, or pick a matching pair")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] diffusion images -> the network's input (differentiable).

        A classifier without channels, image_size or mean/std (e.g. the circles ``MLP``) also takes
        feature vectors (N, F); only the range mapping applies to them.
        """
        vectors_ok = self.channels is None and self.image_size is None and self.mean is None
        if x.ndim != 4 and not (x.ndim == 2 and vectors_ok):
            raise ValueError(f"classifier input must be NCHW, got shape {tuple(x.shape)}")
        if x.ndim == 4:
            self.check_compatible(x.shape[1:])
            if self.gray_to_rgb and x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        lo, hi = self.input_range
        x = (x + 1) * 0.5 * (hi - lo) + lo
        if self.clamp:
            x = x.clamp(lo, hi)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.is_cuda and not self._nhwc_done:
            to_channels_last(self.net)
            self._nhwc_done = True
        h = prepare_input(self.preprocess(x), module_dtype(self.net, x.dtype), self.channels_last)
        logits = self.net(h)
        if x.is_floating_point():
            logits = logits.to(x.dtype)
        if self.num_classes is not None and logits.shape[-1] != self.num_classes:
            raise ConfigError(f"the classifier returned {logits.shape[-1]} logits, expected num_classes="
                              f"{self.num_classes}")
        return logits
