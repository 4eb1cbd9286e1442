"""FID / Inception score / VGG precision-recall: torch-fidelity equivalence, 2-process DDP, loading, bad input."""

import hashlib
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from equidiff.classifiers.safe_load import UnsafeCheckpointError
from equidiff.errors import ConfigError
from equidiff.metrics import FID, InceptionScore, PrecisionRecallVGG, Reference
from equidiff.metrics.features import INCEPTION_V3_FILE, VGG16_FILE, VGG16_URL, inception_v3, vgg16
from equidiff.metrics.functional import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    statistics_from_moments,
)
from tests.metrics.fakes import FIDELITY_SUBDIR, FakeExtractor, fake_images, write_fake_fidelity_weights


def _feats(seed, n, d, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def _tf_fid(a, b):
    return fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)[
        "frechet_inception_distance"]


# --------------------------------------------------------------------------- functional
@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.5, 1.3)])
def test_frechet_distance_equals_torch_fidelity(shift, scale):
    a, b = _feats(0, 300, 24), _feats(1, 250, 24, shift, scale)
    fid = frechet_distance(a, b)
    assert fid.dtype == torch.float64
    assert fid.item() == pytest.approx(_tf_fid(a, b), rel=1e-10, abs=1e-10)
    # torch-fidelity's default path takes float32 features (and keeps mu in float32)
    assert frechet_distance(a.float(), b.float()).item() == pytest.approx(_tf_fid(a.float(), b.float()), rel=1e-5)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_stats_agree():
    a = _feats(2, 200, 16, shift=0.3)
    assert abs(frechet_distance(a, a).item()) < 1e-8
    mu, sigma = feature_statistics(a)
    ref = fid_features_to_statistics(a)
    assert torch.allclose(mu, torch.from_numpy(ref["mu"]), rtol=0, atol=1e-14)
    assert torch.allclose(sigma, torch.from_numpy(ref["sigma"]), rtol=0, atol=1e-13)
    # streamed moments give the same statistics
    mu2, sigma2 = statistics_from_moments(len(a), a.sum(0), a.T @ a)
    assert torch.allclose(mu2, mu, atol=1e-14) and torch.allclose(sigma2, sigma, atol=1e-12)
    assert frechet_distance_from_stats(mu, sigma, mu2, sigma2).abs().item() < 1e-8


def test_frechet_distance_bad_input():
    mu, sigma = feature_statistics(_feats(0, 20, 4))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance_from_stats(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(_feats(0, 1, 4))


@pytest.mark.parametrize("n,splits,shuffle", [(103, 10, True), (103, 10, False), (40, 3, True), (10, 10, True)])
def test_inception_score_equals_torch_fidelity_bit_for_bit(n, splits, shuffle):
    logits = _feats(3, n, 12, scale=3.0).float()  # the extractor gives float32 logits
    mean, std = inception_score(logits, splits, shuffle=shuffle, rng_seed=2020)
    ref = isc_features_to_metric(logits, splits=splits, shuffle=shuffle, rng_seed=2020)
    assert mean.item() == ref["inception_score_mean"] and std.item() == ref["inception_score_std"]


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match="at least splits=10"):
        inception_score(torch.randn(9, 5))
    with pytest.raises(ValueError, match="2D"):
        inception_score(torch.randn(20))


# --------------------------------------------------------------------------- metric classes (fake extractor)
N_REAL, N_FAKE = 40, 30
SHARDS = [slice(0, 17), slice(17, N_FAKE)]  # uneven, like Lightning's predict sampler


def _real_images():
    return fake_images(N_REAL, seed=10)


def _fake_data():
    images = fake_images(N_FAKE, seed=11)
    seeds = torch.arange(100, 100 + N_FAKE)
    return images, seeds


def _reference(extractor, with_prc=True, extractor_id=None):
    out = extractor(_real_images())
    mu, sigma = feature_statistics(out["2048"])
    return Reference(extractor=extractor_id or extractor.extractor_id, mu=mu, sigma=sigma, n=N_REAL,
                     prc_extractor=(extractor_id or extractor.extractor_id) if with_prc else None,
                     prc_features=out["fc2_relu"] if with_prc else None)


def _metrics(extractor, ref):
    return {"fid": FID(extractor, ref, min_samples=0), "isc": InceptionScore(extractor, splits=3),
            "prc": PrecisionRecallVGG(extractor, ref, k=3)}


def _feed(metrics, images, seeds):
    metrics["fid"].update(images)
    metrics["isc"].update(images, seeds)
    metrics["prc"].update(images, seeds)


