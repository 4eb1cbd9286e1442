"""LightningDiT + VA-VAE: the released key layouts convert and load strictly, the network's pieces, CFG, latents.

Equality with the reference code itself (network output, VAE decode, a 10-step Euler sample with shift and CFG
interval) was measured outside the repository on a tiny random configuration: see the README.
"""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from equidiff.diffusion import FlowMatchScheduler, load_lightningdit, sample_flow
from equidiff.diffusion.lightningdit import (
    LightningDiT,
    LightningDiTBackbone,
    LightningDiTConfig,
    RotaryEmbedding2D,
    checkpoint_state_dict,
    load_network,
    main,
    preset,
)
from equidiff.diffusion.vavae import build_vae, convert_vae_state_dict, load_latent_stats
from equidiff.errors import ConfigError
from tests.diffusion.lightningdit_standins import (
    TINY,
    ldm_vae_state_dict,
    reference_layout_state_dict,
    tiny_vae_config,
    write_released_files,
)

CFG = LightningDiTConfig(**TINY)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_files(tmp_path_factory.mktemp("released"))


TINY_FLAGS = ["--model", "LightningDiT-B/1", "--image-size", "8", "--in-channels", "4", "--vae-ch", "32",
              "--vae-ch-mult", "1,2", "--vae-num-res-blocks", "1", "--vae-attn-resolutions", "4",
              "--vae-resolution", "8"]


def _tiny_presets(mp):
    """The CLI takes the sizes from --model: let LightningDiT-B/1 name the tiny sizes for these tests."""
    from equidiff.diffusion import lightningdit

    mp.setattr(lightningdit, "PRESETS", dict(lightningdit.PRESETS, **{
        "LightningDiT-B/1": (TINY["depth"], TINY["hidden_size"], TINY["patch_size"], TINY["num_heads"])}))


@pytest.fixture(scope="module")
def folder(released, tmp_path_factory):
    """The tiny released files converted through the command line."""
    out = tmp_path_factory.mktemp("converted") / "ldit"
    with pytest.MonkeyPatch.context() as mp:
        _tiny_presets(mp)
        assert main([*map(str, released), str(out), *TINY_FLAGS]) == 0
    return out


# ------------------------------------------------------------------------------------ the checkpoint layouts
def test_reference_layout_loads_strictly_into_the_network():
    state = reference_layout_state_dict()
    net = load_network(dict(state), CFG)
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k


def test_checkpoint_entry_and_ddp_prefix(released):
    obj = torch.load(released[0], weights_only=True)
    state = checkpoint_state_dict(obj)
    assert all(not k.startswith("module.") for k in state)
    assert torch.equal(state["pos_embed"], obj["ema"]["module.pos_embed"])  # ema first, as inference.py loads
    state = checkpoint_state_dict({"model": obj["model"]})
    assert torch.equal(state["pos_embed"], obj["model"]["module.pos_embed"])
    plain = reference_layout_state_dict()
    assert checkpoint_state_dict(plain).keys() == plain.keys()
    with pytest.raises(ConfigError, match="no state dict"):
        checkpoint_state_dict({"args": 1})


def test_a_missing_or_extra_key_is_a_clear_error():
    state = reference_layout_state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.w3.bias"}
    with pytest.raises(ConfigError, match=r"1 tensors missing \(e\.g\. \['blocks\.1\.mlp\.w3\.bias'\]\)"):
        load_network(missing, CFG)
    with pytest.raises(ConfigError, match=r"1 unexpected \(e\.g\. \['blocks\.0\.attn\.q_norm\.weight'\]\).*use-qknorm"):
        load_network({**state, "blocks.0.attn.q_norm.weight": torch.ones(16)}, CFG)
    with pytest.raises(ConfigError, match="use-swiglu"):  # the released (SwiGLU) layout with the flag off
        load_network(state, LightningDiTConfig(**TINY, use_swiglu=False))
    with pytest.raises(ConfigError, match="of another shape"):
        load_network(state, LightningDiTConfig(**{**TINY, "num_classes": 10}))


