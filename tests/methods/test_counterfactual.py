"""The Counterfactual method through the real configs: every counterfactual experiment runs offline, the
record, metrics, batch-size invariance, resume, bad input."""

import json
import re

import numpy as np
import pytest
import torch

from equidiff.callbacks.records import read_sample
from equidiff.cli import experiments, run
from equidiff.errors import ConfigError
from tests.attacks.common import one_thread
from tests.helpers import compose_cfg

CIFAR = ["paths.data_dir={tmp}/data", "data._target_=tests.analysis.standins.fake_cifar10", "data.num_workers=0",
         "classifier.weights_path=null", "data.batch_size=4"]
WINE = ["solver.iters=3", "solver.gamma_steps=2", "data.batch_size=16"]
DIGITS_TABULAR = ["solver.iters=2", "solver.gamma_steps=1", "data.predict_split=val", "data.batch_size=90",
                  "+metrics.kde.metric.density.bandwidth=0.5", "metrics.gmm.metric.density.n_components=2"]
DIGITS_IMAGES = ["classifier.weights_path=null", "data.batch_size=180"]

# experiment -> (verb, overrides): the entries for tests/test_experiments.py::OVERRIDES
OVERRIDES = {
    "counterfactual/wine_scfe_kde": ("predict", WINE),
    "counterfactual/wine_scfe_gmm": ("predict", WINE),
    "counterfactual/wine_scfe_knn": ("predict", WINE),
    "counterfactual/wine_cfe_l2": ("predict", WINE),
    "counterfactual/digits_scfe_kde": ("predict", [*DIGITS_TABULAR, "+solver.density.bandwidth=0.5"]),
    "counterfactual/digits_scfe_gmm": ("predict", [*DIGITS_TABULAR, "solver.density.n_components=2"]),
    "counterfactual/digits_scfe_knn": ("predict", DIGITS_TABULAR),
    "counterfactual/digits_cfe_l2": ("predict", DIGITS_TABULAR),
    "counterfactual/digits_gse": ("predict", [*DIGITS_IMAGES, "solver.iters=2", "solver.search_steps=1"]),
    "counterfactual/digits_pgd_l2": ("predict", [*DIGITS_IMAGES, "solver.steps=2"]),
    "counterfactual/cifar10_gse": ("predict", [*CIFAR, "solver.iters=2", "solver.search_steps=1"]),
    "counterfactual/cifar10_pgd_l2": ("predict", [*CIFAR, "solver.steps=2"]),
    "counterfactual/cifar10_resnet20": ("fit", [*CIFAR, "trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
}


def _run(name, tmp_path, *extra, verb="predict", out="out"):
    overrides = [o.format(tmp=tmp_path) for o in OVERRIDES.get(name, (None, []))[1]] if not extra or extra[0] != "-" \
        else []
    extra = [e for e in extra if e != "-"]
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}/{out}", "trainer=cpu", "logger=none",
                       *overrides, *extra])
    with one_thread():
        return run(cfg, verb), tmp_path / out


def test_every_counterfactual_experiment_has_an_entry():
    assert sorted(e for e in experiments() if e.startswith("counterfactual/")) == sorted(OVERRIDES)


# tests/test_experiments.py runs every entry of OVERRIDES


def test_wine_scfe_kde_run_with_the_experiment_settings(tmp_path):
    # the real settings, no shortcuts, on the first 20 of the 100 held-out rows
    _, out = _run("counterfactual/wine_scfe_kde", tmp_path, "-", "data.batch_size=20",
                  "trainer.limit_predict_batches=1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary/validity"] == 1.0
    assert metrics["summary/l0"] < 12  # sparser than CFE-l2, which changes nearly all 13 features
    assert metrics["lof/lof"] < 1.1 and np.isfinite(metrics["kde/log_density"])
    rec = read_sample(out / "samples", 5)
    assert rec["label"] == rec["target"] != rec["source_label"] and rec["valid"] == 1.0
    assert rec["x"].shape == rec["input"].shape == (13,)  # the counterfactual and the original row
    assert rec["l0"] == np.sum(np.abs(rec["x"] - rec["input"]) > 1e-6)
    assert int(rec["index"]) == 5 and int(rec["seed"]) == 5


def test_digits_gse_record_holds_the_png_and_the_float_counterfactual(tmp_path):
    _, out = _run("counterfactual/digits_gse", tmp_path)
    rec = read_sample(out / "samples", 7)
    assert rec["image_uint8"].shape == (1, 8, 8) and rec["counterfactual"].shape == (1, 8, 8)
    assert "input" not in rec  # the original image is in the dataset, not duplicated
    for key in ("acp", "anc", "d20", "l2", "l0", "valid", "pred", "source_pred", "time"):
        assert key in rec
    with np.load(out / "samples.npz") as z:  # the perturbed dataset (x', y~)
        assert z["arr_0"].shape == (360, 8, 8, 1) and z["arr_1"][7] == rec["target"]


def _csv(out):
    import csv

    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_results_do_not_depend_on_the_batch_size(tmp_path):
    args = ["solver.iters=30", "solver.gamma_steps=3"]
    _, a = _run("counterfactual/wine_scfe_knn", tmp_path, "-", *args, "data.batch_size=36", out="a")
    _, b = _run("counterfactual/wine_scfe_knn", tmp_path, "-", *args, "data.batch_size=5", out="b")
    ra, rb = _csv(a), _csv(b)
    assert [r["target"] for r in ra] == [r["target"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert float(x[k]) == pytest.approx(float(y[k]), abs=1e-5), k


def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    args = ["solver.iters=20", "solver.gamma_steps=2", "data.batch_size=8"]
    _, full = _run("counterfactual/wine_scfe_gmm", tmp_path, "-", *args, out="full")
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _run("counterfactual/wine_scfe_gmm", tmp_path, "-", *args, *stop, out="resumed")
    _, resumed = _run("counterfactual/wine_scfe_gmm", tmp_path, "-", *args, out="resumed")
    m_full, m_res = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    for k, v in m_full.items():
        if "time" not in k:
            assert m_res[k] == pytest.approx(v, rel=1e-6), k  # samples of the first run are read back from disk


def _raises_config_error(match, name, tmp_path, *extra):
    """A ConfigError, raised directly or wrapped by Hydra's instantiation (its __cause__)."""
    with pytest.raises(Exception) as err:
        _run(name, tmp_path, *extra, out=re.sub(r"\W", "_", match))
    chain = [err.value, err.value.__cause__]
    assert any(isinstance(e, ConfigError) and re.search(match, str(e)) for e in chain), chain


def test_bad_configurations_are_config_errors(tmp_path):
    _raises_config_error("disagree", "counterfactual/digits_gse", tmp_path, "method.targets.rule=untargeted")
    _raises_config_error("equals the true class", "counterfactual/wine_cfe_l2", tmp_path,
                         "method.targets.rule=fixed", "method.targets.target=0")
    _raises_config_error("unknown density", "counterfactual/wine_scfe_kde", tmp_path, "solver.density.density=flow")
    _raises_config_error("excludes", "counterfactual/wine_cfe_l2", tmp_path, "method.box=[0.2,0.8]")


def test_untargeted_gse_through_the_method(tmp_path):
    _, out = _run("counterfactual/digits_gse", tmp_path, "method.targets.rule=untargeted", "solver.targeted=false")
    rec = read_sample(out / "samples", 0)
    assert rec["target"] == rec["source_label"]
    assert torch.isfinite(torch.as_tensor(rec["l2"]))
