"""Reduced precision and CUDA speed settings: what runs in bf16, what stays in fp32 (DEVELOPERS.md, "Precision").

Two ways to run the networks in bfloat16, usable together:

* ``trainer.precision=bf16-mixed``: Lightning runs ``predict_step`` under ``torch.autocast`` (bf16 matmuls and
  convolutions, fp32 weights).
* a network dtype: ``diffusion.dtype=bfloat16`` (``load_unet`` / ``load_dit``) and ``classifier.dtype=bfloat16``
  (``Classifier``) hold the weights in bf16 (half the memory); the adapters cast the input to the weights' dtype
  and the output back to the caller's (fp32).

Whatever the setting, these stay in fp32: the sampler state x_t (and x_T), the noises, the schedules' numbers
(``DDIMSteps``, ``DDPMSteps``, the guidance tables), the guidance gradients (taken w.r.t. the fp32 x_t), the z_T
that Algorithm 1 optimises and its objective L(x) and loss (``full_precision``), ACE's losses and the
counterfactual solvers (which run with autocast off), and the classifier decisions that end up in the records.
``trainer.precision`` values that cast all of these (``bf16-true``, ``16-true``) are refused for predict.

``tf32`` (root config key): TF32 for fp32 matmuls and convolutions on CUDA (``True``), off (``False``), or torch's
defaults (``None``: cuDNN convolutions use TF32, matmuls do not). ``channels_last`` (backbone and classifier
option) converts convolutional networks to NHWC on CUDA. Both do nothing on the CPU.
"""

from __future__ import annotations

import contextlib

import torch

from equidiff.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Lightning precisions under which equidiff can predict: fp32, fp64, and autocast to bf16
PREDICT_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16")


def resolve_dtype(dtype) -> torch.dtype | None:
    """A dtype from its name (``bfloat16``, ``bf16``, ``float16``, ``float32``), a ``torch.dtype`` or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"unknown network dtype {dtype!r}; choose one of {sorted(DTYPES)} (or null for the weights' "
                          "own dtype)")
    return DTYPES[name]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 values as fp32 (fp32 and fp64 as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def module_dtype(module: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (``default`` without one)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


@contextlib.contextmanager
def full_precision():
    """Autocast off (CPU and CUDA) inside the block: what it computes from fp32 inputs stays fp32."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def set_tf32(enabled: bool | None) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (True / False); None keeps torch's defaults.
    No effect on the CPU."""
    if enabled is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def check_predict_precision(precision) -> None:
    """Refuse a Lightning precision that would cast the sampler state, noises and losses (module docstring)."""
    if str(precision) not in PREDICT_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported for predict: it casts the whole module, "
                          "including the sampler state, the noises and the losses, to reduced precision. Use "
                          "trainer.precision=bf16-mixed (autocast) and/or a network dtype (diffusion.dtype=bfloat16, "
                          "classifier.dtype=bfloat16); see DEVELOPERS.md, Precision")


def prepare_input(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """x in the network's dtype, NHWC on CUDA when ``channels_last`` (a no-op on the CPU)."""
    x = x.to(dtype)
    if channels_last and x.is_cuda and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def compile_module(module: torch.nn.Module, compile) -> None:
    """``torch.compile`` a network in place (``compile``: False, True, or a dict of ``torch.compile`` options)."""
    if compile is False or compile is None:
        return
    options = {} if compile is True else dict(compile)
    module.compile(**options)


def to_channels_last(module: torch.nn.Module) -> None:
    module.to(memory_format=torch.channels_last)