def test_presets_are_the_reference_sizes():
    xl = preset("LightningDiT-XL/1")
    assert (xl.depth, xl.hidden_size, xl.patch_size, xl.num_heads, xl.in_channels) == (28, 1152, 1, 16, 32)
    assert preset("LightningDiT-B/2").patch_size == 2 and preset("LightningDiT-L/2").depth == 24
    with pytest.raises(ConfigError, match="unknown LightningDiT model"):
        preset("LightningDiT-XXL/1")


def test_xl1_is_dit_xl_sized():
    # SwiGLU of width int(2/3 * 4h) has the 8 h^2 weights of DiT's 4h MLP, so LightningDiT-XL is DiT-XL's size
    # (675M parameters, DiT paper Table 1) up to the patch embedding and output layer; counted on the meta device
    with torch.device("meta"):
        net = LightningDiT(preset("LightningDiT-XL/1"))
    trainable = sum(p.numel() for n, p in net.named_parameters() if n != "pos_embed")
    assert net.blocks[0].mlp.w12.out_features == 2 * 3072
    assert abs(trainable - 675e6) / 675e6 < 0.005


# ------------------------------------------------------------------------------------ the network's pieces
def test_adaln_zero_reduces_the_network_to_embed_norm_and_project():
    # zero modulation: the blocks add gate 0 * ..., the final layer applies no shift and no scale; what is left is
    # written out here with plain tensor ops (patch 1: one token per latent pixel, row-major)
    state = reference_layout_state_dict()
    for k in state:
        if "adaLN_modulation" in k:
            state[k] = torch.zeros_like(state[k])
    net = load_network(state, CFG)
    x = torch.randn(2, 4, 4, 4)
    tokens = x.flatten(2).transpose(1, 2) @ state["x_embedder.proj.weight"][:, :, 0, 0].T \
        + state["x_embedder.proj.bias"] + state["pos_embed"]
    normed = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6) * state["final_layer.norm_final.weight"]
    out = normed @ state["final_layer.linear.weight"].T + state["final_layer.linear.bias"]
    expected = out.transpose(1, 2).reshape(2, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 1000])), expected)


