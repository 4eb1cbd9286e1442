"""The Counterfactual method through the real configs: every counterfactual experiment runs offline, the
record, metrics, batch-size invariance, resume, bad input."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from equidiff.attacks.targets import TargetRule
from equidiff.callbacks.records import completed_seeds, read_sample
from equidiff.classifiers.wrapper import Classifier
from equidiff.cli import experiments, run
from equidiff.errors import ConfigError
from equidiff.methods.counterfactual import Counterfactual
from tests.attacks.common import one_thread
from tests.helpers import compose_cfg

CIFAR = ["paths.data_dir={tmp}/data", "data._target_=tests.analysis.standins.fake_cifar10", "data.num_workers=0",
         "classifier.weights_path=null", "data.batch_size=4"]
WINE = ["solver.iters=3", "solver.gamma_steps=2", "data.batch_size=16"]
DIGITS_TABULAR = ["solver.iters=2", "solver.gamma_steps=1", "data.predict_split=val", "data.batch_size=90",
                  "+metrics.kde.metric.density.bandwidth=0.5", "metrics.gmm.metric.density.n_components=2"]
DIGITS_IMAGES = ["classifier.weights_path=null", "data.batch_size=180"]
GSE_FAST = ["solver.iters=2", "solver.search_steps=1"]
# 90 test digits (each attacked toward 9 classes in the targeted protocol)
DIGITS_PROTOCOL = ["classifier.weights_path=null", "+data.test_fraction=0.05", "data.batch_size=45"]
# ImageNet stand-ins: three fake classes of 8x8 images, an untrained 3-class ResNet-18, two target offsets
IMAGENET = ["paths.data_dir={tmp}/data", "data._target_=tests.analysis.standins.fake_imagenet", "data.image_size=8",
            "data.indices_path=null", "data.num_workers=0", "classifier.weights_path=null", "classifier.name=resnet18",
            "classifier.image_size=8", "classifier.num_classes=3", "data.batch_size=4"]

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
    "counterfactual/digits_gse_protocol_targeted": ("predict", [*DIGITS_PROTOCOL, *GSE_FAST]),
    "counterfactual/digits_gse_protocol_untargeted": ("predict", [*DIGITS_PROTOCOL, *GSE_FAST]),
    "counterfactual/cifar10_gse_protocol_targeted": ("predict", [*CIFAR, *GSE_FAST]),
    "counterfactual/cifar10_gse_protocol_untargeted": ("predict", [*CIFAR, *GSE_FAST]),
    "counterfactual/imagenet_gse_protocol_targeted": ("predict", [*IMAGENET, *GSE_FAST,
                                                                  "method.targets.offsets=[2,1]"]),
    "counterfactual/imagenet_gse_protocol_untargeted": ("predict", [*IMAGENET, *GSE_FAST]),
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


# ----------------------------------------------------------------------------- GSE's evaluation protocol
class _AlwaysLast(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
        logits[:, -1] = 1.0
        return logits + 0 * x.flatten(1).sum(1, keepdim=True)


def never_right_classifier(num_classes: int = 11, **_) -> Classifier:
    """Stand-in for a classifier that gets nothing right: it always answers class K-1 (the data have K-1 classes)."""
    return Classifier(_AlwaysLast(num_classes), input_range=(-1.0, 1.0), num_classes=num_classes)


def _protocol_cases(recs, names=("acp", "anc", "d20", "l2")):
    """Best / average / worst case per input, recounted from the records as GSE's test_targeted does."""
    att = [r for r in recs if r["attacked"] == 1]
    out = {"best/asr": np.mean([r["valid"].any() for r in att]), "worst/asr": np.mean([r["valid"].all() for r in att]),
           "average/asr": np.mean(np.concatenate([r["valid"] for r in att]))}
    for n in names:
        best = [r[n][r["valid"] == 1].min() for r in att if r["valid"].any()]
        worst = [r[n].max() for r in att if r["valid"].all()]
        out[f"best/{n}"] = np.mean(best) if best else float("nan")
        out[f"worst/{n}"] = np.mean(worst) if worst else float("nan")
        out[f"average/{n}"] = np.mean(np.concatenate([r[n] for r in att]))
    return out


# a trained classifier (scikit-learn logistic regression, ~1 s) that gets most but not all of the 90 digits right
# ("-": instead of the fast-run entry's overrides)
LOGREG = ["-", "classifier=digits_logreg", "+data.test_fraction=0.05", "data.batch_size=45", *GSE_FAST]


