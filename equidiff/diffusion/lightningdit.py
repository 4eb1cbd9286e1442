"""LightningDiT (Yao et al., CVPR 2025) with its VA-VAE tokenizer: the network, a one-time converter, the backbone.

Seed 000 runs Algorithm 1 on LightningDiT-XL/1 (FID 1.35 on ImageNet 256 with CFG). Its released files are
plain PyTorch checkpoints (``lightningdit-xl-imagenet256-800ep.pt``, ``-64ep.pt``), the VA-VAE tokenizer
(``vavae-imagenet256-f16d32-dinov2.pt``) and the latent statistics (``latents_stats.pt``). Convert them once:

    python -m equidiff.diffusion.lightningdit CKPT VAE STATS OUT_DIR --model LightningDiT-XL/1

OUT_DIR (read by ``load_lightningdit``, ``diffusion=lightningdit_imagenet256``) holds ``lightningdit.json``
(architecture and latent multiplier), ``transformer.safetensors`` (the network, the reference's key names),
``vae/`` (a diffusers ``AutoencoderKL``, ``equidiff.diffusion.vavae``) and ``latent_stats.safetensors``.

The network is written from the paper and the reference's ``models/lightningdit.py``: a DiT (patch embedding
plus fixed 2D sin-cos positions, adaLN-modulated blocks, class embedding with the null class ``num_classes``
for classifier-free guidance) with LightningDiT's options: SwiGLU feed-forward (``use_swiglu``), RMSNorm
(``use_rmsnorm``, torch's ``nn.RMSNorm``), EVA-02's 2D rotary embedding on q and k (``use_rope``), RMS/Layer
norm of q and k (``use_qknorm``), adaLN without shift (``wo_shift``), learned sigma (``learn_sigma``; off in
the released models). Module names equal the reference's, so its state dicts load as they are (strictly)
after the ``ema`` / ``model`` entry is taken and ``module.`` prefixes are stripped. Attention is
``F.scaled_dot_product_attention``; the two timm layers it uses (``PatchEmbed``: a strided conv; ``Mlp``:
fc1-GELU(tanh)-fc2) are written out here (two lines each) rather than adding timm as a dependency.

``LightningDiTBackbone`` is the flow-matching backbone: ``backbone(z_t, t, class_labels=y) -> v``, the
velocity at time t in [0, 1] of the linear path (``equidiff.diffusion.flow``), with the reference's
classifier-free guidance (``forward_with_cfg``): for t >= ``cfg_interval_start`` the guided velocity
v_u + s (v_c - v_u) on the first ``cfg_channels`` channels (3: the reference's choice, inherited from DiT's
code and kept for equality with its FID; None: all channels) and v_c elsewhere; below the start, v_c alone.
Latents are normalised with the channel statistics: ``decode(z) = vae.decode(z * std / multiplier + mean)``,
as the reference's ``inference.py`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from equidiff.diffusion.backbones import DiffusionBackbone
from equidiff.diffusion.flow import FlowMatchScheduler
from equidiff.errors import ConfigError

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LightningDiTConfig:
    """The reference's ``LightningDiT(...)`` arguments. Defaults: the released ImageNet 256 XL/1 models
    (``configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml``)."""

    input_size: int = 16  # latent side: image_size // 16 for VA-VAE f16
    patch_size: int = 1
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0: the class table has the null class (row num_classes)
    num_classes: int = 1000
    learn_sigma: bool = False
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


# the reference's LightningDiT_models: (depth, hidden_size, patch_size, num_heads)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "LightningDiT-B/1": (12, 768, 1, 12), "LightningDiT-B/2": (12, 768, 2, 12),
    "LightningDiT-L/2": (24, 1024, 2, 16),
    "LightningDiT-XL/1": (28, 1152, 1, 16), "LightningDiT-XL/2": (28, 1152, 2, 16),
}


def preset(name: str, **overrides) -> LightningDiTConfig:
    """The architecture of a named model (``LightningDiT-XL/1`` ...) with the released flags, plus ``overrides``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown LightningDiT model {name!r}; choose one of {sorted(PRESETS)}")
    depth, hidden, patch, heads = PRESETS[name]
    return replace(LightningDiTConfig(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads), **overrides)


# ----------------------------------------------------------------------------- the network


