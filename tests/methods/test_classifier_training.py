"""Classifier training through the real configs: a checkpoint written by `equidiff fit` loads again for
`equidiff validate|test` (its hyperparameters are plain containers, so weights_only loading accepts them)."""

import torch

from equidiff.cli import run
from tests.helpers import compose_cfg


def test_fit_checkpoint_loads_again_with_adversarial_and_export_settings(tmp_path):
    common = [f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", "trainer=cpu", "logger=csv",
              "trainer.enable_progress_bar=false"]
    run(compose_cfg(["experiment=digits/robust_classifier", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", *common]), "fit")
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert isinstance(hparams["export"], dict) and isinstance(hparams["adversarial"], dict)
    result = run(compose_cfg(["experiment=digits/robust_classifier", f"ckpt_path={ckpt}",
                              "trainer.limit_val_batches=1", *common]), "validate")
    assert 0.0 <= result[0]["val/acc"] <= 1.0