def _values(metrics):
    out = {"fid": metrics["fid"].compute().item()}
    out.update({f"isc/{k}": v.item() for k, v in metrics["isc"].compute().items()})
    out.update({f"prc/{k}": v.item() for k, v in metrics["prc"].compute().items()})
    return out


def _torch_fidelity_values(extractor):
    """torch-fidelity's own functions on the same features, samples in seed order."""
    images, _ = _fake_data()
    fake, real = extractor(images), extractor(_real_images())
    isc = isc_features_to_metric(fake["logits_unbiased"], splits=3)  # shuffle=True, rng_seed=2020 by default
    p, r = calculate_precision_recall_full(fake["fc2_relu"], real["fc2_relu"], neighborhood=3)  # input1 = generated
    return {"fid": _tf_fid(fake["2048"].double(), real["2048"].double()),
            "isc/mean": isc["inception_score_mean"], "isc/std": isc["inception_score_std"],
            "prc/precision": p, "prc/recall": r}


def _check_against_torch_fidelity(values, extractor):
    ref = _torch_fidelity_values(extractor)
    assert values["fid"] == pytest.approx(ref["fid"], rel=1e-9)
    assert values["isc/mean"] == ref["isc/mean"] and values["isc/std"] == ref["isc/std"]  # bit for bit
    assert values["prc/precision"] == pytest.approx(ref["prc/precision"], abs=1e-6)
    assert values["prc/recall"] == pytest.approx(ref["prc/recall"], abs=1e-6)


def test_metrics_equal_torch_fidelity_whatever_the_feeding_order():
    extractor = FakeExtractor()
    images, seeds = _fake_data()
    metrics = _metrics(extractor, _reference(extractor))
    order = torch.randperm(N_FAKE, generator=torch.Generator().manual_seed(0))
    for chunk in order.split(7):  # batches in a shuffled order: the gathered metrics sort by seed
        _feed(metrics, images[chunk], seeds[chunk])
    values = _values(metrics)
    _check_against_torch_fidelity(values, extractor)
    assert values["fid"] > 0 and values["isc/mean"] > 1


def test_fid_refuses_too_few_samples_and_names_the_override():
    extractor = FakeExtractor()
    fid = FID(extractor, _reference(extractor), min_samples=N_FAKE + 1)
    fid.update(_fake_data()[0])
    with pytest.raises(ConfigError, match=r"FID over 30 samples: fewer than min_samples=31.*min_samples=0"):
        fid.compute()
    with pytest.raises(ConfigError, match=r"only 40 images, fewer than min_samples=2048.*min_samples=0"):
        FID(extractor, _reference(extractor))  # the default, 2048, applies to the reference too


def test_too_few_samples_are_refused_before_sampling():
    # PredictMetrics calls check_num_samples(N) at setup: a run too small for a metric fails before it samples
    extractor = FakeExtractor()
    m = _metrics(extractor, _reference(extractor))
    with pytest.raises(ConfigError, match="FID needs at least 2 samples"):
        m["fid"].check_num_samples(1)  # min_samples=0 (smoke tests) still needs a covariance
    with pytest.raises(ConfigError, match=r"FID over 30 samples: fewer than min_samples=31.*min_samples=0"):
        FID(extractor, _reference(extractor), min_samples=N_FAKE + 1).check_num_samples(N_FAKE)
    with pytest.raises(ConfigError, match="splits=3 chunks needs at least 3 samples; this run makes 2"):
        m["isc"].check_num_samples(2)
    with pytest.raises(ConfigError, match="k=3 needs more than k samples"):
        m["prc"].check_num_samples(3)
    for metric in m.values():
        metric.check_num_samples(4)


def test_a_reference_of_another_extractor_is_refused_naming_both_ids():
    extractor = FakeExtractor(extractor_id="inception-v3-compat:aaaa")
    ref = _reference(extractor, extractor_id="inception-v3-compat:bbbb")
    for make in (lambda: FID(extractor, ref), lambda: PrecisionRecallVGG(extractor, ref)):
        with pytest.raises(ConfigError, match="inception-v3-compat:bbbb") as e:
            make()
        assert "inception-v3-compat:aaaa" in str(e.value) and "cifar10_reference_stats" in str(e.value)


def test_bad_references_and_inputs():
    extractor = FakeExtractor()
    with pytest.raises(ConfigError, match="no precision/recall features"):
        PrecisionRecallVGG(extractor, _reference(extractor, with_prc=False))
    with pytest.raises(ConfigError, match="reference statistics not found"):
        FID(extractor, "/nonexistent/cifar10_test.npz")
    small = FakeExtractor(dims=(4, 10, 5))  # same id, other feature size
    with pytest.raises(ConfigError, match="6-d statistics"):
        FID(small, _reference(extractor))
    isc = InceptionScore(extractor, splits=2)
    images, seeds = _fake_data()
    isc.update(images[:5], seeds[:5])
    isc.update(images[3:8], seeds[3:8])  # seeds 103, 104 twice
    with pytest.raises(ValueError, match=r"seeds \[103, 104\] were fed more than once"):
        isc.compute()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no samples"):
        InceptionScore(extractor).compute()


