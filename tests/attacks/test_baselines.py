"""FGSM, PGD-l2 / PGD-linf (ART) and CFE-l2: budgets, boxes, per-sample results, bad input."""

import copy

import pytest
import torch

from equidiff.attacks.baselines import cfe_l2, fgsm, pgd
from equidiff.attacks.targets import TargetRule
from equidiff.errors import ConfigError
from equidiff.utils.rng import generators_for
from tests.attacks.common import digits_images, wine


def _digits(n=16):
    x, y, clf = digits_images(40)
    x, y = x[:n], y[:n]
    return x, y, TargetRule("next", 10)(y), clf


@pytest.mark.parametrize("norm, eps", [("2", 0.5), ("2", 1.5), ("inf", 0.05), ("inf", 0.2)])
def test_pgd_stays_inside_its_eps_ball_and_the_box(norm, eps):
    x, y, target, clf = _digits()
    x_adv = pgd(clf, x, target, source=y, eps=eps, steps=10, norm=norm)
    delta = (x_adv - x) / 2  # eps is in [0, 1] pixel units; images are in [-1, 1]
    size = delta.flatten(1).norm(dim=1) if norm == "2" else delta.flatten(1).abs().amax(1)
    assert (size <= eps * (1 + 1e-5)).all(), size.max()
    assert size.max() > 0.5 * eps  # it does move
    assert ((x_adv >= -1) & (x_adv <= 1)).all()


def test_pgd_targeted_success_grows_with_eps():
    x, y, target, clf = _digits()
    rates = [(clf(pgd(clf, x, target, source=y, eps=e)).argmax(-1) == target).float().mean() for e in (0.25, 2.0)]
    assert rates[1] > rates[0] and rates[1] >= 0.9


def test_pgd_in_a_feature_box_keeps_the_budget_in_box_units():
    dm, _, (x, y), clf = wine()
    target = TargetRule("next", 3)(y)
    lo, hi = dm.box
    x_adv = pgd(clf, x, target, source=y, box=(lo, hi), eps=0.1, norm="inf", steps=5)
    assert ((x_adv - x).abs() <= 0.1 * (hi - lo) + 1e-5).all()
    assert ((x_adv >= lo - 1e-6) & (x_adv <= hi + 1e-6)).all()


def test_fgsm_is_one_signed_step_inside_the_box():
    x, y, target, clf = _digits()
    x_adv = fgsm(clf, x, target, source=y, eps=0.1)
    step = (x_adv - x).abs()
    assert ((step < 1e-6) | ((step - 0.2).abs() < 1e-6) | (x_adv.abs() == 1)).all()  # 2 eps in [-1, 1] units
    x_un = fgsm(clf, x, y, eps=0.1, targeted=False)
    loss = torch.nn.functional.cross_entropy
    assert loss(clf(x_un), y) > loss(clf(x), y)
    assert loss(clf(x_adv), target) < loss(clf(x), target)


@pytest.mark.parametrize("solver", ["pgd_l2", "pgd_linf", "fgsm", "cfe_l2"])
def test_a_sample_gets_the_same_result_in_a_batch_of_1_and_of_4(solver):
    x, y, target, clf = _digits(4)
    if solver == "cfe_l2":
        clf, x = copy.deepcopy(clf).double(), x.double()
    run = {"pgd_l2": lambda *a, **k: pgd(*a, eps=1.0, steps=5, **k),
           "pgd_linf": lambda *a, **k: pgd(*a, eps=0.1, steps=5, norm="inf", **k),
           "fgsm": lambda *a, **k: fgsm(*a, eps=0.1, **k),
           "cfe_l2": lambda *a, **k: cfe_l2(*a, box=(-1.0, 1.0), iters=50, gamma_steps=3, **k)}[solver]
    batch = run(clf, x, target, source=y)
    single = torch.cat([run(clf, x[i:i + 1], target[i:i + 1], source=y[i:i + 1]) for i in range(4)])
    atol = 1e-10 if solver == "cfe_l2" else 1e-5  # ART computes in float32
    torch.testing.assert_close(batch, single, rtol=0, atol=atol)


def test_cfe_l2_is_valid_on_held_out_wine_rows():
    dm, _, (x, y), clf = wine()
    target = TargetRule("uniform", 3)(y, generators_for(range(len(y))))
    x_cf = cfe_l2(clf, x, target, source=y, box=dm.box)
    assert (clf(x_cf).argmax(-1) == target).all()


def test_bad_input_is_a_config_error():
    x, y, target, clf = _digits(3)
    for run in (lambda t: pgd(clf, x, t, source=y), lambda t: fgsm(clf, x, t, source=y),
                lambda t: cfe_l2(clf, x, t, source=y, box=(-1.0, 1.0))):
        with pytest.raises(ConfigError, match="equals the true class"):
            run(y)
    with pytest.raises(ConfigError, match="excludes"):
        pgd(clf, x, target, source=y, box=(0.0, 1.0))
    with pytest.raises(ConfigError, match="eps"):
        fgsm(clf, x, target, eps=-1.0)
