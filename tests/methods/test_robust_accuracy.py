"""Table 4.1 protocol (RobustAccuracy) on a fake CIFAR-10 with tiny robustness-format classifiers; exact under DDP."""

import csv

import pytest
import torch

from equidiff.attacks import pgd_attack
from equidiff.classifiers import load_robustness
from equidiff.cli import run
from equidiff.data import CIFAR10DataModule
from equidiff.errors import ConfigError
from equidiff.methods import RobustAccuracy
from equidiff.methods.robust_accuracy import COLUMNS, markdown_table
from tests.analysis.standins import write_tiny_robustness_checkpoint
from tests.data.fakes import write_fake_cifar10
from tests.helpers import compose_cfg, run_cli

N_TEST = 7  # odd: two processes get 4 and 3 images
EPS = [0.0, 0.5, 2.0]
BATCHES = [slice(0, 4), slice(4, 7)]  # data.batch_size=4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A fake CIFAR-10 (real file format) and two tiny random ResNet-18s in the robustness checkpoint format,
    under the zoo's file names for eps_train 0 and 0.5."""
    root = tmp_path_factory.mktemp("zoo")
    write_fake_cifar10(root / "data" / "cifar10", n_train=10, n_test=N_TEST, seed=3)
    write_tiny_robustness_checkpoint(root / "weights" / "robustness" / "cifar_nat.pt", seed=0)
    write_tiny_robustness_checkpoint(root / "weights" / "robustness" / "cifar_l2_0_5.pt", seed=1)
    return root


def overrides(zoo, out, *extra):
    return ["experiment=robust_energy/cifar10_robust_accuracy", f"paths.output_dir={out}",
            f"paths.data_dir={zoo}/data", f"paths.weights_dir={zoo}/weights", "data.num_workers=0",
            "data.batch_size=4", "~method.classifiers.eps0_25", "~method.classifiers.eps1_0",
            "method.classifiers.eps0.arch=resnet18", "method.classifiers.eps0_5.arch=resnet18",
            f"method.test_eps=[{','.join(map(str, EPS))}]", "method.steps=2", "logger=csv", *extra]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_process(zoo):
    out = zoo / "one"
    result = run(compose_cfg([*overrides(zoo, out), "trainer=cpu"]), "test")
    return out, result[0]