def _written_out_forward(s: dict, x, t, y, heads: int):
    """The released LightningDiT (patch 1, SwiGLU, RMSNorm, 2D RoPE, adaLN with shift, no qk-norm) written out with
    plain tensor ops from the paper and DiT's equations, reading the tensors by the reference's key names."""
    b, c, hgt, wid = x.shape
    rms = lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    lin = lambda h, name: h @ s[f"{name}.weight"].T + s[f"{name}.bias"]  # noqa: E731
    # patch 1: one token per latent pixel (row-major), the 1 x 1 patch convolution a matrix product
    tok = x.flatten(2).transpose(1, 2) @ s["x_embedder.proj.weight"][:, :, 0, 0].T + s["x_embedder.proj.bias"]
    tok = tok + s["pos_embed"]
    # t: [cos, sin] of t * 10000^(-k / 128), k < 128, then Linear-SiLU-Linear; c = t_emb + class embedding
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    cond = lin(F.silu(lin(emb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + s["y_embedder.embedding_table.weight"][y]
    n, hd = tok.shape[1], tok.shape[2] // heads

    def rope(q):  # pairs (2i, 2i + 1) -> (-q_2i+1, q_2i), then q cos + rotated sin
        rot = torch.stack([-q[..., 1::2], q[..., 0::2]], dim=-1).reshape(q.shape)
        return q * s["feat_rope.freqs_cos"] + rot * s["feat_rope.freqs_sin"]

    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(cond), p + "adaLN_modulation.1").chunk(6, dim=1)
        a = rms(tok, s[p + "norm1.weight"]) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(a, p + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1) @ v
        tok = tok + g1[:, None] * lin(att.transpose(1, 2).reshape(b, n, -1), p + "attn.proj")
        m = rms(tok, s[p + "norm2.weight"]) * (1 + sc2[:, None]) + sh2[:, None]
        u, w = lin(m, p + "mlp.w12").chunk(2, dim=-1)
        tok = tok + g2[:, None] * lin(F.silu(u) * w, p + "mlp.w3")
        i += 1
    shift, scale = lin(F.silu(cond), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = rms(tok, s["final_layer.norm_final.weight"]) * (1 + scale[:, None]) + shift[:, None]
    out = lin(out, "final_layer.linear")
    return out.transpose(1, 2).reshape(b, c, hgt, wid)


def test_network_equals_its_equations_written_out():
    state = reference_layout_state_dict(seed=3, scale=0.3)
    net = load_network(dict(state), CFG)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([0.05, 0.5, 0.93]), torch.tensor([2, 999, 1000])
    with torch.no_grad():
        ours, expected = net(x, t, y), _written_out_forward(state, x, t, y, heads=TINY["num_heads"])
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_rotary_embedding_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding2D(head_dim=16, grid=4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    rq, rk = rope(q.expand(16, 16)), rope(k.expand(16, 16))  # the same q and k at every token (row-major 4 x 4)
    score = lambda a, b: (rq[a] * rk[b]).sum()  # noqa: E731
    pos = lambda r, c: 4 * r + c  # noqa: E731
    # same offset (1, 2) at different places: same score; rotations keep norms
    torch.testing.assert_close(score(pos(0, 0), pos(1, 2)), score(pos(2, 1), pos(3, 3)))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(16))
    assert not torch.allclose(score(pos(0, 0), pos(1, 2)), score(pos(0, 0), pos(2, 1)))
    # the first half of the channels turns with the row, the second with the column
    torch.testing.assert_close(rq[pos(2, 0), 8:], q[8:])
    torch.testing.assert_close(rq[pos(0, 3), :8], q[:8])


def test_patch_2_output_layout():
    # patch 2: token (i, j) carries the 2 x 2 patch at rows 2i.., columns 2j.., its p*p*C values ordered (p, q, c)
    net = LightningDiT(LightningDiTConfig(**{**TINY, "patch_size": 2}))
    tokens = torch.arange(4 * 16, dtype=torch.float32).reshape(1, 4, 16)  # 2 x 2 tokens of 2*2*4 values
    img = net.unpatchify(tokens)
    assert img.shape == (1, 4, 4, 4)
    # value at (c, row, col) = token (row // 2, col // 2), entry ((row % 2) * 2 + col % 2) * 4 + c
    for c, row, col in [(0, 0, 0), (3, 1, 0), (2, 2, 3), (1, 3, 1)]:
        token, entry = (row // 2) * 2 + col // 2, ((row % 2) * 2 + col % 2) * 4 + c
        assert img[0, c, row, col] == tokens[0, token, entry]


def test_learned_sigma_keeps_the_first_half():
    net = LightningDiT(LightningDiTConfig(**TINY, learn_sigma=True))
    assert net.final_layer.linear.out_features == 8
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        full = net.unpatchify(net.final_layer(net.x_embedder(x) + net.pos_embed, torch.zeros(1, 32)))
    assert full.shape[1] == 8 and net(x, torch.tensor([0.5]), torch.tensor([3])).shape == (1, 4, 4, 4)


# ------------------------------------------------------------------------------------ VA-VAE
def test_vavae_converts_strictly_and_places_the_level_attentions():
    ldm = ldm_vae_state_dict()
    vae = build_vae({"state_dict": ldm}, tiny_vae_config())
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert list(vae.config.up_block_types) == ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    sd = vae.state_dict()
    # LDM's lowest level (1) is diffusers' encoder down_blocks[1] and decoder up_blocks[0]; 1x1 convs -> linear
    torch.testing.assert_close(sd["encoder.down_blocks.1.attentions.0.to_q.weight"],
                               ldm["encoder.down.1.attn.0.q.weight"][:, :, 0, 0])
    torch.testing.assert_close(sd["decoder.up_blocks.0.attentions.1.to_out.0.bias"],
                               ldm["decoder.up.1.attn.1.proj_out.bias"])
    torch.testing.assert_close(sd["decoder.up_blocks.0.attentions.0.group_norm.weight"],
                               ldm["decoder.up.1.attn.0.norm.weight"])
    torch.testing.assert_close(sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"],
                               ldm["decoder.up.0.block.0.nin_shortcut.weight"])
    torch.testing.assert_close(sd["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                               ldm["decoder.up.1.upsample.conv.weight"])
    # every LDM tensor lands somewhere (a converted state dict as large as the source)
    assert len(convert_vae_state_dict({k: v for k, v in ldm.items() if k.startswith(("enc", "dec", "quant", "post"))},
                                      tiny_vae_config())) == len(sd) == sum(
        1 for k in ldm if not k.startswith(("loss.", "foundation_model.", "linear_proj.")))


def test_vavae_level_attention_acts_as_ldm_attnblock():
    # LDM's AttnBlock, written out: h + proj_out(softmax(q^T k / sqrt(c)) v) on GroupNorm(32, eps 1e-6)(h)
    ldm = ldm_vae_state_dict()
    vae = build_vae({"state_dict": ldm}, tiny_vae_config())
    attn = vae.decoder.up_blocks[0].attentions[0]
    h = torch.randn(2, 64, 4, 4)
    p = {k.removeprefix("decoder.up.1.attn.0."): v for k, v in ldm.items() if k.startswith("decoder.up.1.attn.0.")}
    n = F.group_norm(h, 32, p["norm.weight"], p["norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(n, p[f"{x}.weight"], p[f"{x}.bias"]).flatten(2) for x in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k / 64**0.5, dim=-1)  # [b, query, key]
    out = h + F.conv2d((v @ w.transpose(1, 2)).reshape(2, 64, 4, 4), p["proj_out.weight"], p["proj_out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(attn(h), out, rtol=1e-5, atol=1e-5)


def test_vavae_bad_checkpoints_are_clear_errors():
    ldm = ldm_vae_state_dict()
    with pytest.raises(ConfigError, match="missing"):
        build_vae({k: v for k, v in ldm.items() if k != "decoder.up.1.attn.1.q.bias"}, tiny_vae_config())
    with pytest.raises(ConfigError, match="outside the autoencoder"):
        build_vae({**ldm, "model_ema.decay": torch.ones(())}, tiny_vae_config())
    with pytest.raises(ConfigError, match="left over"):
        build_vae({**ldm, "encoder.down.1.attn.2.q.weight": torch.ones(64, 64, 1, 1)}, tiny_vae_config())
    with pytest.raises(ConfigError, match="mean' and 'std"):
        load_latent_stats({"mean": torch.zeros(4)}, 4)
    with pytest.raises(ConfigError, match="4 latent channels"):
        load_latent_stats({"mean": torch.zeros(1, 3, 1, 1), "std": torch.ones(1, 3, 1, 1)}, 4)


# ------------------------------------------------------------------------------------ the converted folder
def test_cli_refuses_a_vae_of_another_layout_and_writes_nothing(released, tmp_path, capsys, monkeypatch):
    _tiny_presets(monkeypatch)
    out = tmp_path / "converted"
    # without the --vae-* flags the converter expects VA-VAE f16d32 (64 px -> 4 x 4 latents); the tiny
    # tokenizer does not match it
    rc = main([*map(str, released), str(out), "--model", "LightningDiT-B/1", "--image-size", "64", "--in-channels",
               "4"])
    assert rc == 2 and not out.exists() and not list(tmp_path.glob(".converted*"))
    assert "VA-VAE checkpoint does not match" in capsys.readouterr().err


def test_folder_holds_the_ema_weights_and_loads(folder, released):
    bb = load_lightningdit(str(folder), timestep_shift=0.3)
    ema = checkpoint_state_dict(torch.load(released[0], weights_only=True))
    for k, v in ema.items():
        assert torch.equal(bb.transformer.state_dict()[k], v), k
    stats = torch.load(released[2], weights_only=True)
    torch.testing.assert_close(bb.latent_mean, stats["mean"])
    assert bb.sample_shape == (4, 4, 4) and bb.image_shape == (3, 8, 8) and bb.num_classes == 1000
    assert bb.scheduler.config.timestep_shift == 0.3
    meta = json.loads((folder / "lightningdit.json").read_text())
    assert meta["model"]["hidden_size"] == 32 and meta["latent_multiplier"] == 1.0


def test_loader_errors_name_the_converter(tmp_path):
    with pytest.raises(ConfigError, match="python -m equidiff.diffusion.lightningdit"):
        load_lightningdit(str(tmp_path))


def test_converter_refuses_an_existing_folder_and_writes_nothing_on_error(released, tmp_path):
    from equidiff.diffusion.lightningdit import convert_checkpoint

    with pytest.raises(ConfigError, match="exists"):
        convert_checkpoint(*released, tmp_path, CFG, vae_config=tiny_vae_config())
    with pytest.raises(ConfigError, match="use-swiglu"):
        convert_checkpoint(*released, tmp_path / "bad", LightningDiTConfig(**TINY, use_swiglu=False),
                           vae_config=tiny_vae_config())
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


# ------------------------------------------------------------------------------------ the backbone
def test_decode_and_encode_apply_the_latent_statistics(folder):
    bb = load_lightningdit(str(folder))
    bb.latent_multiplier = 0.5
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        # inference.py: samples = (samples * latent_std) / latent_multiplier + latent_mean, then vae.decode
        torch.testing.assert_close(bb.decode(z), bb.vae.decode((z * bb.latent_std) / 0.5 + bb.latent_mean).sample)
        x = torch.rand(1, 3, 8, 8) * 2 - 1
        # img_latent_dataset.py: (feature - mean) / std * multiplier
        mode = bb.vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(bb.encode(x), (mode - bb.latent_mean) / bb.latent_std * 0.5)


def test_cfg_combines_as_the_reference_and_switches_exactly_at_the_interval_start(folder):
    bb = load_lightningdit(str(folder), guidance_scale=4.0, cfg_interval_start=0.125, cfg_channels=3)
    net = bb.transformer
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([5, 7])
    null = torch.full_like(y, 1000)

    def parts(t):
        tb = torch.full((2,), t)
        return net(z, tb, y), net(z, tb, null)

    with torch.no_grad():
        start = torch.tensor(0.125)
        below = torch.nextafter(start, torch.tensor(0.0))
        cond, uncond = parts(float(start))
        guided = bb(z, start, class_labels=y)
        # v_u + s (v_c - v_u) on the first 3 channels, v_c on the rest
        torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
        torch.testing.assert_close(guided[:, 3:], cond[:, 3:])
        # one float below the start: the conditional velocity alone
        torch.testing.assert_close(bb(z, below, class_labels=y), parts(float(below))[0], rtol=0, atol=0)
        bb.cfg_channels = 4  # cfg_channels=null: every channel
        all_ch = bb(z, start, class_labels=y)
        torch.testing.assert_close(all_ch, uncond + 4.0 * (cond - uncond))
    assert bb.guided(0.125) and not bb.guided(float(below)) and not load_lightningdit(str(folder)).guided(0.5)


def test_backbone_settings_and_protocol_errors(folder):
    with pytest.raises(ConfigError, match="cfg_channels"):
        load_lightningdit(str(folder), cfg_channels=5)
    with pytest.raises(ConfigError, match="cfg_interval_start"):
        load_lightningdit(str(folder), cfg_interval_start=1.5)
    bb = load_lightningdit(str(folder))
    with pytest.raises(ValueError, match="class_labels"):
        bb(torch.zeros(1, 4, 4, 4), 0.5)
    with pytest.raises(ConfigError, match="FlowMatchScheduler"):
        from diffusers import DDIMScheduler

        LightningDiTBackbone(bb.transformer, bb.vae, DDIMScheduler(), latent_mean=torch.zeros(4),
                             latent_std=torch.ones(4))


def test_classifier_guidance_is_refused_for_the_flow_backbone(folder):
    from equidiff.methods import Sampling

    bb = load_lightningdit(str(folder))
    with pytest.raises(ConfigError, match="guidance=null"):
        Sampling(bb, functools.partial(sample_flow, num_steps=3), guidance=lambda fn, batch, scheduler: fn)
    assert Sampling(bb, functools.partial(sample_flow, num_steps=3)).guidance is None


def test_unguided_sampling_through_the_backbone(folder):
    bb = load_lightningdit(str(folder), guidance_scale=2.0, timestep_shift=0.3)
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    fn = functools.partial(bb, class_labels=torch.tensor([1, 2, 3]))
    with torch.no_grad():
        out = sample_flow(fn, z, bb.scheduler, num_steps=4)
        one = sample_flow(functools.partial(bb, class_labels=torch.tensor([2])), z[1:2], bb.scheduler, num_steps=4)
    torch.testing.assert_close(out[1:2], one, rtol=1e-5, atol=1e-6)  # a sample does not depend on its batch-mates
    assert torch.isfinite(bb.decode(out)).all() and isinstance(bb.scheduler, FlowMatchScheduler)
