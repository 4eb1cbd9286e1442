"""Tiny LightningDiT + VA-VAE files in the released formats, written from the reference's key names (as data).

The key names and shapes below were read off hustvl/LightningDiT (``models/lightningdit.py``: ``LightningDiT``,
``LightningDiTBlock``, ``Attention``, ``SwiGLUFFN``, ``FinalLayer``, ``TimestepEmbedder``, ``LabelEmbedder``,
timm's ``PatchEmbed``, ``VisionRotaryEmbeddingFast``'s buffers) with the released flags (SwiGLU, RoPE, RMSNorm,
no qk-norm, adaLN with shift), and off ``tokenizer/autoencoder.py`` (LDM ``Encoder`` / ``Decoder``:
``ResnetBlock``, ``AttnBlock``, ``Downsample``, ``Upsample``). They are not taken from equidiff's modules, so a
renamed or re-shaped tensor on our side fails to load.
"""

from __future__ import annotations

from pathlib import Path

import torch

# ------------------------------------------------------------------------------ LightningDiT
# shapes in terms of: h hidden, c latent channels, p patch, n tokens, d head width, k classes (+1: the null
# class), m SwiGLU width = int(2/3 * 4h)
LDIT_TOP = {
    "x_embedder.proj.weight": ("h", "c", "p", "p"),
    "x_embedder.proj.bias": ("h",),
    "pos_embed": (1, "n", "h"),
    "t_embedder.mlp.0.weight": ("h", 256),
    "t_embedder.mlp.0.bias": ("h",),
    "t_embedder.mlp.2.weight": ("h", "h"),
    "t_embedder.mlp.2.bias": ("h",),
    "y_embedder.embedding_table.weight": ("k+1", "h"),
    "feat_rope.freqs_cos": ("n", "d"),
    "feat_rope.freqs_sin": ("n", "d"),
    "final_layer.norm_final.weight": ("h",),
    "final_layer.linear.weight": ("ppc", "h"),
    "final_layer.linear.bias": ("ppc",),
    "final_layer.adaLN_modulation.1.weight": ("2h", "h"),
    "final_layer.adaLN_modulation.1.bias": ("2h",),
}
LDIT_BLOCK = {
    "norm1.weight": ("h",),
    "norm2.weight": ("h",),
    "attn.qkv.weight": ("3h", "h"),
    "attn.qkv.bias": ("3h",),
    "attn.proj.weight": ("h", "h"),
    "attn.proj.bias": ("h",),
    "mlp.w12.weight": ("2m", "h"),
    "mlp.w12.bias": ("2m",),
    "mlp.w3.weight": ("h", "m"),
    "mlp.w3.bias": ("h",),
    "adaLN_modulation.1.weight": ("6h", "h"),
    "adaLN_modulation.1.bias": ("6h",),
}
# the tiny stand-in: 4 x 4 latents of 4 channels (the tiny VA-VAE's), patch 1, width 32, 2 blocks of 2 heads
TINY = {"input_size": 4, "patch_size": 1, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "num_classes": 1000}


def _dims(input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes) -> dict[str, int]:
    h = hidden_size
    return {"h": h, "c": in_channels, "p": patch_size, "n": (input_size // patch_size) ** 2, "d": h // num_heads,
            "k+1": num_classes + 1, "ppc": patch_size**2 * in_channels, "2h": 2 * h, "3h": 3 * h, "6h": 6 * h,
            "m": int(2 / 3 * int(4 * h)), "2m": 2 * int(2 / 3 * int(4 * h))}


def reference_layout_state_dict(seed: int = 0, scale: float = 0.2, **arch) -> dict[str, torch.Tensor]:
    """Random tensors under the reference's key names (released flags) for ``arch`` (default: TINY)."""
    arch = {**TINY, **arch}
    dims = _dims(**arch)
    keys = dict(LDIT_TOP)
    for i in range(arch["depth"]):
        keys.update({f"blocks.{i}.{k}": v for k, v in LDIT_BLOCK.items()})
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*[dims[s] if isinstance(s, str) else s for s in shape], generator=g) * scale
            for k, shape in keys.items()}


# ------------------------------------------------------------------------------ VA-VAE (LDM AutoencoderKL)
# (module prefix, kind, in channels, out channels); kinds: LDM's ResnetBlock ("res"), AttnBlock ("attn"),
# 3x3 / 1x1 convolutions, GroupNorm. The tiny layout: ch 32, ch_mult (1, 2), 1 res block, attention at
# resolution 4 of 8 (the lower level), z 4 channels: an f2 autoencoder for 8 x 8 images.
VAE_MODULES = [
    ("encoder.conv_in", "conv3", 3, 32),
    ("encoder.down.0.block.0", "res", 32, 32),
    ("encoder.down.0.downsample.conv", "conv3", 32, 32),
    ("encoder.down.1.block.0", "res", 32, 64),
    ("encoder.down.1.attn.0", "attn", 64, 64),
    ("encoder.mid.block_1", "res", 64, 64),
    ("encoder.mid.attn_1", "attn", 64, 64),
    ("encoder.mid.block_2", "res", 64, 64),
    ("encoder.norm_out", "norm", 64, 64),
    ("encoder.conv_out", "conv3", 64, 8),
    ("decoder.conv_in", "conv3", 4, 64),
    ("decoder.mid.block_1", "res", 64, 64),
    ("decoder.mid.attn_1", "attn", 64, 64),
    ("decoder.mid.block_2", "res", 64, 64),
    ("decoder.up.1.block.0", "res", 64, 64),
    ("decoder.up.1.attn.0", "attn", 64, 64),
    ("decoder.up.1.block.1", "res", 64, 64),
    ("decoder.up.1.attn.1", "attn", 64, 64),
    ("decoder.up.1.upsample.conv", "conv3", 64, 64),
    ("decoder.up.0.block.0", "res", 64, 32),
    ("decoder.up.0.block.1", "res", 32, 32),
    ("decoder.norm_out", "norm", 32, 32),
    ("decoder.conv_out", "conv3", 32, 3),
    ("quant_conv", "conv1", 8, 8),
    ("post_quant_conv", "conv1", 4, 4),
]
TINY_VAE = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,), "resolution": 8,
            "z_channels": 4}