def test_clean_accuracy_monotone_accuracies_and_table(zoo, one_process):
    out, metrics = one_process
    rows = read_rows(out / "robust_accuracy.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["classifier"], float(r["eps_test"])) for r in rows] == [(c, e) for c in ("eps0", "eps0_5") for e in EPS]
    assert all(int(r["total"]) == N_TEST for r in rows)
    test = CIFAR10DataModule(str(zoo / "data" / "cifar10")).dataset("test")
    x = torch.stack([test[i]["image"] for i in range(N_TEST)])
    y = torch.tensor([test[i]["label"] for i in range(N_TEST)])
    for name, file in (("eps0", "cifar_nat.pt"), ("eps0_5", "cifar_l2_0_5.pt")):
        # eval() on the wrapper too: pgd_attack restores the wrapper's train flag recursively, which would put
        # the (eval) network of a wrapper left in train mode into train mode (BatchNorm on batch statistics)
        clf = load_robustness(zoo / "weights" / "robustness" / file, arch="resnet18").eval()
        mine = [r for r in rows if r["classifier"] == name]
        acc = [float(r["accuracy"]) for r in mine]
        # eps_test = 0 is the clean accuracy
        with torch.no_grad():
            clean = (clf(x).argmax(-1) == y).sum().item()
        assert int(mine[0]["correct"]) == clean and acc[0] == clean / N_TEST
        # each eps_test is its own PGD run from x; here the accuracy does not rise with eps (not a theorem)
        assert acc == sorted(acc, reverse=True), acc
        # a cell equals a direct PGD (the same batches: a random net's near-ties can flip with float
        # rounding, which changes with the batch shape)
        x_adv = torch.cat([pgd_attack(clf, x[b], y[b], eps=0.5, steps=2, step_size=2.5 * 0.5 / 2) for b in BATCHES])
        with torch.no_grad():
            assert int(mine[1]["correct"]) == (clf(x_adv).argmax(-1) == y).sum().item()
        for r in mine:
            assert metrics[f"test/acc/{name}/eps_{float(r['eps_test'])}"] == pytest.approx(float(r["accuracy"]))
    # Table 4.1 layout: rows eps-test, columns eps-train (the display names)
    table = (out / "robust_accuracy.md").read_text().splitlines()
    assert table[0] == "| eps-test \\ eps-train | 0.0 | 0.5 |"
    assert table[1] == "| --- | --- | --- |"
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {e}" for e in EPS]
    first = [r for r in rows if r["eps_test"] == "0.0"]
    assert table[2] == "| 0.0 | " + " | ".join(f"{100 * float(r['accuracy']):.2f}%" for r in first) + " |"
    assert (out / "robust_accuracy.png").stat().st_size > 0
    logged = read_rows(out / "csv" / "metrics.csv")[-1]
    assert float(logged["test/acc/eps0/eps_0.0"]) == pytest.approx(float(rows[0]["accuracy"]))


def test_two_ddp_processes_give_the_one_process_table(zoo, one_process):
    # 7 images over 2 processes: 4 + 3, none repeated (a padding sampler would count one twice)
    out = zoo / "ddp"
    r = run_cli(["test", *overrides(zoo, out), "trainer=ddp_cpu", "trainer.devices=2"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "robust_accuracy.csv").read_text() == (one_process[0] / "robust_accuracy.csv").read_text()
    assert (out / "robust_accuracy.md").read_text() == (one_process[0] / "robust_accuracy.md").read_text()


def test_markdown_table_layout():
    rows = [{"classifier": c, "eps_test": e, "accuracy": a} for c, e, a in
            [("n", 0.0, 0.9525), ("n", 0.25, 0.0865), ("r", 0.0, 0.8162), ("r", 0.25, 0.7553)]]
    assert markdown_table(rows, {"n": "0.0", "r": "1.0"}, [0.0, 0.25]) == (
        "| eps-test \\ eps-train | 0.0 | 1.0 |\n| --- | --- | --- |\n"
        "| 0.0 | 95.25% | 81.62% |\n| 0.25 | 8.65% | 75.53% |\n")


def test_bad_input(zoo, tmp_path):
    clf = {"a": load_robustness(zoo / "weights" / "robustness" / "cifar_nat.pt", arch="resnet18")}
    for kwargs, match in [({"test_eps": []}, "test_eps is empty"), ({"test_eps": [0.5, -1]}, "distinct and >= 0"),
                          ({"test_eps": [0.5, 0.5]}, "distinct"), ({"steps": 0}, "steps >= 1")]:
        with pytest.raises(ConfigError, match=match):
            RobustAccuracy(clf, output_dir=str(tmp_path), **kwargs)
    with pytest.raises(ConfigError, match="no classifiers"):
        RobustAccuracy({}, output_dir=str(tmp_path))
    model = RobustAccuracy(clf, output_dir=str(tmp_path), test_eps=[0.0])
    with pytest.raises(ValueError, match=r"labels \[12\] are outside the classifier's 10 classes"):
        model.test_step({"image": torch.zeros(1, 3, 32, 32), "label": torch.tensor([12])}, 0)
    # an unknown classifier option is Hydra's error, naming the group
    with pytest.raises(Exception, match="cifar10_l2_eps3"):
        compose_cfg(["experiment=robust_energy/cifar10_robust_accuracy",
                     "classifier@method.classifiers.eps0=cifar10_l2_eps3"])


def test_pgd_protocol_against_the_closed_form_for_a_linear_two_class_model(tmp_path):
    """For logits W x + b with two classes, L2 PGD from x (step 2.5 eps / 20, 20 steps) walks straight along
    w_other - w_y to the eps-sphere: a sample falls iff its distance to the boundary, in [0, 1] pixel units,
    |f_1 - f_0| / (2 ||w_1 - w_0||) (images are 2 u - 1), is below eps."""
    from tests.analysis.common import ArrayDataModule, LinearProbe, trainer

    probe = LinearProbe(16, num_classes=2, seed=8)
    g = torch.Generator().manual_seed(0)
    u = 0.4 + 0.2 * torch.rand(60, 1, 4, 4, generator=g)  # away from the [0, 1] box: no clipping
    x = 2 * u - 1
    with torch.no_grad():
        logits = probe(x)
    y = logits.argmax(-1)  # clean accuracy 1
    d = (logits[:, 1] - logits[:, 0]).abs() / (2 * (probe.weight[1] - probe.weight[0]).norm())
    eps = [0.0, 0.02, 0.05, 0.1, 0.2]
    assert all((d - e).abs().min() > 1e-3 for e in eps[1:]) and 0 < (d < 0.2).sum() < len(d)
    model = RobustAccuracy({"lin": probe}, output_dir=str(tmp_path), test_eps=eps, steps=20)
    trainer().test(model, datamodule=ArrayDataModule(x, y, batch_size=16), verbose=False)
    rows = {float(r["eps_test"]): float(r["accuracy"]) for r in read_rows(tmp_path / "robust_accuracy.csv")}
    assert rows == {e: (d > e).double().mean().item() for e in eps}


def test_inference_mode_is_refused(tmp_path):
    import lightning as L

    from tests.analysis.common import ArrayDataModule, LinearProbe

    model = RobustAccuracy({"lin": LinearProbe(16, num_classes=2)}, output_dir=str(tmp_path), test_eps=[0.5])
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=True)
    with pytest.raises(ConfigError, match="inference_mode"):
        t.test(model, datamodule=ArrayDataModule(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