def test_metrics_sharing_one_extractor_run_it_once_per_batch_with_the_real_wrapper():
    from equidiff.metrics.features import FidelityExtractor

    class Net(torch.nn.Module):  # torch-fidelity's interface: features_list, forward -> tuple
        features_list = ["2048", "logits_unbiased"]

        def __init__(self):
            super().__init__()
            self.fake, self.calls = FakeExtractor(), 0

        def forward(self, x):
            self.calls += 1
            out = self.fake(x)
            return out["2048"], out["logits_unbiased"]

    net = Net()
    extractor = FidelityExtractor(net, net.fake.extractor_id)
    extractor.feature_dims = net.fake.feature_dims  # the fake's small sizes, not Inception's
    ref = _reference(net.fake, with_prc=False)
    fid, isc = FID(extractor, ref, min_samples=0), InceptionScore(extractor, splits=3)
    images, seeds = _fake_data()
    for chunk in (slice(0, 10), slice(10, 30)):
        batch = images[chunk]
        fid.update(batch)
        isc.update(batch, seeds[chunk])
    assert net.calls == 2  # the second metric reused the first one's features
    fresh = _metrics(net.fake, _reference(net.fake))
    _feed(fresh, images, seeds)
    assert fid.compute().item() == pytest.approx(fresh["fid"].compute().item(), rel=1e-12)
    assert isc.compute()["mean"].item() == fresh["isc"].compute()["mean"].item()
    batch = images[:4].clone()
    fid.update(batch)
    batch[0, 0, 0, 0] ^= 1  # modified in place: a new version, so the network runs again
    isc.update(batch, seeds[:4])
    assert net.calls == 4
    with torch.inference_mode():  # inference tensors have no version counter: no memo, still correct
        batch = images[:4].clone()
        assert torch.equal(extractor(batch)["2048"], extractor(batch)["2048"]) and net.calls == 6
    grey = images[:3, :1]
    assert torch.equal(extractor(grey)["2048"], net.fake(grey.expand(-1, 3, -1, -1))["2048"])
    with pytest.raises(ConfigError, match="uint8"):
        extractor(images.float())
    extractor.train()
    assert not net.training  # never leaves eval mode


# --------------------------------------------------------------------------- 2-process DDP
def _ddp_worker(rank, port, results, shards):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        extractor = FakeExtractor()
        metrics = _metrics(extractor, _reference(extractor))
        images, seeds = _fake_data()
        shard = shards[rank]
        for chunk in (slice(shard.start, min(shard.start + 5, shard.stop)), slice(shard.start + 5, shard.stop)):
            if chunk.stop > chunk.start:  # a process without samples feeds nothing
                _feed(metrics, images[chunk], seeds[chunk])
        values = _values(metrics)
        if rank == 0:
            results.update(values)
    finally:
        dist.destroy_process_group()


# and a process without samples: its gathered states are empty, the others' are not
@pytest.mark.parametrize("shards", [SHARDS, [slice(0, N_FAKE), slice(N_FAKE, N_FAKE)]], ids=["uneven", "empty_rank"])
def test_metrics_are_exact_with_two_processes(shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(port, results, shards), nprocs=2, join=True)

    extractor = FakeExtractor()
    metrics = _metrics(extractor, _reference(extractor))
    _feed(metrics, *_fake_data())
    single = _values(metrics)
    assert results["fid"] == pytest.approx(single["fid"], rel=1e-12)  # float64 sums in another order
    for key in ("isc/mean", "isc/std", "prc/precision", "prc/recall"):
        assert results[key] == single[key], key  # gathered and sorted by seed: identical
    _check_against_torch_fidelity(dict(results), extractor)


# --------------------------------------------------------------------------- real extractors from local files
@pytest.fixture(scope="session")
def fidelity_weights(tmp_path_factory):
    """A folder with torch-fidelity's Inception (random weights) under torch-fidelity/, shared by the session."""
    return write_fake_fidelity_weights(tmp_path_factory.getbasetemp() / "fidelity_weights", vgg=False)


@pytest.fixture(scope="session")
def fidelity_weights_vgg(fidelity_weights):
    """The same folder with the VGG16 file too (530 MB, written once)."""
    return write_fake_fidelity_weights(fidelity_weights, vgg=True)


