"""guided-diffusion (ADM) checkpoints as diffusers folders: the architecture map and a one-time converter.

ACE's and DiME's released DDPMs (CelebA 128, CelebA-HQ 256, BDD100k) and OpenAI's ImageNet models are
state dicts of guided-diffusion's ``UNetModel``, described by the training script's flags rather than a
config file. Every equidiff sampler, the differentiable chain and ACE read diffusers folders, so convert
each checkpoint once:

    python -m equidiff.diffusion.adm IN.pt OUT_DIR --preset celeba_dime
    python -m equidiff.diffusion.adm IN.pt OUT_DIR --image-size 256 --num-channels 256 \\
        --num-head-channels 64 --attention-resolutions 32,16,8 --diffusion-steps 1000 ...

OUT_DIR is a DDPMPipeline-layout folder (``model_index.json``, ``unet/``, ``scheduler/``) that
``equidiff.diffusion.load_unet`` reads (``diffusion.path=OUT_DIR``). The flags and their defaults are
guided-diffusion's ``model_and_diffusion_defaults()``; the presets hold the flags of the released
checkpoints (ACE's ``scripts/*-attack.sh``).

The map (guided-diffusion -> diffusers ``UNet2DModel``): ``input_blocks`` -> ``conv_in`` and
``down_blocks`` (ResBlock -> ``ResnetBlock2D``, AttentionBlock -> ``Attention``, the down-sampling
ResBlock or strided conv -> ``downsamplers.0``), ``middle_block`` -> ``mid_block``, ``output_blocks`` ->
``up_blocks``, ``out`` -> ``conv_norm_out``/``conv_out``, ``time_embed`` -> ``time_embedding``,
``label_emb`` -> ``class_embedding``; ``use_scale_shift_norm`` is ``resnet_time_scale_shift="scale_shift"``,
``resblock_updown`` is ``downsample_type``/``upsample_type="resnet"``. The fused ``qkv`` 1x1 convolution
is split into ``to_q``/``to_k``/``to_v`` in the head layout of the checkpoint's attention order (legacy:
heads outermost; new: q, k, v outermost).

One thing diffusers' ``UNet2DModel`` cannot express: guided-diffusion's ``--num_heads N`` keeps N heads
at every attention level, so the head width changes with the channel count (DiME's CelebA model: 4 heads
of 64, 96 and 128 channels), while ``UNet2DModel`` has one ``attention_head_dim``. ``ADMUNet2DModel`` is
``UNet2DModel`` with one extra config entry, ``attention_num_heads``, that fixes the head count; it saves
and loads like any diffusers model (``_class_name`` in its config.json tells ``load_unet`` to use it).

Learned variance (``--learn_sigma True``) gives 2C output channels (eps, then the variance interpolation
v). ``UNetBackbone(x_t, t)`` returns the eps half (every sampler); ``UNetBackbone(x_t, t, with_variance=True)``
returns both, which the DDPM steps turn into guided-diffusion's learned variance (``equidiff.diffusion.ddpm``;
ACE uses it). The saved scheduler keeps ``variance_type="fixed_small"``, the variance of eps-only DDPM use.
The scheduler is guided-diffusion's: ``linear`` betas scaled by 1000 / steps (1e-4 .. 0.02 at 1000
steps), or ``cosine`` (diffusers' ``squaredcos_cap_v2``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention

from equidiff.errors import ConfigError
from equidiff.utils.io import temp_dir_beside

# ----------------------------------------------------------------------------- the flags


@dataclass(frozen=True)
class ADMFlags:
    """guided-diffusion's model and diffusion flags (``model_and_diffusion_defaults()``), as used to train."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int = 1000
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    in_channels: int = 3
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    def mults(self) -> tuple[int, ...]:
        """``channel_mult``, with guided-diffusion's per-size default when empty."""
        if self.channel_mult:
            try:
                mults = tuple(float(m) for m in self.channel_mult.split(","))
            except ValueError:
                raise ConfigError(f"channel_mult must be comma-separated numbers, got {self.channel_mult!r}") from None
        else:
            defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
            if self.image_size not in defaults:
                raise ConfigError(f"no default channel_mult for image_size {self.image_size} (guided-diffusion "
                                  f"has them for {sorted(defaults)}); give --channel-mult")
            mults = defaults[self.image_size]
        if mults[0] != 1 or any(m != int(m) for m in mults):
            raise ConfigError(f"channel_mult {mults}: diffusers' UNet2DModel needs integer multipliers starting at 1 "
                              "(its time embedding width is the first block's width)")
        return tuple(int(m) for m in mults)

    def attention_levels(self) -> set[int]:
        """Levels (0 = full resolution) with attention: downsampling factor 2**level in image_size // res."""
        try:
            ds = {self.image_size // int(r) for r in self.attention_resolutions.split(",") if r.strip()}
        except ValueError:
            raise ConfigError("attention_resolutions must be comma-separated resolutions, got "
                              f"{self.attention_resolutions!r}") from None
        return {level for level in range(len(self.mults())) if 2 ** level in ds}

    def heads(self, channels: int, upsample: bool = False) -> int:
        """guided-diffusion's AttentionBlock head count at a block of ``channels`` channels."""
        if self.num_head_channels == -1:
            n = self.num_heads_upsample if upsample and self.num_heads_upsample != -1 else self.num_heads
            if channels % n:
                raise ConfigError(f"{channels} channels do not split into num_heads={n} heads")
            return n
        if channels % self.num_head_channels:
            raise ConfigError(f"{channels} channels do not split into heads of num_head_channels="
                              f"{self.num_head_channels}")
        return channels // self.num_head_channels


# the released checkpoints' flags (ACE scripts/*-attack.sh, OpenAI's guided-diffusion README)
PRESETS: dict[str, ADMFlags] = {
    # DiME's CelebA DDPM (huggingface.co/guillaumejs2403/DiME), used by ACE on CelebA at 128 px
    "celeba_dime": ADMFlags(image_size=128, num_channels=128, num_res_blocks=2, num_heads=4,
                            attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True,
                            diffusion_steps=500),
    # ACE's CelebA-HQ DDPM (huggingface.co/guillaumejs2403/ACE), 256 px
    "celebahq_ace": ADMFlags(image_size=256, num_channels=128, num_res_blocks=2, num_head_channels=64,
                             attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True,
                             diffusion_steps=500),
    # ACE's BDD100k DDPM, 256 px
    "bdd100k_ace": ADMFlags(image_size=256, num_channels=128, num_res_blocks=2, num_head_channels=64,
                            channel_mult="1,2,3,4", attention_resolutions="16,8", learn_sigma=True,
                            resblock_updown=True, diffusion_steps=1000),
    # OpenAI's 256x256_diffusion_uncond.pt (ACE on ImageNet, DVCEs)
    "imagenet256_uncond": ADMFlags(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64,
                                   attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True,
                                   diffusion_steps=1000),
    # OpenAI's class-conditional 256x256_diffusion.pt
    "imagenet256_cond": ADMFlags(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64,
                                 attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True,
                                 class_cond=True, diffusion_steps=1000),
}


# ----------------------------------------------------------------------------- the diffusers model


class ADMUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with a fixed number of attention heads at every level (``attention_num_heads``).

    Needed for guided-diffusion models trained with ``--num_heads N`` (module docstring); with
    ``attention_num_heads=None`` it is exactly ``UNet2DModel``. Loads with ``ADMUNet2DModel.from_pretrained``.
    """

    ignore_for_config = ["kwargs"]

    @register_to_config
    def __init__(self, attention_num_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if attention_num_heads:
            for module in self.modules():
                if isinstance(module, Attention):
                    if module.inner_dim % attention_num_heads:
                        raise ConfigError(f"an attention layer of {module.inner_dim} channels does not split into "
                                          f"{attention_num_heads} heads")
                    module.heads = attention_num_heads
                    module.scale = (module.inner_dim // attention_num_heads) ** -0.5

    @staticmethod
    def _get_init_keys(input_class):
        # diffusers reads a model's config entries off its __init__ signature; ours forwards UNet2DModel's
        keys = set(inspect.signature(input_class.__init__).parameters)
        if isinstance(input_class, type) and issubclass(input_class, ADMUNet2DModel):
            keys |= set(inspect.signature(UNet2DModel.__init__).parameters)
        return keys


def unet_config(flags: ADMFlags) -> dict:
    """The ``ADMUNet2DModel`` config equivalent to guided-diffusion's ``create_model(**flags)``."""
    mults, attn = flags.mults(), flags.attention_levels()
    ch = [flags.num_channels * m for m in mults]
    plain_down = "ResnetDownsampleBlock2D" if flags.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if flags.resblock_updown else "UpBlock2D"
    down = [("AttnDownBlock2D" if level in attn else plain_down) for level in range(len(mults))]
    up = [("AttnUpBlock2D" if level in attn else plain_up) for level in reversed(range(len(mults)))]
    # heads: one head width (diffusers' attention_head_dim) when --num_head_channels is set, else a fixed count
    fixed = flags.num_head_channels == -1
    for level in [*attn, len(mults) - 1]:  # every attention layer, the middle block's included
        flags.heads(ch[level]), flags.heads(ch[level], upsample=True)
    if fixed and flags.num_heads_upsample not in (-1, flags.num_heads):
        raise ConfigError(f"num_heads_upsample={flags.num_heads_upsample} differs from num_heads={flags.num_heads}; "
                          "ADMUNet2DModel keeps one head count")
    return {
        "sample_size": flags.image_size, "in_channels": flags.in_channels,
        "out_channels": flags.in_channels * (2 if flags.learn_sigma else 1),
        "block_out_channels": ch, "layers_per_block": flags.num_res_blocks,
        "down_block_types": down, "up_block_types": up,
        "downsample_type": "resnet" if flags.resblock_updown else "conv",
        "upsample_type": "resnet" if flags.resblock_updown else "conv",
        "resnet_time_scale_shift": "scale_shift" if flags.use_scale_shift_norm else "default",
        "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
        "attention_head_dim": None if fixed else flags.num_head_channels,
        "attention_num_heads": flags.num_heads if fixed else None,
        "num_class_embeds": flags.num_classes if flags.class_cond else None,
        "dropout": 0.0,
    }


def scheduler_for(flags: ADMFlags) -> DDPMScheduler:
    """guided-diffusion's beta schedule as a diffusers DDPMScheduler (epsilon prediction)."""
    n = flags.diffusion_steps
    if flags.noise_schedule == "linear":  # get_named_beta_schedule("linear"): scaled to the step count
        scale = 1000 / n
        return DDPMScheduler(num_train_timesteps=n, beta_schedule="linear", beta_start=scale * 1e-4,
                             beta_end=scale * 0.02, variance_type="fixed_small", prediction_type="epsilon")
    if flags.noise_schedule == "cosine":
        return DDPMScheduler(num_train_timesteps=n, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                             prediction_type="epsilon")
    raise ConfigError(f"noise_schedule must be 'linear' or 'cosine', got {flags.noise_schedule!r}")


# ----------------------------------------------------------------------------- the state-dict map


def _resblock(prefix: str, target: str) -> dict[str, str]:
    pairs = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{prefix}.{a}.{p}": f"{target}.{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def _sampler(prefix: str, target: str, resblock: bool, conv_name: str) -> dict[str, str]:
    if resblock:
        return _resblock(prefix, target)
    return {f"{prefix}.{conv_name}.{p}": f"{target}.conv.{p}" for p in ("weight", "bias")}


def _attention(src: dict, prefix: str, target: str, heads: int, new_order: bool) -> dict[str, torch.Tensor]:
    """Split guided-diffusion's fused qkv (a 3C x C x 1 conv) into diffusers' to_q / to_k / to_v."""
    w, b = src[f"{prefix}.qkv.weight"], src[f"{prefix}.qkv.bias"]
    c = w.shape[1]
    d = c // heads
    # QKVAttentionLegacy reads the 3C channels as [head][q|k|v][d]; QKVAttention as [q|k|v][head][d]
    w = w[..., 0].reshape(3, heads, d, c) if new_order else w[..., 0].reshape(heads, 3, d, c).transpose(0, 1)
    b = b.reshape(3, heads, d) if new_order else b.reshape(heads, 3, d).transpose(0, 1)
    out = {f"{target}.group_norm.{p}": src[f"{prefix}.norm.{p}"] for p in ("weight", "bias")}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{target}.{name}.weight"] = w[i].reshape(c, c).contiguous()
        out[f"{target}.{name}.bias"] = b[i].reshape(c).contiguous()
    out[f"{target}.to_out.0.weight"] = src[f"{prefix}.proj_out.weight"][..., 0].contiguous()
    out[f"{target}.to_out.0.bias"] = src[f"{prefix}.proj_out.bias"]
    return out


def convert_state_dict(state: dict[str, torch.Tensor], flags: ADMFlags) -> dict[str, torch.Tensor]:
    """guided-diffusion ``UNetModel`` state dict -> ``ADMUNet2DModel(**unet_config(flags))`` state dict.

    Raises ConfigError naming the keys when the checkpoint does not match the flags (missing or left over).
    """
    mults, attn, r = flags.mults(), flags.attention_levels(), flags.num_res_blocks
    ch = [flags.num_channels * m for m in mults]
    renames = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    names = {f"{a}.{p}": f"{b}.{p}" for a, b in renames.items() for p in ("weight", "bias")}
    if flags.class_cond:
        names["label_emb.weight"] = "class_embedding.weight"
    attentions: list[tuple[str, str, int]] = []  # (source prefix, target prefix, heads)

    # input_blocks: [conv_in], then per level R x (ResBlock [+ attention]) and, except at the last level, a downsampler
    idx = 1
    for level in range(len(mults)):
        for j in range(r):
            names.update(_resblock(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}"))
            if level in attn:
                attentions.append((f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}",
                                   flags.heads(ch[level])))
            idx += 1
        if level != len(mults) - 1:
            names.update(_sampler(f"input_blocks.{idx}.0", f"down_blocks.{level}.downsamplers.0",
                                  flags.resblock_updown, "op"))
            idx += 1
    # middle_block: ResBlock, attention, ResBlock
    names.update(_resblock("middle_block.0", "mid_block.resnets.0"))
    attentions.append(("middle_block.1", "mid_block.attentions.0", flags.heads(ch[-1])))
    names.update(_resblock("middle_block.2", "mid_block.resnets.1"))
    # output_blocks: per level, deepest first, R + 1 x (ResBlock [+ attention]), the last one with an upsampler
    idx = 0
    for u, level in enumerate(reversed(range(len(mults)))):
        for j in range(r + 1):
            names.update(_resblock(f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{j}"))
            if level in attn:
                attentions.append((f"output_blocks.{idx}.1", f"up_blocks.{u}.attentions.{j}",
                                   flags.heads(ch[level], upsample=True)))
            if level != 0 and j == r:
                pos = 2 if level in attn else 1
                names.update(_sampler(f"output_blocks.{idx}.{pos}", f"up_blocks.{u}.upsamplers.0",
                                      flags.resblock_updown, "conv"))
            idx += 1

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing = []
    for prefix, target, heads in attentions:
        keys = [f"{prefix}.{k}" for k in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight",
                                           "proj_out.bias")]
        absent = [k for k in keys if k not in state]
        if absent:
            missing += absent
            continue
        out.update(_attention(state, prefix, target, heads, flags.use_new_attention_order))
        used.update(keys)
    for src, dst in names.items():
        if src in state:
            out[dst] = state[src]
            used.add(src)
        elif not src.split(".")[-2] == "skip_connection":  # a 1x1 skip exists only where the width changes
            missing.append(src)
    extra = sorted(set(state) - used)
    if missing or extra:
        raise ConfigError(
            f"the checkpoint does not match the guided-diffusion flags {_flag_summary(flags)}: "
            f"{len(missing)} expected tensors missing (e.g. {missing[:4]}), {len(extra)} unexpected "
            f"(e.g. {extra[:4]}). Check the flags against the script that trained it (--preset for the released "
            "ones; label_emb.* means --class-cond, a 6-channel out.2 means --learn-sigma).")
    return out


def _flag_summary(flags: ADMFlags) -> str:
    default = ADMFlags()
    changed = {k: v for k, v in asdict(flags).items() if getattr(default, k) != v}
    return json.dumps(changed)


def build_unet(state: dict[str, torch.Tensor], flags: ADMFlags) -> ADMUNet2DModel:
    """An ``ADMUNet2DModel`` carrying the converted weights of a guided-diffusion state dict."""
    converted = convert_state_dict(state, flags)
    unet = ADMUNet2DModel(**unet_config(flags))
    expected = unet.state_dict()
    bad = [k for k, v in converted.items() if k not in expected or expected[k].shape != v.shape]
    if bad:
        raise ConfigError(f"converted tensors do not fit the model built from the flags {_flag_summary(flags)}: "
                          f"{[(k, tuple(converted[k].shape)) for k in bad[:4]]}; check the flags")
    absent = sorted(set(expected) - set(converted))
    if absent:
        raise ConfigError(f"the checkpoint lacks tensors the flags {_flag_summary(flags)} need: {absent[:4]}; check "
                          "the flags")
    unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return unet.eval()


def convert_checkpoint(checkpoint: str | Path, output_dir: str | Path, flags: ADMFlags, *,
                       overwrite: bool = False) -> Path:
    """Convert a guided-diffusion checkpoint file into a DDPMPipeline-layout folder, atomically.

    The checkpoint is read with ``safe_torch_load`` (``weights_only=True``): the released ADM files are plain
    state dicts. The folder appears complete or not at all.
    """
    from diffusers import DDPMPipeline

    from equidiff.classifiers.loaders import checkpoint_state_dict
    from equidiff.classifiers.safe_load import safe_torch_load

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConfigError(f"{output_dir} exists; remove it or pass --overwrite")
    state = checkpoint_state_dict(safe_torch_load(checkpoint), str(checkpoint))
    unet = build_unet(state, flags)
    tmp = temp_dir_beside(output_dir)  # the umask's folder mode (mkdtemp alone gives 0700)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler_for(flags)).save_pretrained(tmp)
        (tmp / "adm_flags.json").write_text(json.dumps(asdict(flags), indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output_dir


# ----------------------------------------------------------------------------- command line


def _bool(text: str) -> bool:
    """guided-diffusion's boolean flags (True/False); anything else is an error, not a silent False."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m equidiff.diffusion.adm",
        description="Convert a guided-diffusion (ADM) UNet checkpoint into a diffusers folder for diffusion.path. "
                    "Flags are guided-diffusion's (defaults: model_and_diffusion_defaults()); --preset sets those "
                    "of a released checkpoint, and explicit flags override it.")
    p.add_argument("checkpoint", help="the guided-diffusion .pt state dict")
    p.add_argument("output_dir", help="the diffusers folder to write (model_index.json, unet/, scheduler/)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the flags of a released checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    for f in fields(ADMFlags):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, type=_bool, default=None, metavar="BOOL")
        else:
            p.add_argument(flag, type=int if f.type in (int, "int") else str, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = PRESETS[args.preset] if args.preset else ADMFlags()
    given = {f.name: getattr(args, f.name) for f in fields(ADMFlags) if getattr(args, f.name) is not None}
    flags = replace(flags, **given)
    try:
        out = convert_checkpoint(args.checkpoint, args.output_dir, flags, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({_flag_summary(flags)}); use it with diffusion.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
