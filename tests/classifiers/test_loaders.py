"""Loaders (robustness, torchvision, small nets), safe checkpoint loading and the convert CLI."""

import argparse
import os
import shlex
import warnings
from types import SimpleNamespace

import dill
import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from robustness import cifar_models
from robustness.attacker import AttackerModel
from robustness.tools.helpers import InputNormalize

from equidiff.classifiers import (
    Classifier,
    SmallCNN,
    UnsafeCheckpointError,
    load_robustness,
    load_small_net,
    load_torchvision,
    safe_torch_load,
)
from equidiff.classifiers.convert import main as convert_main
from equidiff.classifiers.loaders import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from equidiff.errors import ConfigError


# ---------------------------------------------------------------- fixtures and helpers
def randomise_bn(net, seed=0):
    """Random BatchNorm running statistics, so that forgetting to load buffers changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


class DataParallelLayout(torch.nn.Module):
    """Holds a module as ``self.module``: the state-dict layout of ``torch.nn.DataParallel`` (which would
    move the module to a GPU where there is one)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def attacker_model(net, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> AttackerModel:
    """robustness' own ``AttackerModel(net, dataset)``; it reads only ``dataset.mean`` / ``dataset.std``."""
    return AttackerModel(net, SimpleNamespace(mean=torch.tensor(mean), std=torch.tensor(std))).eval()


def robustness_checkpoint(net, mean=CIFAR10_MEAN, std=CIFAR10_STD, momentum=0.9):
    """A checkpoint as robustness' ``train.py`` saves it: ``{"model": DataParallel(AttackerModel(net)).state_dict(),
    "optimizer", "schedule", "epoch"}``, so the keys are robustness' own: ``module.normalizer.new_mean/new_std``,
    ``module.model.*``, ``module.attacker.normalize.*``, ``module.attacker.model.*``.

    ``momentum=0`` leaves the optimizer state without per-parameter buffers (a smaller file).
    """
    randomise_bn(net)
    model = DataParallelLayout(attacker_model(net, mean, std))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers in the optimizer state; the weights stay as they are
    opt.zero_grad()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[50, 100])
    return {"model": model.state_dict(), "epoch": 150, "optimizer": opt.state_dict(), "schedule": sched.state_dict()}


