"""Exact evaluation under DDP: unpadded val/test shards, and 1 vs 2 processes through the CLI."""

from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from equidiff.data.base import ShardSampler
from equidiff.errors import ConfigError
from tests.analysis.common import ArrayDataModule, assert_same_results, toy_data
from tests.analysis.standins import write_tiny_robustness_checkpoint
from tests.data.fakes import write_fake_cifar10
from tests.helpers import run_cli


def _indices(loader):
    return [int(i) for batch in loader for i in batch["index"]]


def test_val_and_test_loaders_shard_without_padding_under_ddp():
    images, labels = toy_data(n=7)
    dm = ArrayDataModule(images, labels, batch_size=2)
    assert _indices(dm.test_dataloader()) == list(range(7))  # no trainer: one process
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            # a DistributedSampler, so Lightning keeps it instead of injecting its padding one
            assert isinstance(loader.sampler, DistributedSampler) and isinstance(loader.sampler, ShardSampler)
        shards.append(_indices(dm.test_dataloader()))
        assert len(dm.test_dataloader().sampler) == len(shards[-1])
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]  # 4 + 3: every item once
    dm.trainer = SimpleNamespace(world_size=8, global_rank=0)
    with pytest.raises(ConfigError, match="7 item\\(s\\), fewer than the 8 processes"):
        dm.test_dataloader()


@pytest.fixture(scope="module")
def cifar_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_fake_cifar10(root / "data" / "cifar10", n_train=9, n_test=7, seed=5)
    write_tiny_robustness_checkpoint(root / "weights" / "robustness" / "cifar_nat.pt", seed=0)
    write_tiny_robustness_checkpoint(root / "weights" / "robustness" / "cifar_l2_1_0.pt", seed=1)
    return root


def _args(root, out, experiment, *extra):
    return [f"experiment=robust_energy/{experiment}", f"paths.output_dir={out}", f"paths.data_dir={root}/data",
            f"paths.weights_dir={root}/weights", f"paths.cache_dir={out}/cache", "data.num_workers=0",
            "data.batch_size=2", "~method.classifiers.eps0_25", "~method.classifiers.eps0_5",
            "method.classifiers.eps0.arch=resnet18", "method.classifiers.eps1_0.arch=resnet18", "logger=none", *extra]


@pytest.mark.slow  # two CLI runs (about 40 s); the Table 4.1 DDP test runs in the default suite
@pytest.mark.parametrize("verb,experiment,files", [
    ("test", "analysis_noise_accuracy", ["noise_accuracy.csv"]),
    ("predict", "analysis_class_energy_stats", ["class_energy.csv", "cache/energy_stats/eps0.json"]),
])
def test_one_and_two_processes_give_the_same_analysis(cifar_and_weights, verb, experiment, files):
    root = cifar_and_weights
    extra = ["method.timesteps=[0,300,999]"] if verb == "test" else []
    runs = {}
    for name, trainer in (("one", ["trainer=cpu"]), ("two", ["trainer=ddp_cpu", "trainer.devices=2"])):
        out = root / f"{experiment}_{name}"
        r = run_cli([verb, *_args(root, out, experiment, *extra), *trainer], timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = out
    for f in files:
        assert_same_results(runs["one"] / f, runs["two"] / f)
