"""Diffusion backbones behind one model-function protocol.

A backbone is an ``nn.Module`` whose ``forward(x_t, t, **cond)`` returns the predicted noise
eps (whatever the network's own ``prediction_type``), so every sampler, guidance wrapper and
the differentiable chain speak one protocol, ``model_fn(x_t, t) -> eps``. It also carries:

* ``scheduler``: the diffusers scheduler the weights were trained with (read-only template;
  samplers build fresh copies),
* ``sample_shape``: (C, H, W) of x_T (latent shape for latent models),
* ``image_shape``: (C, H, W) of decoded images in [-1, 1],
* ``decode(z)`` / ``encode(x)``: identity for pixel models; the VAE with its scaling factor
  for latent models.

Precision and speed options of the loaders (``equidiff.utils.precision``): ``dtype`` (the network's weights, e.g.
``"bfloat16"``; the adapter casts x_t to it and eps back to x_t's dtype, so samplers keep an fp32 state),
``channels_last`` (NHWC convolutions on CUDA; nothing on the CPU) and ``compile`` (``torch.compile`` of the
denoising network: False, True or a dict of ``torch.compile`` options).

Loaders read a local folder (``save_pretrained`` layout) or a hub id through
``from_pretrained``. Nothing is downloaded when ``HF_HUB_OFFLINE=1``; a missing folder or an
uncached hub id is a clear error that says what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.utils.precision import compile_module, module_dtype, prepare_input, resolve_dtype, to_channels_last

_PRED_TYPES = ("epsilon", "sample", "v_prediction")


def _to_eps(out: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, prediction_type: str):
    """Convert a network output of ``prediction_type`` to eps (DDPM / v-param. identities).

    ``alphas_cumprod`` lives on x_t's device (the backbone's buffer): t is looked up there, not read on the host.
    """
    if prediction_type == "epsilon":
        return out
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    ab = alphas_cumprod.index_select(0, t.reshape(-1)).reshape(t.shape).to(x_t.dtype)
    ab = ab.reshape(-1, *([1] * (x_t.ndim - 1))) if ab.ndim else ab
    if prediction_type == "sample":  # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
    if prediction_type == "v_prediction":  # eps = sqrt(ab) v + sqrt(1 - ab) x_t
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {_PRED_TYPES}")


class DiffusionBackbone(nn.Module):
    """Base of the backbone adapters (see module docstring)."""

    is_latent: bool = False
    num_classes: int | None = None  # class-conditional backbones set this

    def __init__(self, scheduler, *, channels_last: bool = False):
        super().__init__()
        self.scheduler = scheduler
        pt = scheduler.config.get("prediction_type", "epsilon")
        if pt not in _PRED_TYPES:
            raise ConfigError(f"scheduler prediction_type {pt!r} is not supported; expected one of {_PRED_TYPES}")
        self.prediction_type = pt
        # alpha_bar on the model's device (moves with .to(device)), for _to_eps; not part of the state dict (None for
        # a scheduler without one, e.g. flow matching)
        ac = getattr(scheduler, "alphas_cumprod", None)
        self.register_buffer("_alphas_cumprod", ac.detach().clone().float() if ac is not None else None,
                             persistent=False)
        self.channels_last = bool(channels_last)
        self._nhwc_done = False

    def _apply(self, fn, recurse=True):
        # the alpha_bar table stays fp32 whatever dtype the network is cast to
        out = super()._apply(fn, recurse)
        if self._alphas_cumprod is not None and self._alphas_cumprod.dtype != torch.float32:
            self._alphas_cumprod = self._alphas_cumprod.float()
        return out

    def _prepare(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x in the network's dtype (NHWC on CUDA with ``channels_last``; the weights converted once)."""
        if self.channels_last and x.is_cuda and not self._nhwc_done:
            to_channels_last(network)
            self._nhwc_done = True
        return prepare_input(x, module_dtype(network), self.channels_last)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.sample_shape

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class UNetBackbone(DiffusionBackbone):
    """Pixel-space ``UNet2DModel`` (e.g. google/ddpm-cifar10-32, or a converted guided-diffusion model,
    ``equidiff.diffusion.adm``) + its scheduler.

    A UNet with twice the input's channels (guided-diffusion's ``learn_sigma``; ``learned_variance`` is
    True) predicts eps, then the variance interpolation values v in [-1, 1]. ``backbone(x_t, t)`` returns eps
    only (the one model protocol, for every sampler and guidance wrapper); ``backbone(x_t, t,
    with_variance=True)`` returns eps and v stacked on the channels (2C), the output the DDPM step uses for
    guided-diffusion's learned variance (``equidiff.diffusion.ddpm``): pass
    ``functools.partial(backbone, with_variance=True)`` as the model function of a DDPM sampler or chain.
    """

    def __init__(self, unet, scheduler, *, channels_last: bool = False, compile=False):
        super().__init__(scheduler, channels_last=channels_last)
        self.unet = unet.eval().requires_grad_(False)
        compile_module(self.unet, compile)

    @property
    def sample_shape(self):
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def learned_variance(self) -> bool:
        cfg = self.unet.config
        return cfg.out_channels == 2 * cfg.in_channels

    def forward(self, x_t: torch.Tensor, t, *, with_variance: bool = False, **cond) -> torch.Tensor:
        out = self.unet(self._prepare(self.unet, x_t), t, **cond).sample.to(x_t.dtype)
        c = x_t.shape[1]
        eps = _to_eps(out[:, :c], x_t, t, self._alphas_cumprod, self.prediction_type)
        if not with_variance:
            return eps
        if out.shape[1] != 2 * c:
            raise ConfigError(f"with_variance=True needs a UNet that learns its variance (2 x {c} output channels, "
                              f"guided-diffusion's learn_sigma); this one has {out.shape[1]}")
        return torch.cat([eps, out[:, c:]], dim=1)