def test_inception_loads_from_a_local_file_with_its_sha256_id(fidelity_weights):
    path = fidelity_weights / FIDELITY_SUBDIR / INCEPTION_V3_FILE
    extractor = inception_v3(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.extractor_id == f"inception-v3-compat:{sha[:16]}"
    assert extractor.feature_names == ("2048", "logits_unbiased")
    assert extractor.feature_dims == {"2048": 2048, "logits_unbiased": 1008}
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in extractor.network.state_dict().items())
    assert not extractor.network.training
    assert inception_v3(str(path)) is extractor  # cached per file: FID and IS share one network


def test_missing_weights_name_the_path_and_the_url(tmp_path):
    with pytest.raises(ConfigError, match="Inception-v3") as e:
        inception_v3(tmp_path / "nope.pth")
    assert URL_INCEPTION_V3 in str(e.value) and str(tmp_path / "nope.pth") in str(e.value)
    with pytest.raises(ConfigError, match="VGG16") as e:
        vgg16(tmp_path / VGG16_FILE)
    assert VGG16_URL in str(e.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_weights_with_pickled_code_or_not_a_state_dict_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "payload.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        inception_v3(bad)
    assert not marker.exists()
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, nested)
    with pytest.raises(ConfigError, match="not a flat state dict"):
        vgg16(nested)
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(ConfigError, match="do not fit torch-fidelity's InceptionV3"):
        inception_v3(other)


@pytest.mark.slow
def test_real_extractors_equal_torch_fidelity_and_feed_the_metrics(fidelity_weights_vgg):
    """The wrappers give torch-fidelity's own features (torch-fidelity reading the same files itself, on the
    same batches); the metrics fed through them equal torch-fidelity's functions on those features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    folder = fidelity_weights_vgg / FIDELITY_SUBDIR
    inception, vgg = inception_v3(folder / INCEPTION_V3_FILE, batch_size=4), vgg16(folder / VGG16_FILE, batch_size=4)
    real = fake_images(6, seed=4, shape=(3, 32, 32))
    real_i, real_v = inception(real), vgg(real)
    images, seeds = fake_images(6, seed=3, shape=(3, 32, 32)), torch.arange(6)
    ours_i, ours_v = inception(images), vgg(images)

    mu, sigma = feature_statistics(real_i["2048"])
    ref = Reference(extractor=inception.extractor_id, mu=mu, sigma=sigma, n=6, prc_extractor=vgg.extractor_id,
                    prc_features=real_v["fc2_relu"])
    fid, isc = FID(inception, ref, min_samples=0), InceptionScore(inception, splits=2)
    prc = PrecisionRecallVGG(vgg, ref)
    fid.update(images)  # the same tensor again: the extractors reuse the features computed above
    isc.update(images, seeds)
    prc.update(images, seeds)

    with torch.no_grad():
        tf_i = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=str(folder / INCEPTION_V3_FILE))
        tf_v = FeatureExtractorVGG16("vgg16", ["fc2_relu"], feature_extractor_weights_path=str(folder / VGG16_FILE))
        ref_i = [tf_i(chunk) for chunk in images.split(4)]
        ref_v = [tf_v(chunk) for chunk in images.split(4)]
    assert torch.equal(ours_i["2048"], torch.cat([r[0] for r in ref_i]))
    assert torch.equal(ours_i["logits_unbiased"], torch.cat([r[1] for r in ref_i]))
    assert torch.equal(ours_v["fc2_relu"], torch.cat([r[0] for r in ref_v]))

    want = isc_features_to_metric(ours_i["logits_unbiased"], splits=2)
    got = isc.compute()
    assert got["mean"].item() == want["inception_score_mean"] and got["std"].item() == want["inception_score_std"]
    assert got["mean"].item() > 1.01  # the fake network's logits are not degenerate
    p, r = calculate_precision_recall_full(ours_v["fc2_relu"], real_v["fc2_relu"], neighborhood=3)
    got = prc.compute()
    assert (got["precision"].item(), got["recall"].item()) == pytest.approx((p, r), abs=1e-6)
    stats = fid_features_to_statistics(ours_i["2048"].double())
    fake_mu, fake_sigma, n = fid.statistics()  # (FID.compute() itself: eigenvalues of 2048 x 2048, ~30 s on CPU)
    assert n == 6
    assert torch.allclose(fake_mu, torch.from_numpy(stats["mu"]), rtol=0, atol=1e-12)
    assert torch.allclose(fake_sigma, torch.from_numpy(stats["sigma"]), rtol=0, atol=1e-10)
