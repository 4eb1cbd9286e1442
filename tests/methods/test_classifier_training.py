"""Classifier training through the real configs: training learns (accuracy far above chance after a few epochs), the
reported accuracy is the checkpoint's accuracy computed independently, and a checkpoint written by `equidiff fit`
loads again for `equidiff validate|test` (its hyperparameters are plain containers, so weights_only loading accepts
them)."""

import torch

from equidiff.classifiers.nets import SmallCNN
from equidiff.cli import run
from equidiff.data.embedded import digits_arrays
from tests.helpers import compose_cfg


def _val_accuracy(ckpt, width: int) -> float:
    """The checkpoint's SmallCNN on the digits validation split: argmax of the logits against the labels."""
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    net = SmallCNN(in_channels=1, num_classes=10, width=width).eval()
    net.load_state_dict({k.removeprefix("classifier.net."): v for k, v in state.items()
                         if k.startswith("classifier.net.")})
    images, labels = digits_arrays("val")  # in [-1, 1], the range the in-package nets take without mapping
    with torch.no_grad():
        return (net(images).argmax(-1) == labels).double().mean().item()


def test_training_learns_and_reports_the_checkpoints_accuracy(tmp_path):
    common = [f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", "trainer=cpu", "logger=csv",
              "trainer.enable_progress_bar=false"]
    run(compose_cfg(["experiment=digits/judge_classifier", "trainer.max_epochs=10", *common]), "fit")
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    result = run(compose_cfg(["experiment=digits/judge_classifier", f"ckpt_path={ckpt}", *common]), "validate")
    acc = _val_accuracy(ckpt, width=64)
    assert abs(result[0]["val/acc"] - acc) < 1e-6
    assert acc > 0.7  # 10 classes: chance is 0.1; 10 epochs of the 60 the experiment runs


def test_fit_checkpoint_loads_again_with_adversarial_and_export_settings(tmp_path):
    common = [f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", "trainer=cpu", "logger=csv",
              "trainer.enable_progress_bar=false"]
    run(compose_cfg(["experiment=digits/robust_classifier", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", *common]), "fit")
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert isinstance(hparams["export"], dict) and isinstance(hparams["adversarial"], dict)
    result = run(compose_cfg(["experiment=digits/robust_classifier", f"ckpt_path={ckpt}", "method.adversarial.steps=1",
                              *common]), "validate")
    assert abs(result[0]["val/acc"] - _val_accuracy(ckpt, width=32)) < 1e-6
    assert 0.0 <= result[0]["val/robust_acc"] <= result[0]["val/acc"]