class LatentDiTBackbone(DiffusionBackbone):
    """Class-conditional latent DiT (diffusers ``DiTTransformer2DModel``) + ``AutoencoderKL``.

    ``forward(z_t, t, class_labels=...)`` returns eps; with a learned-sigma transformer
    (out_channels = 2 x latent channels) only the eps half is returned. ``guidance_scale > 1``
    applies classifier-free guidance to all eps channels (null class = ``num_classes``).
    Latents are scaled by the VAE's ``scaling_factor``: ``decode(z) = vae.decode(z / s)``.
    """

    is_latent = True

    def __init__(self, transformer, vae, scheduler, *, guidance_scale: float = 1.0, sample_posterior: bool = False,
                 compile=False):
        super().__init__(scheduler)
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        compile_module(self.transformer, compile)
        self.guidance_scale = float(guidance_scale)
        self.sample_posterior = sample_posterior
        self.scaling_factor = float(vae.config.get("scaling_factor", 0.18215))
        self.num_classes = transformer.config.num_embeds_ada_norm

    @property
    def sample_shape(self):
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def image_shape(self):
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        c, h, w = self.sample_shape
        return (self.vae.config.out_channels, h * down, w * down)

    def forward(self, z_t: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("a class-conditional DiT needs class_labels: bind them with "
                             "functools.partial(backbone, class_labels=labels)")
        b, c = z_t.shape[:2]
        t_b = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(b)
        z_in = self._prepare(self.transformer, z_t)
        if self.guidance_scale > 1:
            null = torch.full_like(class_labels, self.num_classes)
            out = self.transformer(torch.cat([z_in, z_in]), timestep=torch.cat([t_b, t_b]),
                                   class_labels=torch.cat([class_labels, null])).sample[:, :c].to(z_t.dtype)
            cond, uncond = out.chunk(2)
            eps = uncond + self.guidance_scale * (cond - uncond)
        else:
            eps = self.transformer(z_in, timestep=t_b, class_labels=class_labels).sample[:, :c].to(z_t.dtype)
        return _to_eps(eps, z_t, t, self._alphas_cumprod, self.prediction_type)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._prepare(self.vae, z / self.scaling_factor)).sample.to(z.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(self._prepare(self.vae, x)).latent_dist
        return (dist.sample() if self.sample_posterior else dist.mode()).to(x.dtype) * self.scaling_factor


# ----------------------------------------------------------------------------- loading


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _resolve(path: str) -> tuple[str, bool]:
    """(folder or hub id, is_local). A path that exists nowhere and is no hub id is an error."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"diffusion weights path {str(p)!r} is a file; give the folder written by "
                              "save_pretrained (with model_index.json or config.json)")
        return str(p), True
    if _HUB_ID.fullmatch(str(path)):
        return str(path), False
    raise ConfigError(
        f"diffusion weights folder {str(p)!r} does not exist. Train one (e.g. `equidiff fit "
        "experiment=digits/ddpm`) or download one where there is internet (`huggingface-cli download "
        "<id> --local-dir <folder>`), then point diffusion.path at the folder.")


_SHAPE_MISMATCH = re.compile(r"because (\S+) expected shape torch\.Size\((\[.*?\])\), but got torch\.Size\((\[.*?\])\)")


def _weights_source(cls, path: str, is_local: bool, subfolder: str | None) -> tuple[str, str]:
    """(the weight file, the architecture) to name in a mismatch error."""
    if not is_local:
        return f"{path} (hub, subfolder={subfolder})", f"the {cls.__name__} of its config.json"
    folder = Path(path) / (subfolder or "")
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.bin"))
    return str(files[0]) if len(files) == 1 else str(folder), f"the {cls.__name__} of {folder / 'config.json'}"


def _from_pretrained(cls, path: str, is_local: bool, **kwargs):
    from diffusers import ModelMixin

    from equidiff.utils.weights import mismatch_error

    is_model = issubclass(cls, ModelMixin)
    if is_model:  # missing / unexpected keys (after diffusers' own key renames) are an error, not meta tensors
        kwargs["output_loading_info"] = True
    try:
        out = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # hub errors subclass OSError
        if is_model and (m := _SHAPE_MISMATCH.search(str(e))):
            shapes = [tuple(json.loads(s)) for s in m.groups()[1:]]
            raise mismatch_error(*_weights_source(cls, path, is_local, kwargs.get("subfolder")),
                                 mismatched=[(m.group(1), *shapes)]) from e
        if is_local:
            raise ConfigError(f"could not load {cls.__name__} from {path!r} "
                              f"(subfolder={kwargs.get('subfolder')}): {e}") from e
        hint = (" HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache."
                if _offline() else "")
        raise ConfigError(
            f"{path!r} is no existing folder, and loading it as a hub id failed.{hint} Download it where there "
            "is internet "
            f"(`huggingface-cli download {path} --local-dir <folder>`) and set diffusion.path=<folder>. "
            f"Original error: {e}") from e
    if not is_model:
        return out
    model, info = out
    err = mismatch_error(*_weights_source(cls, path, is_local, kwargs.get("subfolder")),
                         missing=info.get("missing_keys", ()), unexpected=info.get("unexpected_keys", ()),
                         # diffusers lists (key, shape in the file, shape of the model)
                         mismatched=[(k, model_shape, file_shape)
                                     for k, file_shape, model_shape in info.get("mismatched_keys", ())])
    if err is not None:
        raise err
    return model


def _subfolders(path: str, is_local: bool, component: str) -> tuple[str | None, str | None]:
    """Pipeline layout (model_index.json + component/ + scheduler/) or a bare model folder."""
    if is_local:
        index = Path(path) / "model_index.json"
        if index.exists():
            names = json.loads(index.read_text())
            if component not in names:
                raise ConfigError(f"{index} has no {component!r} component (it has "
                                  f"{sorted(k for k in names if not k.startswith('_'))})")
            return component, "scheduler"
        if (Path(path) / "config.json").exists():
            return None, None
        raise ConfigError(f"{path!r} is not a diffusers folder: expected model_index.json (a saved pipeline) or "
                          "config.json (a saved model); was it written by save_pretrained?")
    return component, "scheduler"  # hub ids: pipeline layout (google/ddpm-*, facebook/DiT-*)


def _unet_class(path: str, sub: str | None, is_local: bool, default):
    """``ADMUNet2DModel`` for a converted guided-diffusion folder (its config's ``_class_name``), else ``default``."""
    if is_local:
        config = Path(path) / (sub or "") / "config.json"
        if config.exists() and json.loads(config.read_text()).get("_class_name") == "ADMUNet2DModel":
            from equidiff.diffusion.adm import ADMUNet2DModel

            return ADMUNet2DModel
    return default


def load_unet(path: str, *, scheduler=None, dtype: str | None = None, channels_last: bool = False,
              compile=False) -> UNetBackbone:
    """Load a pixel UNet2DModel + scheduler from a pipeline folder / hub id (DDPMPipeline layout).

    ``scheduler``: a built diffusers scheduler to use instead of the saved one (needed for a
    bare model folder without a scheduler). ``dtype``, ``channels_last``, ``compile``: module docstring.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path, is_local = _resolve(path)
    sub, sched_sub = _subfolders(path, is_local, "unet")
    kw = {"torch_dtype": resolve_dtype(dtype)} if dtype else {}
    unet = _from_pretrained(_unet_class(path, sub, is_local, UNet2DModel), path, is_local, subfolder=sub, **kw)
    if scheduler is None:
        if sched_sub is None:
            raise ConfigError(f"{path!r} holds a bare UNet without a scheduler; set diffusion.scheduler "
                              "(e.g. a DDPMScheduler config)")
        scheduler = _from_pretrained(DDPMScheduler, path, is_local, subfolder=sched_sub)
    return UNetBackbone(unet, scheduler, channels_last=channels_last, compile=compile)


def load_dit(path: str, *, scheduler=None, vae_path: str | None = None, guidance_scale: float = 1.0,
             dtype: str | None = None, compile=False) -> LatentDiTBackbone:
    """Load a latent DiT (transformer/ + vae/ + scheduler/, the facebook/DiT-XL-2-256 layout).

    ``dtype`` applies to the transformer and the VAE, ``compile`` to the transformer (module docstring).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    path, is_local = _resolve(path)
    sub, sched_sub = _subfolders(path, is_local, "transformer")
    kw = {"torch_dtype": resolve_dtype(dtype)} if dtype else {}
    transformer = _from_pretrained(DiTTransformer2DModel, path, is_local, subfolder=sub, **kw)
    if vae_path is not None:
        vpath, vlocal = _resolve(vae_path)
        vsub = "vae" if vlocal and (Path(vpath) / "model_index.json").exists() else None
        vae = _from_pretrained(AutoencoderKL, vpath, vlocal, subfolder=vsub, **kw)
    elif sub is None:
        raise ConfigError(f"{path!r} holds a bare transformer; set diffusion.vae_path to an AutoencoderKL folder")
    else:
        vae = _from_pretrained(AutoencoderKL, path, is_local, subfolder="vae", **kw)
    if scheduler is None:
        if sched_sub is None:
            raise ConfigError(f"{path!r} has no scheduler; set diffusion.scheduler")
        scheduler = _from_pretrained(DDIMScheduler, path, is_local, subfolder=sched_sub)
    return LatentDiTBackbone(transformer, vae, scheduler, guidance_scale=guidance_scale, compile=compile)
