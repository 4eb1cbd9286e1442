"""DDPM training (Algorithm 1) on the embedded digits, EMA, and the save_pretrained export."""

import functools

import lightning as L
import torch
from diffusers import DDPMScheduler, UNet2DModel

from equidiff.callbacks import SavePretrained
from equidiff.data import DigitsDataModule
from equidiff.diffusion import load_unet
from equidiff.methods import DDPMTraining


def _module(lr=2e-3):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return DDPMTraining(unet, DDPMScheduler(num_train_timesteps=1000),
                        optimizer=functools.partial(torch.optim.AdamW, lr=lr), ema_decay=0.999)


def test_training_lowers_the_loss_and_exports_the_ema_weights(tmp_path):
    module = _module()
    dm = DigitsDataModule(batch_size=64, seed=0)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[Record(), SavePretrained(str(tmp_path / "model"))])
    trainer.fit(module, datamodule=dm)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5

    # the exported folder is a DDPMPipeline with the EMA weights, loadable by equidiff
    backbone = load_unet(str(tmp_path / "model"))
    exported = dict(backbone.unet.named_parameters())
    ema = module.ema_unet()
    for name, p in ema.named_parameters():
        torch.testing.assert_close(exported[name], p)
    raw = dict(module.unet.named_parameters())
    assert any(not torch.allclose(raw[n], p) for n, p in ema.named_parameters())

    # the checkpoint carries the EMA state and restores it
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    fresh = _module()
    fresh.on_load_checkpoint(ckpt)
    for a, b in zip(fresh.ema.shadow_params, module.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b)


def test_save_pretrained_replaces_a_model_atomically(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    SavePretrained(str(target)).save(_module())
    assert not (target / "old.txt").exists() and (target / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_save_pretrained_leaves_an_unchanged_model_untouched(tmp_path):
    # a finished fit re-run exports the same model: later runs fingerprint the weights by size and mtime
    target, module = tmp_path / "model", _module()
    SavePretrained(str(target)).save(module)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.rglob("*") if p.is_file()}
    SavePretrained(str(target)).save(_module())
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.rglob("*") if p.is_file()} == files
    with torch.no_grad():
        next(module.unet.parameters()).add_(1.0)
    module.ema = module.ema.__class__(module.unet.parameters())  # another model: replaced
    SavePretrained(str(target)).save(module)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() != files[weights][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_validation_loss_is_deterministic():
    module = _module()
    dm = DigitsDataModule(batch_size=64, seed=0)
    batch = next(iter(dm.val_dataloader()))
    module.log = lambda *args, **kwargs: None
    losses = []
    for _ in range(2):
        module.validation_step(batch, 0)
        losses.append(module.val_loss.compute().item())
        module.val_loss.reset()
    assert losses[0] == losses[1]