def expected_logits(net, x, mean, std, image_range=(0.0, 1.0)):
    lo, hi = image_range
    x = (x + 1) / 2 * (hi - lo) + lo
    with torch.no_grad():
        return net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def images(n=2, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def cifar_net():
    torch.manual_seed(0)
    return cifar_models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def robust_file(tmp_path_factory, cifar_net):
    path = tmp_path_factory.mktemp("robustness") / "cifar_resnet18.pt"
    torch.save(robustness_checkpoint(cifar_net), path)
    return path


class Pwn:
    """Unpickling this runs a shell command."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


class Hparams:
    """A custom class pickled alongside the weights, as dill-saved training scripts do."""

    def __init__(self):
        self.lr_lambda = lambda epoch: 0.1 ** (epoch // 50)


# ---------------------------------------------------------------- robustness
def test_robustness_checkpoint_gives_the_source_logits(robust_file, cifar_net):
    clf = load_robustness(robust_file, arch="resnet18")
    assert isinstance(clf, Classifier)
    assert (clf.input_range, clf.channels, clf.image_size, clf.num_classes) == ((0.0, 1.0), 3, (32, 32), 10)
    x = images()
    torch.testing.assert_close(clf(x), expected_logits(cifar_net, x, CIFAR10_MEAN, CIFAR10_STD))


def test_checkpoint_keys_are_robustness_own_layout(cifar_net):
    state = robustness_checkpoint(cifar_net, momentum=0)["model"]
    n = len(cifar_net.state_dict())
    heads = [".".join(k.split(".")[:3 if k.startswith("module.attacker.") else 2]) for k in state]
    assert sorted(set(heads)) == ["module.attacker.model", "module.attacker.normalize", "module.model",
                                  "module.normalizer"]
    assert len(state) == 2 * n + 4 and state["module.normalizer.new_mean"].shape == (3, 1, 1)


def out_of_range_images(n=3, size=32, seed=2):
    """[-1, 1] images with a third of the pixels pushed outside, as in a noisy x_t (N(0, 2.25) noise)."""
    x = images(n, size, seed) + 1.5 * torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    outside = (x.abs() > 1).float().mean()
    assert 0.25 < outside < 0.6
    return x


@pytest.mark.parametrize("inside", [True, False])
def test_robustness_clamp_equals_their_input_normalize(robust_file, cifar_net, inside):
    """Logits and input gradients equal robustness' ``InputNormalize`` (clamp to [0, 1], then normalise),
    on [-1, 1] images and on images partly outside; the outside pixels get no gradient."""
    clf = load_robustness(robust_file, arch="resnet18")
    assert clf.clamp
    normalize = InputNormalize(torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD))
    x = images(3) if inside else out_of_range_images()
    y = torch.tensor([0, 3, 7])

    def logits_and_grad(f):
        xg = x.clone().requires_grad_(True)
        logits = f(xg)
        (grad,) = torch.autograd.grad(logits.log_softmax(-1).gather(1, y[:, None]).sum(), xg)
        return logits.detach(), grad

    ours, g_ours = logits_and_grad(clf)
    ref, g_ref = logits_and_grad(lambda v: cifar_net(normalize((v + 1) / 2)))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    outside = x.abs() > 1
    assert (g_ours[outside] == 0).all() and (g_ours[~outside] != 0).float().mean() > 0.99
    assert outside.any() != inside


def test_robustness_clamp_off_is_the_unclamped_map(robust_file, cifar_net):
    x = out_of_range_images()
    clamped = load_robustness(robust_file, arch="resnet18")
    unclamped = load_robustness(robust_file, arch="resnet18", clamp=False)
    assert not unclamped.clamp
    want = expected_logits(cifar_net, x, CIFAR10_MEAN, CIFAR10_STD)  # (x + 1) / 2, normalised, no clamp
    torch.testing.assert_close(unclamped(x), want)
    assert (clamped(x) - want).abs().max() > 1e-3
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(unclamped(xg)[:, 0].sum(), xg)
    assert (g[x.abs() > 1] != 0).float().mean() > 0.99  # no clamp: every pixel has a gradient
    # the same image inside the range: no difference
    inside = x.clamp(-1, 1)
    torch.testing.assert_close(unclamped(inside), clamped(inside))


@pytest.mark.parametrize("strip_module", [False, True])
def test_robustness_state_dict_key_with_or_without_module_prefix(tmp_path, cifar_net, strip_module):
    """robustness' model_utils reads ``model`` or else ``state_dict``; a model saved without DataParallel has
    no ``module.`` prefix. The normaliser's mean/std come from the checkpoint, not the dataset defaults."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ckpt = robustness_checkpoint(cifar_net, mean, std, momentum=0)
    ckpt["state_dict"] = {(k.removeprefix("module.") if strip_module else k): v for k, v in ckpt.pop("model").items()}
    torch.save(ckpt, tmp_path / "r18.pt")
    clf = load_robustness(tmp_path / "r18.pt", arch="resnet18")
    x = torch.cat([images(1), out_of_range_images(1)])
    torch.testing.assert_close(clf(x), attacker_model(cifar_net, mean, std)((x + 1) / 2, with_image=False))


def test_robustness_default_arch_is_their_cifar_resnet50(tmp_path):
    torch.manual_seed(3)
    net = randomise_bn(cifar_models.resnet50(num_classes=4))
    torch.save(robustness_checkpoint(net, momentum=0), tmp_path / "r50.pt")
    clf = load_robustness(tmp_path / "r50.pt")  # num_classes read from the head
    assert isinstance(clf.net, cifar_models.ResNet) and clf.num_classes == 4
    loaded = clf.net.state_dict()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


def test_robustness_imagenet_layout(tmp_path):
    torch.manual_seed(4)
    net = randomise_bn(torchvision.models.resnet18(num_classes=5))
    ckpt = robustness_checkpoint(net, IMAGENET_MEAN, IMAGENET_STD, momentum=0)
    torch.save(ckpt, tmp_path / "imagenet_r18.pt")
    clf = load_robustness(tmp_path / "imagenet_r18.pt", arch="resnet18", dataset="imagenet")
    assert clf.image_size == (224, 224) and clf.num_classes == 5 and not clf.resize
    # wrapper arguments override the defaults; a small input keeps the test fast
    clf = load_robustness(tmp_path / "imagenet_r18.pt", arch="resnet18", dataset="imagenet", image_size=32)
    x = images(1, 32)
    torch.testing.assert_close(clf(x), expected_logits(net, x, IMAGENET_MEAN, IMAGENET_STD))


def test_robustness_missing_normalizer_falls_back_with_a_warning(tmp_path, cifar_net):
    state = {f"model.{k}": v for k, v in cifar_net.state_dict().items()}
    torch.save({"model": state}, tmp_path / "no_norm.pt")
    with pytest.warns(UserWarning, match="no normalizer"):
        clf = load_robustness(tmp_path / "no_norm.pt", arch="resnet18")
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(clf.std.flatten(), torch.tensor(CIFAR10_STD))


def test_robustness_wrong_arch_or_classes_lists_keys(robust_file):
    with pytest.raises(ConfigError, match=r"198 missing key\(s\) \[.layer1\.0\.conv3"):
        load_robustness(robust_file, arch="resnet50")
    with pytest.raises(ConfigError, match="size mismatch for linear.weight"):
        load_robustness(robust_file, arch="resnet18", num_classes=7)
    with pytest.raises(ConfigError, match="unknown robustness CIFAR architecture 'resnet9'.*resnet18"):
        load_robustness(robust_file, arch="resnet9")
    with pytest.raises(ConfigError, match="unknown robustness dataset"):
        load_robustness(robust_file, dataset="mnist")


def test_robustness_missing_file_names_path_and_zoo(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*nope\.pt.*MadryLab robustness model zoo") as err:
        load_robustness(tmp_path / "nope.pt")
    assert f"convert --trust-pickle --in-place {tmp_path / 'nope.pt'}" in str(err.value)


# ---------------------------------------------------------------- safe loading
def test_pickled_callable_is_refused_and_not_run(tmp_path, cifar_net):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": robustness_checkpoint(cifar_net)["model"], "hook": Pwn(target)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system") as err:
        load_robustness(path, arch="resnet18")
    msg = str(err.value)
    assert "was not executed" in msg and "--trust-pickle" in msg and str(path) in msg
    assert isinstance(err.value, ConfigError)
    assert not target.exists()
    # the payload is real: an unsafe load does run it
    torch.load(path, weights_only=False)
    assert target.read_text().strip() == "pwned"


def test_legacy_format_pickled_callable_is_refused(tmp_path):
    target, path = tmp_path / "pwned", tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "hook": Pwn(target)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"needs posix\.system.*was not executed"):
        safe_torch_load(path)
    assert not target.exists()