def _norm(dim: int, rms: bool) -> nn.Module:
    """The blocks' norm: RMSNorm (eps 1e-6, learned scale) or LayerNorm without affine (eps 1e-6)."""
    return nn.RMSNorm(dim, eps=1e-6) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, per sample, broadcast over the tokens."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2D sin-cos positions (MAE / DiT): the first half of the channels encodes the
    column, the second the row; each half is [sin(p w), cos(p w)] with w = 10000^(-k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class RotaryEmbedding2D(nn.Module):
    """EVA-02's 2D rotary embedding (the reference's ``VisionRotaryEmbeddingFast``) for a grid x grid image.

    Each head's channels are split in two halves rotated by the token's row and column position; within a half,
    channel pairs (2k, 2k + 1) rotate by angle pos / 10000^(2k / d) (d = head_dim / 2). ``freqs_cos`` and
    ``freqs_sin`` ([grid * grid, head_dim]) are buffers, saved in the state dict as the reference saves them.
    """

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        d = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
        pos = torch.arange(grid) / grid * grid  # the reference's positions (exactly 0..grid-1 for powers of 2)
        angle = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [grid, d], each angle twice
        angle = torch.cat([angle[:, None, :].expand(grid, grid, d), angle[None, :, :].expand(grid, grid, d)], dim=-1)
        self.register_buffer("freqs_cos", angle.cos().reshape(grid * grid, 2 * d))
        self.register_buffer("freqs_sin", angle.sin().reshape(grid * grid, 2 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # (x_2k, x_2k+1) -> (-x_2k+1, x_2k)
        return x * self.freqs_cos + rotated * self.freqs_sin


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a strided convolution; timm's ``PatchEmbed`` without its checks)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256: [cos, sin] of t / 10000^(k / 128)) -> MLP (DiT's)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; with ``class_dropout_prob > 0`` row ``num_classes`` is the null class of CFG."""

    def __init__(self, num_classes: int, hidden_size: int, with_null: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with optional q/k norm and 2D rotary embedding."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rms: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        make = (lambda: nn.RMSNorm(self.head_dim, eps=1e-6)) if rms else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = make() if qk_norm else nn.Identity()
        self.k_norm = make() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwiGLUFFN(nn.Module):
    """w3(silu(x W1) * x W2), with W1 and W2 fused in ``w12`` (the reference's SwiGLUFFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 (timm's ``Mlp`` as DiT uses it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LightningDiTBlock(nn.Module):
    """x + gate * attn(adaLN(norm(x))), then x + gate * ffn(adaLN(norm(x))); modulation from the condition c."""

    def __init__(self, cfg: LightningDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm1, self.norm2 = _norm(h, cfg.use_rmsnorm), _norm(h, cfg.use_rmsnorm)
        self.attn = Attention(h, cfg.num_heads, cfg.use_qknorm, cfg.use_rmsnorm)
        mlp_hidden = int(h * cfg.mlp_ratio)
        self.mlp = SwiGLUFFN(h, int(2 / 3 * mlp_hidden)) if cfg.use_swiglu else Mlp(h, mlp_hidden)
        self.wo_shift = cfg.wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, (4 if cfg.wo_shift else 6) * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, cfg: LightningDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = _norm(h, cfg.use_rmsnorm)
        self.linear = nn.Linear(h, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    """The LightningDiT network: ``net(x, t, y)`` -> the velocity (or, with ``learn_sigma``, its first half).

    ``x`` [B, C, H, W] latents, ``t`` [B] times in [0, 1], ``y`` [B] class labels (``num_classes`` = null).
    Built with PyTorch's default initialisation (not the training one, which zeroes the adaLN and output
    layers): the weights come from a checkpoint, and random ones time the same.
    """

    def __init__(self, cfg: LightningDiTConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ConfigError(f"hidden_size {cfg.hidden_size} must split into {cfg.num_heads} heads of a width "
                              "divisible by 4 (2D rotary embedding)")
        if cfg.input_size % cfg.patch_size:
            raise ConfigError(f"input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}")
        self.config = cfg
        grid = cfg.input_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob > 0)
        self.pos_embed = nn.Parameter(sincos_pos_embed(cfg.hidden_size, grid)[None], requires_grad=False)
        self.feat_rope = RotaryEmbedding2D(cfg.hidden_size // cfg.num_heads, grid) if cfg.use_rope else None
        self.blocks = nn.ModuleList(LightningDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p * p * C] -> [B, C, H, W] (token (h, w) holds the p x p patch, channels last)."""
        p, c = self.config.patch_size, self.config.out_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c, self.feat_rope)
        x = self.unpatchify(self.final_layer(x, c))
        return x[:, : self.config.in_channels] if self.config.learn_sigma else x


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The network's state dict in a loaded LightningDiT checkpoint: its ``ema`` entry (what the reference's
    ``inference.py`` loads), else ``model``, else the dict itself; ``module.`` (DDP) prefixes stripped."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source} holds a {type(obj).__name__}, not a state dict")
    for key in ("ema", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{source} holds no state dict of tensors (looked under 'ema', 'model' and the top level; "
                          f"found keys {list(obj)[:6]})")
    return state


def _hints(missing: list[str], extra: list[str]) -> str:
    keys = " ".join(missing + extra)
    hints = []
    for name, flag in (("w12", "use_swiglu"), ("fc1", "use_swiglu"), ("feat_rope", "use_rope"),
                       ("q_norm", "use_qknorm"), ("norm1.weight", "use_rmsnorm"), ("norm_final.weight", "use_rmsnorm")):
        if name in keys and flag not in hints:
            hints.append(flag)
    return f" (check --{', --'.join(h.replace('_', '-') for h in hints)})" if hints else ""


def load_network(state: dict[str, torch.Tensor], cfg: LightningDiTConfig) -> LightningDiT:
    """``LightningDiT(cfg)`` with ``state`` loaded strictly; a missing, left-over or mis-shaped tensor is an error
    that names the keys and the flags to check."""
    net = LightningDiT(cfg)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    if missing or extra or bad:
        raise ConfigError(
            f"the checkpoint does not match LightningDiT {json.dumps(asdict(cfg))}: {len(missing)} tensors missing "
            f"(e.g. {missing[:4]}), {len(extra)} unexpected (e.g. {extra[:4]}), {len(bad)} of another shape "
            f"(e.g. {bad[:2]}: checkpoint vs model){_hints(missing, extra)}; give --model and the flags it was "
            "trained with (its config's model: section)")
    net.load_state_dict(state, strict=True)
    return net.eval()


# ----------------------------------------------------------------------------- the backbone


class LightningDiTBackbone(DiffusionBackbone):
    """LightningDiT + VA-VAE + latent statistics behind the flow model protocol (module docstring).

    ``forward(z_t, t, class_labels=y) -> v``; ``scheduler`` is a ``FlowMatchScheduler`` (use ``sample_flow`` /
    ``flow_chain``); ``num_classes`` is the null class. ``guidance_scale > 1`` applies CFG as the reference does.
    """

    is_latent = True
    is_flow = True

    def __init__(self, transformer: LightningDiT, vae, scheduler: FlowMatchScheduler, *, latent_mean: torch.Tensor,
                 latent_std: torch.Tensor, latent_multiplier: float = 1.0, guidance_scale: float = 1.0,
                 cfg_interval_start: float = 0.0, cfg_channels: int | None = 3, sample_posterior: bool = False):
        if not getattr(scheduler, "is_flow_matching", False):
            raise ConfigError(f"LightningDiT is a flow-matching model: its scheduler must be a FlowMatchScheduler, got "
                              f"{type(scheduler).__name__}")
        super().__init__(scheduler)
        self.prediction_type = "velocity"  # the flow protocol (equidiff.diffusion.flow), not one of the DDPM types
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        cfg = transformer.config
        self.num_classes = cfg.num_classes
        self.has_null_class = cfg.class_dropout_prob > 0
        c = cfg.in_channels
        if guidance_scale > 1 and not self.has_null_class:
            raise ConfigError("classifier-free guidance needs the null class, and this LightningDiT has none "
                              "(class_dropout_prob = 0)")
        if cfg_channels is not None and not 1 <= cfg_channels <= c:
            raise ConfigError(f"cfg_channels must be in [1, {c}] or null (all channels), got {cfg_channels}")
        if not 0 <= cfg_interval_start <= 1:
            raise ConfigError(f"cfg_interval_start is a time in [0, 1], got {cfg_interval_start}")
        self.guidance_scale, self.cfg_interval_start = float(guidance_scale), float(cfg_interval_start)
        self.cfg_channels = c if cfg_channels is None else int(cfg_channels)
        self.latent_multiplier, self.sample_posterior = float(latent_multiplier), sample_posterior
        self.register_buffer("latent_mean", latent_mean.reshape(1, c, 1, 1).float().clone())
        self.register_buffer("latent_std", latent_std.reshape(1, c, 1, 1).float().clone())

    @property
    def sample_shape(self):
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    @property
    def image_shape(self):
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        c, h, w = self.sample_shape
        return (self.vae.config.out_channels, h * down, w * down)

    def guided(self, t) -> bool:
        """Whether CFG applies at time t (the reference: not below ``cfg_interval_start``)."""
        return self.guidance_scale > 1 and float(t) >= self.cfg_interval_start

    def forward(self, z_t: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("LightningDiT is class-conditional: bind the labels with functools.partial(backbone, "
                             "class_labels=labels) (the null class num_classes for unconditional)")
        b = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device, dtype=torch.float32)
        if t.numel() != 1:
            raise ValueError("one time t per call (the samplers and chains step all samples together)")
        t_b = t.reshape(1).expand(b)
        net_dtype = self.transformer.pos_embed.dtype
        if not self.guided(t):
            return self.transformer(z_t.to(net_dtype), t_b, class_labels).to(z_t.dtype)
        null = torch.full_like(class_labels, self.num_classes)
        out = self.transformer(torch.cat([z_t, z_t]).to(net_dtype), torch.cat([t_b, t_b]),
                               torch.cat([class_labels, null])).to(z_t.dtype)
        cond, uncond = out.chunk(2)
        k = self.cfg_channels
        guided = uncond[:, :k] + self.guidance_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in about [-1, 1]: vae.decode(z * std / multiplier + mean)."""
        return self.vae.decode(z * self.latent_std / self.latent_multiplier + self.latent_mean).sample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        return (z - self.latent_mean) / self.latent_std * self.latent_multiplier


# ----------------------------------------------------------------------------- the folder


CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "lightningdit.json", "transformer.safetensors", "latent_stats.safetensors"


def convert_checkpoint(checkpoint: str | Path, vae_checkpoint: str | Path, stats: str | Path, output_dir: str | Path,
                       cfg: LightningDiTConfig, *, latent_multiplier: float = 1.0, vae_config: dict | None = None,
                       overwrite: bool = False) -> Path:
    """Convert the released LightningDiT, VA-VAE and latent-statistics files into an equidiff folder, atomically.

    Every file is read with ``safe_torch_load`` (``weights_only=True``); the network and the VAE load strictly.
    """
    from safetensors.torch import save_file

    from equidiff.classifiers.safe_load import safe_torch_load
    from equidiff.diffusion.vavae import build_vae, ldm_vae_config, load_latent_stats

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConfigError(f"{output_dir} exists; remove it or pass --overwrite")
    net = load_network(checkpoint_state_dict(safe_torch_load(checkpoint), str(checkpoint)), cfg)
    vae_config = vae_config or ldm_vae_config(z_channels=cfg.in_channels)
    vae = build_vae(safe_torch_load(vae_checkpoint), vae_config)
    mean, std = load_latent_stats(safe_torch_load(stats), cfg.in_channels)
    down = 2 ** (len(vae_config["block_out_channels"]) - 1)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        save_file({"mean": mean, "std": std}, str(tmp / STATS_FILE))
        vae.save_pretrained(str(tmp / "vae"))
        meta = {"model": asdict(cfg), "latent_multiplier": float(latent_multiplier),
                "image_size": cfg.input_size * down,
                "sources": {"checkpoint": str(checkpoint), "vae": str(vae_checkpoint), "latent_stats": str(stats)}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output_dir


def load_lightningdit(path: str, *, guidance_scale: float = 1.0, cfg_interval_start: float = 0.0,
                      cfg_channels: int | None = 3, timestep_shift: float = 0.0, dtype: str | None = None,
                      sample_posterior: bool = False) -> LightningDiTBackbone:
    """Load a folder written by the converter (module docstring) as a ``LightningDiTBackbone``.

    ``guidance_scale``, ``cfg_interval_start``, ``cfg_channels``: classifier-free guidance as the reference samples
    (800-epoch FID 1.35: 6.7, 0.125, 3); ``timestep_shift``: the ODE grid's shift (0.3 in the reference's
    configs), kept in the backbone's ``FlowMatchScheduler``; ``dtype``: e.g. ``bfloat16`` for the network.
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    meta_path = folder / CONFIG_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{folder} is not a converted LightningDiT folder (no {CONFIG_FILE}). Convert the released "
                          "files once: python -m equidiff.diffusion.lightningdit CKPT VAE STATS OUT_DIR --model "
                          "LightningDiT-XL/1, then set diffusion.path=OUT_DIR")
    meta = json.loads(meta_path.read_text())
    known = {f.name for f in fields(LightningDiTConfig)}
    cfg = LightningDiTConfig(**{k: v for k, v in meta["model"].items() if k in known})
    for name in (WEIGHTS_FILE, STATS_FILE, "vae"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder} lacks {name}; convert the checkpoint again (the folder is incomplete)")
    net = load_network(load_file(str(folder / WEIGHTS_FILE)), cfg)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    if dtype:
        net = net.to(getattr(torch, dtype))
    stats = load_file(str(folder / STATS_FILE))
    return LightningDiTBackbone(net, vae, FlowMatchScheduler(timestep_shift=timestep_shift),
                                latent_mean=stats["mean"], latent_std=stats["std"],
                                latent_multiplier=meta.get("latent_multiplier", 1.0), guidance_scale=guidance_scale,
                                cfg_interval_start=cfg_interval_start, cfg_channels=cfg_channels,
                                sample_posterior=sample_posterior)


# ----------------------------------------------------------------------------- command line


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m equidiff.diffusion.lightningdit",
        description="Convert LightningDiT's released checkpoint, its VA-VAE tokenizer and latents_stats.pt into one "
                    "folder for diffusion.path (diffusion=lightningdit_imagenet256). Flags default to the released "
                    "ImageNet 256 models (configs/reproductions/*.yaml).")
    p.add_argument("checkpoint", help="LightningDiT checkpoint (.pt; its 'ema' or 'model' entry is used)")
    p.add_argument("vae", help="VA-VAE checkpoint (vavae-imagenet256-f16d32-dinov2.pt)")
    p.add_argument("stats", help="latents_stats.pt (channel mean and std of the VA-VAE latents)")
    p.add_argument("output_dir", help="the folder to write")
    p.add_argument("--model", default="LightningDiT-XL/1", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (latent side = image / 16)")
    p.add_argument("--latent-multiplier", type=float, default=1.0, help="data.latent_multiplier of its config")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    # the tokenizer's ddconfig (defaults: VA-VAE f16d32, tokenizer/configs/vavae_f16d32.yaml); z channels = in-channels
    p.add_argument("--vae-ch", type=int, default=128)
    p.add_argument("--vae-ch-mult", default="1,1,2,2,4")
    p.add_argument("--vae-num-res-blocks", type=int, default=2)
    p.add_argument("--vae-attn-resolutions", default="16")
    p.add_argument("--vae-resolution", type=int, default=256)
    for f in fields(LightningDiTConfig):
        if f.name in ("depth", "hidden_size", "patch_size", "num_heads", "input_size"):
            continue  # from --model and --image-size
        flag = "--" + f.name.replace("_", "-")
        kind = _bool if f.type in (bool, "bool") else float if f.type in (float, "float") else int
        p.add_argument(flag, type=kind, default=None, metavar=kind.__name__.strip("_").upper())
    return p


def main(argv: list[str] | None = None) -> int:
    from equidiff.diffusion.vavae import ldm_vae_config

    args = _parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(LightningDiTConfig)
             if getattr(args, f.name, None) is not None}
    try:
        try:
            mult = tuple(int(m) for m in args.vae_ch_mult.split(","))
            attn = tuple(int(r) for r in args.vae_attn_resolutions.split(",") if r.strip())
        except ValueError:
            raise ConfigError("--vae-ch-mult and --vae-attn-resolutions are comma-separated integers") from None
        # the tokenizer's own layout (its ddconfig: resolution 256, attention at 16), whatever the image size
        vae_config = ldm_vae_config(ch=args.vae_ch, ch_mult=mult, num_res_blocks=args.vae_num_res_blocks,
                                    attn_resolutions=attn, resolution=args.vae_resolution,
                                    z_channels=given.get("in_channels", 32))
        down = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if args.image_size % down:
            raise ConfigError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling {down}")
        cfg = preset(args.model, input_size=args.image_size // down, **given)
        out = convert_checkpoint(args.checkpoint, args.vae, args.stats, args.output_dir, cfg,
                                 latent_multiplier=args.latent_multiplier, vae_config=vae_config,
                                 overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.model}, {args.image_size} px); use it with diffusion.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
