"""VA-VAE (Yao et al. 2025), LightningDiT's tokenizer, as a diffusers ``AutoencoderKL``.

The released tokenizer (``vavae-imagenet256-f16d32-dinov2.pt``) is an LDM ``AutoencoderKL`` (taming /
latent-diffusion's ``Encoder``/``Decoder``: ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at
resolution 16, 32 latent channels, so f16 and 16 x 16 x 32 latents for 256 px images). Unlike the SD VAE it
has attention *inside* the lowest-resolution encoder and decoder levels, not only in the middle block.
diffusers' ``AutoencoderKL`` expresses that layout with ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``
(one head of the block's width, GroupNorm eps 1e-6, as LDM's ``AttnBlock``), and diffusers'
``convert_ldm_vae_checkpoint`` maps everything but those level attentions (it treats ``encoder.down.N.attn``
keys as resnet keys and leaves them unmapped), so we hand it the rest and map the level attentions with its
own helper, ``update_vae_attentions_ldm_to_diffusers``.

The checkpoint also holds what VA-VAE's training needs and inference does not: ``loss.*`` (LPIPS and the
discriminator), ``foundation_model.*`` (DINOv2) and ``linear_proj.*`` (the vision-foundation alignment
projection). The reference tokenizer drops ``loss.*`` and loads the rest non-strictly; here every key under
``encoder.``, ``decoder.``, ``quant_conv.`` and ``post_quant_conv.`` must be used and every tensor of the
diffusers model filled (strict), the training-only prefixes are skipped, and any other key is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from equidiff.errors import ConfigError

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
_LEVEL_ATTN = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.")


def ldm_vae_config(*, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                   attn_resolutions: Sequence[int] = (16,), resolution: int = 256, z_channels: int = 32,
                   in_channels: int = 3, out_ch: int = 3) -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM ``AutoencoderKL`` with these ``ddconfig`` entries
    (defaults: VA-VAE f16d32, ``tokenizer/configs/vavae_f16d32.yaml``). A level i (0 = full resolution) has
    attention where resolution / 2**i is in ``attn_resolutions``, in the encoder and in the decoder alike."""
    levels = range(len(ch_mult))
    attn = {i for i in levels if resolution // 2**i in set(attn_resolutions)}
    return {
        "in_channels": in_channels, "out_channels": out_ch, "latent_channels": z_channels,
        "block_out_channels": [ch * m for m in ch_mult], "layers_per_block": num_res_blocks,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in levels],
        "up_block_types": ["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(levels)],
        "norm_num_groups": 32, "act_fn": "silu", "sample_size": resolution, "mid_block_add_attention": True,
        # LightningDiT normalises latents with latents_stats.pt, not a scaling factor (LightningDiTBackbone)
        "scaling_factor": 1.0,
    }


def vae_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The LDM autoencoder's tensors in a loaded VA-VAE checkpoint (top level or under ``state_dict``), without
    the training-only parts. Any other key is an error."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ConfigError("the VA-VAE checkpoint holds no state dict (expected the tensors at the top level or under "
                          "'state_dict')")
    keep = {k: v for k, v in state.items() if k.startswith(VAE_PREFIXES)}
    other = sorted(k for k in state if not k.startswith(VAE_PREFIXES + TRAINING_ONLY_PREFIXES))
    if other:
        raise ConfigError(f"the VA-VAE checkpoint has {len(other)} keys outside the autoencoder and its training parts "
                          f"(e.g. {other[:4]}); is it an LDM AutoencoderKL checkpoint?")
    if not keep:
        raise ConfigError("the VA-VAE checkpoint has no encoder./decoder. tensors; is it an LDM AutoencoderKL "
                          "checkpoint?")
    return keep


def convert_vae_state_dict(state: Mapping[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """LDM ``AutoencoderKL`` state dict -> diffusers ``AutoencoderKL(**config)`` state dict (module docstring)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    level_attn = {k: v for k, v in state.items() if _LEVEL_ATTN.match(k)}
    rest = {k: v for k, v in state.items() if k not in level_attn}
    out = convert_ldm_vae_checkpoint(rest, config)
    n_up = len(config["up_block_types"])
    groups: dict[tuple[str, str], list[str]] = {}
    for key in level_attn:
        part, level, j = _LEVEL_ATTN.match(key).groups()
        if part == "encoder.down":
            groups.setdefault((f"down.{level}.attn.{j}", f"down_blocks.{level}.attentions.{j}"), []).append(key)
        else:  # LDM's decoder levels count up from the full resolution, diffusers' up_blocks from the lowest
            groups.setdefault((f"up.{level}.attn.{j}", f"up_blocks.{n_up - 1 - int(level)}.attentions.{j}"),
                              []).append(key)
    for (old, new), keys in groups.items():
        update_vae_attentions_ldm_to_diffusers(keys, out, level_attn, mapping={"old": old, "new": new})
    return out


def build_vae(checkpoint: Mapping, config: dict | None = None):
    """A diffusers ``AutoencoderKL`` holding a VA-VAE checkpoint's weights, loaded strictly."""
    from diffusers import AutoencoderKL

    config = config or ldm_vae_config()
    state = vae_state_dict(checkpoint)
    converted = convert_vae_state_dict(state, config)
    vae = AutoencoderKL(**config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in converted.items()
           if k in expected and v.shape != expected[k].shape]
    if missing or extra or bad:
        raise ConfigError(
            f"the VA-VAE checkpoint does not match the LDM AutoencoderKL layout {_summary(config)}: "
            f"{len(missing)} tensors missing (e.g. {missing[:4]}), {len(extra)} left over (e.g. {extra[:4]}), "
            f"{len(bad)} of another shape (e.g. {bad[:2]}); check the converter's --vae-* flags and --in-channels "
            "against the tokenizer's ddconfig")
    vae.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return vae.eval()


def _summary(config: dict) -> str:
    return (f"(block_out_channels={config['block_out_channels']}, latent_channels={config['latent_channels']}, "
            f"down_block_types={config['down_block_types']})")


def load_latent_stats(stats: Mapping, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [1, C, 1, 1] float32, from a loaded ``latents_stats.pt`` (``{'mean': ..., 'std': ...}``,
    as the reference's ``ImgLatentDataset.compute_latent_stats`` saves it)."""
    if not isinstance(stats, Mapping) or not {"mean", "std"} <= set(stats):
        raise ConfigError(f"latents_stats.pt must hold 'mean' and 'std' tensors (LightningDiT's latent statistics), "
                          f"found {list(stats)[:6] if isinstance(stats, Mapping) else type(stats).__name__}")
    out = []
    for name in ("mean", "std"):
        v = torch.as_tensor(stats[name]).float()
        if v.numel() != channels:
            raise ConfigError(f"latents_stats.pt's {name} has {v.numel()} values for {channels} latent channels")
        out.append(v.reshape(1, channels, 1, 1).contiguous())
    if (out[1] <= 0).any():
        raise ConfigError("latents_stats.pt's std has non-positive values")
    return out[0], out[1]