def test_plain_data_types_load(tmp_path):
    ckpt = {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1, arch="resnet18"),
            "best": np.float64(0.93), "step": np.int64(7), "big_endian": np.dtype(">f4").type(1.5),
            "flag": np.bool_(True), "name": np.str_("x"), "dtype": np.dtype("int16"),
            "nested": [np.float32(2.0)]}
    torch.save(ckpt, tmp_path / "plain.pt")
    out = safe_torch_load(tmp_path / "plain.pt")
    assert out["args"].lr == 0.1 and out["args"].arch == "resnet18"
    assert out["best"] == 0.93 and out["best"].dtype == np.float64
    assert out["step"] == 7 and out["big_endian"] == 1.5 and out["flag"] and out["name"] == "x"
    assert out["dtype"] == np.dtype("int16") and out["nested"][0] == 2.0


class _ForgedDType:
    """A dtype whose pickled state adds an object field to plain bytes (numpy's setstate accepts it)."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class _ForgedScalar:
    """A numpy scalar whose object field is a pointer read from the file: a crash when printed."""

    def __reduce__(self):
        return (np._core.multiarray.scalar, (_ForgedDType(), b"\x41" * 8))


@pytest.mark.parametrize("payload", [_ForgedScalar(), np.array([1.0, 2.0]), np.dtype("i4,O")])
def test_numpy_beyond_plain_scalars_is_refused(tmp_path, payload):
    torch.save({"x": payload}, tmp_path / "np.pt")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(tmp_path / "np.pt")


def test_safe_load_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint not found: .*absent\.pt"):
        safe_torch_load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt"):
        safe_torch_load(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"junk\.safetensors"):
        safe_torch_load(tmp_path / "junk.safetensors")


def test_extra_allowed(tmp_path):
    torch.save({"loss": torch.nn.MSELoss()}, tmp_path / "hp.pt")
    with pytest.raises(UnsafeCheckpointError, match="MSELoss"):
        safe_torch_load(tmp_path / "hp.pt")
    assert isinstance(safe_torch_load(tmp_path / "hp.pt", extra_allowed=[torch.nn.MSELoss])["loss"],
                      torch.nn.MSELoss)


# ---------------------------------------------------------------- convert
def test_convert_dill_checkpoint(tmp_path, cifar_net, capsys):
    src, out = tmp_path / "dill.pt", tmp_path / "converted.safetensors"
    ckpt = robustness_checkpoint(cifar_net)
    ckpt.update(hparams=Hparams(), lr_fn=lambda e: e / 2)
    torch.save(ckpt, src, pickle_module=dill)
    with pytest.raises(UnsafeCheckpointError, match="dill"):
        load_robustness(src, arch="resnet18")
    assert convert_main([str(src), str(out)]) == 1  # without --trust-pickle: refused, with the fix
    assert "--trust-pickle" in capsys.readouterr().err
    assert not out.exists()

    assert convert_main([str(src), str(out), "--trust-pickle"]) == 0
    assert "WARNING" in capsys.readouterr().err
    state = safe_torch_load(out)
    assert "module.normalizer.new_mean" in state and not any("attacker" in k for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    x = images()
    torch.testing.assert_close(load_robustness(out, arch="resnet18")(x),
                               expected_logits(cifar_net, x, CIFAR10_MEAN, CIFAR10_STD))
    assert not list(tmp_path.glob(".converted*"))  # no temporary file left behind


def zoo_file(path, net):
    """A file like the zoo's: robustness' checkpoint dict saved with dill, holding a function (so it needs dill)."""
    ckpt = robustness_checkpoint(net, momentum=0)
    ckpt["lr_fn"] = lambda epoch: 0.1 ** (epoch // 50)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path, pickle_module=dill)
    return path


def test_zoo_file_converted_in_place_loads_through_its_config(tmp_path, cifar_net):
    """The README's story: the zoo file at the path the config names -> refused, with the command -> that
    command converts it in place -> the unchanged config loads it, equal to robustness' own AttackerModel."""
    from tests.helpers import compose_cfg

    zoo = zoo_file(tmp_path / "weights" / "robustness" / "cifar_l2_0_5.pt", cifar_net)
    cfg = compose_cfg(["classifier=cifar10_l2_eps0_5", f"paths.weights_dir={tmp_path / 'weights'}",
                       "classifier.arch=resnet18"])  # a ResNet-18 keeps the file small; the rest is the config
    with pytest.raises(Exception) as err:  # Hydra wraps it; the CLI prints the ConfigError's message
        instantiate(cfg.classifier)
    assert isinstance(err.value.__cause__, UnsafeCheckpointError)
    command = f"python -m equidiff.classifiers.convert --trust-pickle --in-place {zoo}"
    assert command in str(err.value.__cause__)
    assert convert_main(shlex.split(command)[3:]) == 0
    assert not list(zoo.parent.glob(".*"))  # no temporary file left
    state = safe_torch_load(zoo)  # now a flat tensor dict, weights-only loadable
    assert "module.normalizer.new_mean" in state and not any(".attacker." in k for k in state)

    clf = instantiate(cfg.classifier)
    assert clf.clamp and clf.input_range == (0.0, 1.0)
    x = torch.cat([images(1), out_of_range_images(2)])
    want = attacker_model(cifar_net)((x + 1) / 2, with_image=False)
    torch.testing.assert_close(clf(x), want)
    # classifier.clamp=false: the unclamped map
    off = instantiate(compose_cfg(["classifier=cifar10_l2_eps0_5", f"paths.weights_dir={tmp_path / 'weights'}",
                                   "classifier.arch=resnet18", "classifier.clamp=false"]).classifier)
    torch.testing.assert_close(off(x), expected_logits(cifar_net, x, CIFAR10_MEAN, CIFAR10_STD))
    # converting again is harmless (the file is already plain)
    assert convert_main(["--in-place", str(zoo)]) == 0
    torch.testing.assert_close(instantiate(cfg.classifier)(x), want)


