"""Class-wise energy statistics (Fig. 4.12): exact values, the cache file and its loader, bad input."""

import json

import pytest
import torch
from PIL import Image

from equidiff.analysis import ClassEnergyStats, load_class_energy_means, write_class_energy_stats
from equidiff.analysis.energy_stats import COLUMNS
from equidiff.analysis.report import read_csv
from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, marginal_energy
from tests.analysis.common import ArrayDataModule, LinearProbe, RecordingLogger, toy_data, trainer


def probes():
    return {"a": LinearProbe(16, seed=0), "b": LinearProbe(16, seed=1, scale=0.3)}


def run_stats(tmp_path, *, data=None, batch_size=4, logger=False, **kwargs):
    images, labels = data if data is not None else toy_data(n=13)
    kwargs.setdefault("cache_path", str(tmp_path / "cache" / "{name}.json"))
    model = ClassEnergyStats(probes(), output_dir=str(tmp_path), **kwargs)
    dm = ArrayDataModule(images, labels, batch_size=batch_size, predict_split="train")
    trainer(logger).predict(model, datamodule=dm, return_predictions=False)
    return read_csv(tmp_path / "class_energy.csv"), model


def test_values_equal_a_direct_computation(tmp_path):
    images, labels = toy_data(n=13)
    rows, _ = run_stats(tmp_path, data=(images, labels))
    assert [(r["classifier"], int(r["class"])) for r in rows] == [(c, k) for c in "ab" for k in range(3)]
    for r in rows:
        clf, k = probes()[r["classifier"]], int(r["class"])
        x, y = images[labels == k], labels[labels == k]
        logits = clf(x)
        e_x, e_xy = marginal_energy(logits).double(), joint_energy(logits, y).double()
        assert int(r["n"]) == len(y) and r["class_name"] == str(k)
        assert float(r["accuracy"]) == (logits.argmax(-1) == y).double().mean().item()
        assert float(r["mean_marginal_energy"]) == pytest.approx(e_x.mean().item(), rel=1e-6)
        assert float(r["std_marginal_energy"]) == pytest.approx(e_x.std().item(), rel=1e-5)
        assert float(r["mean_joint_energy"]) == pytest.approx(e_xy.mean().item(), rel=1e-6)
        assert float(r["std_joint_energy"]) == pytest.approx(e_xy.std().item(), rel=1e-5)


def test_batch_size_does_not_change_the_statistics(tmp_path):
    one, _ = run_stats(tmp_path / "one", batch_size=1)
    five, _ = run_stats(tmp_path / "five", batch_size=5)
    for r1, r5 in zip(one, five, strict=True):
        assert [r1[c] for c in COLUMNS[:5]] == [r5[c] for c in COLUMNS[:5]]
        for c in COLUMNS[5:]:
            assert float(r1[c]) == pytest.approx(float(r5[c]), rel=1e-6, abs=1e-6)


def test_writes_csv_png_cache_and_logs(tmp_path):
    logger = RecordingLogger()
    rows, _ = run_stats(tmp_path, logger=logger, class_names=["cat", "dog", "emu"])
    assert (tmp_path / "class_energy.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)
    assert [r["class_name"] for r in rows[:3]] == ["cat", "dog", "emu"]
    with Image.open(tmp_path / "class_energy.png") as im:
        assert im.format == "PNG"
    for name in "ab":
        doc = json.loads((tmp_path / "cache" / f"{name}.json").read_text())
        mine = [r for r in rows if r["classifier"] == name]
        assert doc["classifier"] == name and doc["num_classes"] == 3 and doc["split"] == "train"
        assert doc["n"] == [int(r["n"]) for r in mine]
        for key in ("mean_marginal_energy", "std_marginal_energy", "mean_joint_energy", "std_joint_energy"):
            assert doc[key] == [float(r[key]) for r in mine]
        means = load_class_energy_means(tmp_path / "cache" / f"{name}.json", 3, classifier=name)
        assert means.dtype == torch.float32 and means.tolist() == pytest.approx(doc["mean_marginal_energy"])
        joint = load_class_energy_means(tmp_path / "cache" / f"{name}.json", 3, key="mean_joint_energy")
        assert joint.tolist() == pytest.approx(doc["mean_joint_energy"])
    assert [s for _, s in logger.metrics] == [0, 1, 2]  # one step per class
    assert "class_energy/plot" in logger.images and "class_energy/table" in logger.tables


def test_loader_errors(tmp_path):
    path = tmp_path / "eps0_5.json"
    with pytest.raises(ConfigError, match=r"no class-wise energy statistics at .*eps0_5\.json.*"
                                          r"equidiff predict experiment=robust_energy/analysis_class_energy_stats"):
        load_class_energy_means(path, 10)
    stats = {"mean_marginal_energy": [-1.0, -2.0, float("nan")], "std_marginal_energy": [0.1, 0.2, float("nan")],
             "mean_joint_energy": [0.5, 0.6, float("nan")], "std_joint_energy": [0.0, 0.0, 0.0], "n": [4, 5, 0]}
    write_class_energy_stats(path, "eps0_5", stats, split="train")
    assert json.loads(path.read_text())["mean_marginal_energy"] == [-1.0, -2.0, None]  # valid JSON, no NaN
    with pytest.raises(ConfigError, match="statistics for 3 classes, but 10 are expected"):
        load_class_energy_means(path, 10)
    with pytest.raises(ConfigError, match="classifier 'eps0_5', not 'eps1_0'"):
        load_class_energy_means(path, 3, classifier="eps1_0")
    with pytest.raises(ConfigError, match=r"classes \[2\] had no samples"):
        load_class_energy_means(path, 3)
    stats["mean_marginal_energy"][2] = -3.0
    write_class_energy_stats(path, "eps0_5", stats)
    assert load_class_energy_means(path, None).tolist() == [-1.0, -2.0, -3.0]  # None: the count is not checked
    with pytest.raises(ConfigError, match="holds no 'mean_energy'"):
        load_class_energy_means(path, 3, key="mean_energy")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        load_class_energy_means(path, 3)


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"needs a '\{name\}' placeholder"):
        ClassEnergyStats(probes(), output_dir=str(tmp_path), cache_path=str(tmp_path / "stats.json"))
    with pytest.raises(ConfigError, match="cannot tell the number of classes"):
        ClassEnergyStats({"a": LinearProbe(16), "c": LinearProbe(16, num_classes=4)}, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="method.num_classes=5 but the classifiers have"):
        ClassEnergyStats(probes(), output_dir=str(tmp_path), num_classes=5)
    with pytest.raises(ConfigError, match="2 class_names for 3 classes"):
        ClassEnergyStats(probes(), output_dir=str(tmp_path), class_names=["x", "y"])
    images, labels = toy_data(n=13)
    with pytest.raises(ValueError, match=r"labels \[3\] are outside the classifier's 3 classes"):
        run_stats(tmp_path, data=(images, labels.clamp(max=2) + (labels == 2).long()))