# what the released file carries besides the autoencoder (VA-VAE training: LPIPS / discriminator, DINOv2, the
# alignment projection)
VAE_TRAINING_ONLY = {"loss.logvar": (), "loss.discriminator.main.0.weight": (8, 3, 4, 4),
                     "foundation_model.model.cls_token": (1, 1, 8), "linear_proj.weight": (4, 8, 1, 1)}


def _module_shapes(kind: str, cin: int, cout: int) -> dict[str, tuple]:
    conv = lambda a, b, k: {"weight": (b, a, k, k), "bias": (b,)}  # noqa: E731
    if kind == "conv3":
        return conv(cin, cout, 3)
    if kind == "conv1":
        return conv(cin, cout, 1)
    if kind == "norm":
        return {"weight": (cin,), "bias": (cin,)}
    if kind == "attn":
        out = {"norm.weight": (cin,), "norm.bias": (cin,)}
        for name in ("q", "k", "v", "proj_out"):
            out.update({f"{name}.{k}": v for k, v in conv(cin, cin, 1).items()})
        return out
    out = {"norm1.weight": (cin,), "norm1.bias": (cin,), "norm2.weight": (cout,), "norm2.bias": (cout,)}
    out.update({f"conv1.{k}": v for k, v in conv(cin, cout, 3).items()})
    out.update({f"conv2.{k}": v for k, v in conv(cout, cout, 3).items()})
    if cin != cout:
        out.update({f"nin_shortcut.{k}": v for k, v in conv(cin, cout, 1).items()})
    return out


def ldm_vae_state_dict(seed: int = 1, training_parts: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under LDM's AutoencoderKL key names for the tiny layout (GroupNorm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, kind, cin, cout in VAE_MODULES:
        for name, shape in _module_shapes(kind, cin, cout).items():
            t = torch.randn(*shape, generator=g)
            is_norm_scale = name.endswith("weight") and (kind == "norm" or "norm" in name)
            out[f"{prefix}.{name}"] = 1 + 0.1 * t if is_norm_scale else t * (0.05 if "weight" in name else 0.01)
    if training_parts:
        out.update({k: torch.randn(s, generator=g) for k, s in VAE_TRAINING_ONLY.items()})
    return out


def tiny_vae_config() -> dict:
    from equidiff.diffusion.vavae import ldm_vae_config

    return ldm_vae_config(**TINY_VAE)


# ------------------------------------------------------------------------------ the released files, converted


def write_released_files(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """The three released files, tiny: a train.py-style checkpoint ({'model', 'ema', 'opt'} with DDP ``module.``
    prefixes; the ema entry differs from model), the VA-VAE file ({'state_dict': ...} with its training parts),
    and latents_stats.pt ({'mean', 'std'} of shape [1, C, 1, 1])."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ema = reference_layout_state_dict(seed=seed)
    model = reference_layout_state_dict(seed=seed + 100)
    torch.save({"model": {f"module.{k}": v for k, v in model.items()},
                "ema": {f"module.{k}": v for k, v in ema.items()}, "opt": {"step": torch.tensor(1)}},
               folder / "ldit.pt")
    torch.save({"state_dict": ldm_vae_state_dict(seed=seed + 1)}, folder / "vavae.pt")
    g = torch.Generator().manual_seed(seed + 2)
    c = TINY["in_channels"]
    torch.save({"mean": torch.randn(1, c, 1, 1, generator=g) * 0.5,
                "std": torch.rand(1, c, 1, 1, generator=g) + 0.5}, folder / "latents_stats.pt")
    return folder / "ldit.pt", folder / "vavae.pt", folder / "latents_stats.pt"


def write_tiny_folder(out: Path, seed: int = 0) -> Path:
    """Released-format tiny files converted by the real converter into ``out``."""
    from equidiff.diffusion.lightningdit import LightningDiTConfig, convert_checkpoint

    out = Path(out)
    files = write_released_files(out.parent / f".{out.name}_released", seed=seed)
    return convert_checkpoint(*files, out, LightningDiTConfig(**TINY), vae_config=tiny_vae_config())


def tiny_lightningdit(path: str, **kwargs):
    """Stand-in for ``load_lightningdit(path, ...)`` in the experiments' fast runs: converts the tiny released
    files into ``path`` unless a folder is there, and loads it with the real loader."""
    from equidiff.diffusion.lightningdit import load_lightningdit

    if not (Path(path) / "lightningdit.json").exists():
        write_tiny_folder(Path(path))
    return load_lightningdit(path, **kwargs)