def test_convert_arguments(tmp_path, cifar_net, capsys):
    a, b = (zoo_file(tmp_path / name, cifar_net) for name in ("a.pt", "b.pt"))
    before = a.read_bytes()
    assert convert_main(["--in-place", str(a), str(b)]) == 1  # dill needs --trust-pickle; nothing written
    assert "--trust-pickle --in-place" in capsys.readouterr().err and a.read_bytes() == before
    assert convert_main(["--trust-pickle", "--in-place", str(a), str(b)]) == 0
    assert all("module.model.linear.weight" in safe_torch_load(p) for p in (a, b))
    for argv in ([str(a)], [str(a), str(b), str(tmp_path / "c.pt")]):
        with pytest.raises(SystemExit):
            convert_main(argv)
        assert "--in-place FILE" in capsys.readouterr().err


def test_convert_state_dict_to_pt(tmp_path):
    torch.manual_seed(5)
    net = SmallCNN(width=4)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 2}, tmp_path / "l.ckpt")
    assert convert_main([str(tmp_path / "l.ckpt"), str(tmp_path / "sd.pt"), "--format", "state_dict"]) == 0
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert set(state) == {f"net.{k}" for k in net.state_dict()}
    assert convert_main([str(tmp_path / "l.ckpt"), str(tmp_path / "r.pt"), "--format", "robustness"]) == 1


