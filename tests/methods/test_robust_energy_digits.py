"""Robust-energy guidance end to end on the embedded digits, through the real experiment configs.

Trains (briefly) the digits DDPM, the adversarially trained CNN and the judge CNN with
`equidiff fit`, then samples with `equidiff predict experiment=digits/robust_energy` with and
without guidance. The judge must assign the guided samples to their target class far more often.
"""

import json

import numpy as np
import pytest

from equidiff.cli import run
from equidiff.errors import ConfigError
from tests.helpers import compose_cfg, load_samples


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cache = root / "cache"
    common = [f"paths.cache_dir={cache}", "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false"]
    run(compose_cfg(["experiment=digits/ddpm", f"paths.output_dir={root}/ddpm", "trainer.max_steps=500",
                     *common]), "fit")
    run(compose_cfg(["experiment=digits/robust_classifier", f"paths.output_dir={root}/robust",
                     "trainer.max_epochs=12", *common]), "fit")
    run(compose_cfg(["experiment=digits/judge_classifier", f"paths.output_dir={root}/judge",
                     "trainer.max_epochs=15", *common]), "fit")
    return root, cache


def _predict(root, cache, name, *extra):
    out = root / name
    run(compose_cfg(["experiment=digits/robust_energy", f"paths.cache_dir={cache}", f"paths.output_dir={out}",
                     "data.num_samples=100", "sampler.num_steps=25", "trainer=cpu", "logger=csv", *extra]), "predict")
    return out, json.loads((out / "metrics.json").read_text())


def test_the_judge_sees_the_target_class_far_more_often_when_guided(digits_cache):
    root, cache = digits_cache
    guided_dir, guided = _predict(root, cache, "guided")
    _, unguided = _predict(root, cache, "unguided", "guidance.scale=0")
    print(f"judge accuracy guided {guided['judge/accuracy']:.3f} vs unguided {unguided['judge/accuracy']:.3f}")
    assert unguided["judge/accuracy"] < 0.3  # about chance (0.1): the DDPM ignores the labels
    assert guided["judge/accuracy"] > unguided["judge/accuracy"] + 0.4
    # the guiding classifier's joint energy of the target class drops
    assert guided["energy/mean_joint_energy"] < unguided["energy/mean_joint_energy"]
    # per-sample records carry the classifier's prediction and energies
    samples = load_samples(guided_dir)
    assert samples["labels"].tolist() == [i % 10 for i in range(100)]
    rows = (guided_dir / "samples.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["seed", "index", "label"] and {"pred", "energy", "joint_energy"} <= set(
        rows[0].split(","))


def test_a_label_outside_the_classifier_is_refused_before_sampling(digits_cache):
    root, cache = digits_cache
    with pytest.raises(ConfigError, match="outside the classifier's 10 classes"):
        _predict(root, cache, "bad", "data.labels=12")
    assert not list((root / "bad").glob("samples/*.png"))


def test_robust_training_exports_a_loadable_classifier(digits_cache):
    root, cache = digits_cache
    from equidiff.classifiers import load_small_net
    from equidiff.data import digits_arrays

    clf = load_small_net("cnn", cache / "digits_robust_cnn" / "model.safetensors", in_channels=1, num_classes=10,
                         width=32, image_size=8)
    x, y = digits_arrays("test")
    acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.7, acc
    meta = json.loads((cache / "digits_robust_cnn" / "config.json").read_text())
    assert meta["adversarial"]["eps"] == 0.5 and meta["kind"] == "cnn"
    assert np.isfinite(acc)
