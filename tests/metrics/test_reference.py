"""Reference statistics: the .npz file, the ReferenceStatistics module, its experiment (1 and 2 processes),
and the cifar10_fidelity metrics config that reads the file."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from equidiff.cli import run
from equidiff.data import CIFAR10DataModule
from equidiff.errors import ConfigError
from equidiff.metrics import FID, InceptionScore, Reference, ReferenceStatistics, load_reference, save_reference
from equidiff.metrics.features import INCEPTION_V3_FILE, inception_v3
from equidiff.metrics.functional import feature_statistics
from tests.data.fakes import write_fake_cifar10
from tests.helpers import compose_cfg, run_cli
from tests.metrics.fakes import FIDELITY_SUBDIR, FakeExtractor, write_fake_fidelity_weights

EXPERIMENT = "experiment=robust_energy/cifar10_reference_stats"


@pytest.fixture(scope="session")
def fidelity_weights(tmp_path_factory):
    return write_fake_fidelity_weights(tmp_path_factory.getbasetemp() / "fidelity_weights", vgg=False)


@pytest.fixture(scope="session")
def fidelity_weights_vgg(fidelity_weights):
    return write_fake_fidelity_weights(fidelity_weights, vgg=True)


def _cifar(root, n_test=7):
    data = write_fake_cifar10(root, n_train=5, n_test=n_test)
    return torch.from_numpy(data["test_data"]).reshape(-1, 3, 32, 32)


def _ref(d=5, n=9, prc=True):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    return Reference(extractor="inception-v3-compat:0123456789abcdef", mu=mu, sigma=sigma, n=n,
                     prc_extractor="vgg16:fedcba9876543210" if prc else None,
                     prc_features=torch.randn(n, 3, generator=g) if prc else None)


# --------------------------------------------------------------------------- the file
@pytest.mark.parametrize("prc", [True, False])
def test_reference_file_round_trip(tmp_path, prc):
    ref = _ref(prc=prc)
    save_reference(tmp_path / "r" / "ref.npz", ref)
    back = load_reference(tmp_path / "r" / "ref.npz")
    assert (back.extractor, back.n, back.prc_extractor) == (ref.extractor, ref.n, ref.prc_extractor)
    assert torch.equal(back.mu, ref.mu) and torch.equal(back.sigma, ref.sigma)
    assert back.prc_features is None if not prc else torch.equal(back.prc_features, ref.prc_features)
    assert back.path == tmp_path / "r" / "ref.npz"
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["ref.npz"]  # written atomically, no temp file left


def test_bad_reference_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="reference statistics not found.*robust_energy/cifar10_reference_stats"):
        load_reference(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="could not read"):
        load_reference(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    with pytest.raises(ConfigError, match=r"lacks \['extractor', 'mu', 'sigma', 'n'\]"):
        load_reference(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", extractor=np.array([object()], dtype=object), mu=np.zeros(2),
             sigma=np.eye(2), n=np.array(3))
    with pytest.raises(ConfigError, match="could not read"):  # object arrays need pickle: refused
        load_reference(tmp_path / "pickled.npz")
    np.savez(tmp_path / "shapes.npz", extractor=np.array("x"), mu=np.zeros(2), sigma=np.eye(3), n=np.array(3))
    with pytest.raises(ConfigError, match=r"not \(D,\) and \(D, D\)"):
        load_reference(tmp_path / "shapes.npz")


# --------------------------------------------------------------------------- the module
def _predict(module, root, batch_size=3):
    dm = CIFAR10DataModule(str(root), val_size=0, batch_size=batch_size, seed=0, predict_split="test")
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)


def test_reference_statistics_writes_the_statistics_of_the_predict_split(tmp_path):
    images = _cifar(tmp_path / "cifar")
    extractor = FakeExtractor(in_features=3 * 32 * 32)
    out = tmp_path / "ref" / "cifar10_test.npz"
    _predict(ReferenceStatistics(extractor, extractor, out), tmp_path / "cifar")
    ref = load_reference(out)
    want = extractor(images)
    mu, sigma = feature_statistics(want["2048"])
    assert ref.n == 7 and ref.extractor == ref.prc_extractor == "fake:0"
    assert torch.allclose(ref.mu, mu, rtol=0, atol=1e-12) and torch.allclose(ref.sigma, sigma, rtol=0, atol=1e-12)
    assert ref.prc_features.dtype == torch.float32 and torch.equal(ref.prc_features, want["fc2_relu"])  # index order
    # without a VGG extractor: no precision/recall features
    _predict(ReferenceStatistics(extractor, None, out), tmp_path / "cifar", batch_size=7)
    ref2 = load_reference(out)
    assert ref2.prc_features is None and ref2.prc_extractor is None
    assert torch.allclose(ref2.mu, ref.mu, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the experiment and the metrics config
# The fast offline run for tests/test_experiments.py::OVERRIDES ("{cifar}": write_fake_cifar10(root, n_test=4),
# "{weights}": write_fake_fidelity_weights(folder, vgg=False), "{tmp}": a temp folder); run with trainer=cpu.
FAST_RUN = ("predict", ["data.root={cifar}", "paths.weights_dir={weights}", "paths.cache_dir={tmp}/cache",
                        "data.num_workers=0", "data.batch_size=2", "method.vgg=null"])


def _overrides(tmp_path, weights, *extra):
    return [EXPERIMENT, f"data.root={tmp_path}/cifar", f"paths.weights_dir={weights}",
            f"paths.cache_dir={tmp_path}/cache", f"paths.output_dir={tmp_path}/out", "data.num_workers=0",
            "data.batch_size=2", *extra]


def test_reference_experiment_fast_run_writes_the_npz(tmp_path, fidelity_weights):
    _cifar(tmp_path / "cifar", n_test=4)
    verb, overrides = FAST_RUN
    overrides = [o.format(cifar=tmp_path / "cifar", weights=fidelity_weights, tmp=tmp_path) for o in overrides]
    cfg = compose_cfg([EXPERIMENT, f"paths.output_dir={tmp_path}/out", "trainer=cpu", *overrides])
    assert cfg.verbs == ["predict"] and cfg.data.predict_split == "test" and not cfg.callbacks
    assert cfg.trainer.inference_mode is False
    run(cfg, verb)
    assert (tmp_path / "out" / "config.yaml").exists()
    ref = load_reference(tmp_path / "cache" / "reference" / "cifar10_test.npz")
    inception = inception_v3(fidelity_weights / FIDELITY_SUBDIR / INCEPTION_V3_FILE)
    assert ref.extractor == inception.extractor_id and ref.n == 4
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and torch.isfinite(ref.sigma).all()
    assert ref.prc_features is None
    with pytest.raises(ConfigError, match="not `equidiff fit`"):
        run(cfg, "fit")


def test_fidelity_metrics_config_builds_against_a_reference(tmp_path, fidelity_weights):
    inception = inception_v3(fidelity_weights / FIDELITY_SUBDIR / INCEPTION_V3_FILE)
    save_reference(tmp_path / "cache" / "reference" / "cifar10_test.npz",
                   Reference(extractor=inception.extractor_id, mu=torch.zeros(2048), sigma=torch.eye(2048), n=10000))
    cfg = compose_cfg(["metrics=cifar10_fidelity", f"paths.weights_dir={fidelity_weights}",
                       f"paths.cache_dir={tmp_path}/cache"])
    assert list(cfg.metrics) == ["fid", "inception_score", "precision_recall"]
    fid, isc = instantiate(cfg.metrics.fid), instantiate(cfg.metrics.inception_score)
    assert isinstance(fid.metric, FID) and fid.inputs == ["image_uint8"] and fid.metric.min_samples == 2048
    assert isinstance(isc.metric, InceptionScore) and isc.inputs == ["image_uint8", "seed"] and isc.metric.splits == 10
    assert fid.metric.extractor is isc.metric.extractor is inception  # one network for both
    prc = cfg.metrics.precision_recall  # not built here: loading VGG16 takes ~10 s (see the slow test below)
    assert prc.inputs == ["image_uint8", "seed"] and prc.metric.k == 3
    assert prc.metric.reference == str(tmp_path / "cache" / "reference" / "cifar10_test.npz")


@pytest.mark.slow
def test_reference_experiment_gives_the_same_file_with_two_processes(tmp_path, fidelity_weights_vgg):
    """1 process vs 2 (gloo), both through the CLI (one thread each). Batches of one image: the networks'
    outputs then do not depend on batch-mates (with larger batches, CPU convolutions differ by ~1e-5
    between batch compositions, which the sharding changes)."""
    _cifar(tmp_path / "cifar", n_test=7)  # 4 + 3 items over 2 processes

    def make(name, *trainer):
        args = _overrides(tmp_path, fidelity_weights_vgg, *trainer, "data.batch_size=1",
                          f"paths.cache_dir={tmp_path}/{name}", f"paths.output_dir={tmp_path}/{name}_out")
        result = run_cli(["predict", *args], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return load_reference(tmp_path / name / "reference" / "cifar10_test.npz")

    one, two = make("one", "trainer=cpu"), make("two", "trainer=ddp_cpu", "trainer.devices=2")
    assert (two.extractor, two.prc_extractor, two.n) == (one.extractor, one.prc_extractor, 7)
    assert one.extractor.startswith("inception-v3-compat:") and one.prc_extractor.startswith("vgg16:")
    assert torch.equal(two.prc_features, one.prc_features)  # gathered and sorted by seed
    # sum-reduced float64 moments: equal up to the order of the float64 additions
    assert torch.allclose(two.mu, one.mu, rtol=1e-12, atol=1e-14)
    assert torch.allclose(two.sigma, one.sigma, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_fidelity_metrics_in_a_sampling_run(tmp_path, fidelity_weights_vgg, tiny_pipeline_dir):
    """End to end: reference from (fake) CIFAR-10, then metrics=cifar10_fidelity on digits samples (grey,
    8x8: repeated to RGB and resized inside the extractors), values in metrics.json."""
    _cifar(tmp_path / "cifar", n_test=6)
    run(compose_cfg(_overrides(tmp_path, fidelity_weights_vgg, "trainer=cpu")), "predict")
    cfg = compose_cfg([
        "experiment=digits/sample", "metrics=cifar10_fidelity", f"diffusion.path={tiny_pipeline_dir}",
        "data.num_samples=8", "data.batch_size=4", "sampler.num_steps=2", "trainer=cpu",
        f"paths.weights_dir={fidelity_weights_vgg}", f"paths.cache_dir={tmp_path}/cache",
        f"paths.output_dir={tmp_path}/samples", "metrics.fid.metric.min_samples=0",
        "metrics.inception_score.metric.splits=2"])
    run(cfg, "predict")
    metrics = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert set(metrics) == {"fid", "inception_score/mean", "inception_score/std", "precision_recall/precision",
                            "precision_recall/recall"}
    assert metrics["fid"] > 0 and metrics["inception_score/mean"] >= 1
    assert 0 <= metrics["precision_recall/precision"] <= 1 and 0 <= metrics["precision_recall/recall"] <= 1