# ---------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def tv_net():
    torch.manual_seed(6)
    return randomise_bn(torchvision.models.resnet18(num_classes=3))


def test_torchvision_plain_state_dict(tmp_path, tv_net):
    torch.save(tv_net.state_dict(), tmp_path / "r18.pth")
    clf = load_torchvision("resnet18", weights_path=tmp_path / "r18.pth", num_classes=3, image_size=32)
    x = images(2, 32)
    torch.testing.assert_close(clf(x), expected_logits(tv_net, x, IMAGENET_MEAN, IMAGENET_STD))


def test_torchvision_lightning_checkpoint_prefix(tmp_path, tv_net):
    state = {f"net.{k}": v for k, v in tv_net.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)
    torch.save({"state_dict": state, "epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.5.0",
                "hyper_parameters": {"lr": 0.1, "args": argparse.Namespace(seed=0)}}, tmp_path / "last.ckpt")
    x = images(1, 32)
    want = expected_logits(tv_net, x, IMAGENET_MEAN, IMAGENET_STD)
    for prefix in (None, "net", "net."):
        clf = load_torchvision("resnet18", weights_path=tmp_path / "last.ckpt", num_classes=3, image_size=32,
                               strip_prefix=prefix)
        torch.testing.assert_close(clf(x), want)
    with pytest.raises(ConfigError, match="no checkpoint key starts with 'model.'"):
        load_torchvision("resnet18", weights_path=tmp_path / "last.ckpt", num_classes=3, strip_prefix="model")


def test_torchvision_ambiguous_prefix_and_mismatch(tmp_path, tv_net):
    sd = tv_net.state_dict()
    two = {**{f"net.{k}": v for k, v in sd.items()}, **{f"ema.net.{k}": v for k, v in sd.items()}}
    torch.save({"state_dict": two}, tmp_path / "two.ckpt")
    with pytest.raises(ConfigError, match=r"several prefixes \['ema.net.', 'net.'\].*strip_prefix"):
        load_torchvision("resnet18", weights_path=tmp_path / "two.ckpt", num_classes=3)
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"do not fit torchvision resnet34.*missing key\(s\)"):
        load_torchvision("resnet34", weights_path=tmp_path / "r18.pth", num_classes=3)


def test_torchvision_missing_file_random_init_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*r50\.pth.*get_model_weights\('resnet50'\)"):
        load_torchvision("resnet50", weights_path=tmp_path / "r50.pth")
    clf = load_torchvision("resnet18", num_classes=2, image_size=32)  # random init, no download
    assert clf(images(1, 32)).shape == (1, 2)
    with pytest.raises(ConfigError, match="unknown torchvision classification model 'resnet7'"):
        load_torchvision("resnet7")


# ---------------------------------------------------------------- small nets
def test_small_cnn_weights(tmp_path):
    torch.manual_seed(7)
    net = SmallCNN(in_channels=1, num_classes=10, width=8).eval()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "cnn.ckpt")
    clf = load_small_net("cnn", tmp_path / "cnn.ckpt", image_size=8, width=8)
    assert (clf.input_range, clf.channels, clf.num_classes, clf.mean) == ((-1.0, 1.0), 1, 10, None)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(clf(x), net(x))
    with pytest.raises(ConfigError, match="size mismatch"):
        load_small_net("cnn", tmp_path / "cnn.ckpt", width=16)
    with pytest.raises(ConfigError, match="not found"):
        load_small_net("cnn", tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="unknown small net kind"):
        load_small_net("rnn")


def test_small_mlp_on_points(tmp_path):
    torch.manual_seed(8)
    clf = load_small_net("mlp", hidden=16)
    torch.save(clf.net.state_dict(), tmp_path / "mlp.pt")
    loaded = load_small_net("mlp", tmp_path / "mlp.pt", hidden=16)
    x = torch.rand(5, 2) * 2 - 1
    assert loaded.num_classes == 2
    torch.testing.assert_close(loaded(x), clf.net(x))


def test_no_warnings_on_the_normal_path(robust_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_robustness(robust_file, arch="resnet18")