def test_gse_protocol_records_every_target_of_each_correct_input(tmp_path):
    _, out = _run("counterfactual/digits_gse_protocol_targeted", tmp_path, *LOGREG)
    seeds = sorted(completed_seeds(out / "samples"))
    recs = [read_sample(out / "samples", s) for s in seeds]
    assert len(recs) == 90 and not list((out / "samples").glob("*.png"))  # one record per input, no single x'
    for r in recs:
        y = int(r["source_label"])
        assert r["target"].tolist() == [(y + o) % 10 for o in range(1, 10)]  # every other class
        assert r["counterfactual"].shape == (9, 1, 8, 8) and r["valid"].shape == r["acp"].shape == (9,)
        assert r["attacked"] == r["correct"] == float(r["source_pred"] == y)  # only correct inputs are attacked
        if not r["attacked"]:
            assert not r["valid"].any() and not r["l2"].any()  # x' = x
    metrics = json.loads((out / "metrics.json").read_text())
    n_correct = sum(r["correct"] for r in recs)
    assert 0 < n_correct < 90 and metrics["protocol/attacked"] == n_correct and metrics["protocol/inputs"] == 90
    assert 0 < metrics["protocol/average/asr"] < 1
    for k, v in _protocol_cases(recs).items():
        assert float(metrics[f"protocol/{k}"]) == pytest.approx(v, nan_ok=True), k


def test_gse_protocol_resume_and_batch_size_give_the_same_records(tmp_path):
    _, full = _run("counterfactual/digits_gse_protocol_untargeted", tmp_path, *LOGREG, out="full")
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=1"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _run("counterfactual/digits_gse_protocol_untargeted", tmp_path, *LOGREG, "data.batch_size=20", *stop,
             out="resumed")
    assert 0 < len(completed_seeds(tmp_path / "resumed" / "samples")) < 90
    _, resumed = _run("counterfactual/digits_gse_protocol_untargeted", tmp_path, *LOGREG, "data.batch_size=20",
                      out="resumed")
    m_full, m_res = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert m_full["protocol/successful/asr"] > 0
    for k, v in m_full.items():
        assert float(m_res[k]) == pytest.approx(float(v), rel=1e-9, nan_ok=True), k
    for s in (0, 33, 89):
        a, b = read_sample(full / "samples", s), read_sample(resumed / "samples", s)
        for k in ("counterfactual", "valid", "acp", "l2", "attacked"):
            np.testing.assert_array_equal(a[k], b[k])


def test_gse_protocol_bad_input_is_a_config_error_that_writes_nothing(tmp_path):
    name = "counterfactual/digits_gse_protocol_targeted"
    _raises_config_error(r"do not fit 10 classes.*method.targets.offsets", name, tmp_path,
                         "method.targets.offsets=[857,477]")
    assert not list(tmp_path.glob("*/samples/*"))  # found before anything is written
    _raises_config_error("classifies none of them correctly", name, tmp_path,
                         "classifier._target_=tests.methods.test_counterfactual.never_right_classifier",
                         "classifier.num_classes=11")
    assert not list(tmp_path.glob("*/metrics.json"))
    x = torch.zeros(2, 1, 8, 8)
    method = Counterfactual(never_right_classifier(), lambda *a, **k: a[1], TargetRule("offsets"), only_correct=True)
    with pytest.raises(ConfigError, match="no 'label' entry.*labelled dataset"):
        method.predict_step({"image": x, "seed": torch.arange(2), "index": torch.arange(2)}, 0)


@pytest.mark.slow
def test_gse_protocol_is_the_same_with_two_processes(tmp_path):
    """1 process vs 2 (gloo) through the CLI: the same records (whole inputs per seed) and metrics."""
    from tests.helpers import run_cli

    def make(name, *trainer):
        args = ["experiment=counterfactual/digits_gse_protocol_targeted", *LOGREG[1:], "data.batch_size=8",
                f"paths.output_dir={tmp_path}/{name}", "logger=none", *trainer]
        result = run_cli(["predict", *args], timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / name

    one, two = make("one", "trainer=cpu"), make("two", "trainer=ddp_cpu", "trainer.devices=2")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for k, v in m1.items():
        if "time" not in k:
            assert float(m2[k]) == pytest.approx(float(v), rel=1e-12, nan_ok=True), k
    for s in range(90):
        a, b = read_sample(one / "samples", s), read_sample(two / "samples", s)
        np.testing.assert_array_equal(a["valid"], b["valid"])
        np.testing.assert_allclose(a["counterfactual"], b["counterfactual"], rtol=0, atol=1e-6)
