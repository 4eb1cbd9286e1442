"""Grad-CAM of the retrained models (seed 001's qualitative figure): the wrapper equals pytorch_grad_cam on the
normalised input, CAMs localise where the logit looks, batch invariance, bad input, the region metric, and the
three gradcam experiments end to end on tiny checkpoints in the real (Lightning) format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from equidiff.classifiers.loaders import load_small_net
from equidiff.classifiers.nets import SmallCNN
from equidiff.classifiers.wrapper import Classifier
from equidiff.cli import run
from equidiff.errors import ConfigError
from equidiff.explain.gradcam import (
    CamRegionMass,
    ModelGroupAccuracy,
    balanced_rows,
    cam_overlay,
    default_layer_name,
    grad_cam,
    plain_background,
    target_layer,
)
from equidiff.methods.gradcam import GradCamComparison, resolve_model_path
from tests.helpers import compose_cfg


# ---------------------------------------------------------------- stand-in: tiny retrained models
def tiny_checkpoints(root: str, factory, **models) -> dict:
    """Hydra-targetable stand-in for ``method.models``: a randomly initialised network (``factory()``, the
    experiment's classifier) per model, saved as a Lightning-style checkpoint (``state_dict`` with the
    ``classifier.net.`` prefix, as ``GroupClassifierTraining`` writes) at ``<root>/<name>.ckpt``."""
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, spec) in enumerate(models.items()):
        torch.manual_seed(i)
        net = factory(weights_path=None).net
        path = root_path / f"{name}.ckpt"
        torch.save({"state_dict": {f"classifier.net.{k}": v for k, v in net.state_dict().items()}}, path)
        out[name] = {"path": str(path), "title": spec.get("title", name)}
    return out


MODELS = ["+method.models._target_=tests.pcfe.test_gradcam.tiny_checkpoints", "+method.models.root={tmp}/models",
          "+method.models.factory=${{classifier}}",  # braces doubled: the entries go through str.format
          # the stand-in's own keys (root, factory) would join ${oc.dict.keys:method.models}: name the models
          "metrics.accuracy.metric.names=[erm,pgd_l2,pgd_linf,cfe_l2,pcfe_l0]"]
BIG = {"waterbirds": "tests.pcfe.standins.fake_waterbirds", "spuco_animals": "tests.pcfe.standins.fake_spuco_animals"}

# experiment -> (verb, overrides): the entries for tests/test_experiments.py::OVERRIDES
OVERRIDES = {
    "digits/pcfe_gradcam": ("predict", [*MODELS, "metrics.cam_background.metric.names=[erm,pgd_l2,pgd_linf,cfe_l2,"
                                        "pcfe_l0]", "data.max_items=16", "data.batch_size=8",
                                        "callbacks.gradcam_figure.per_group=1"]),
    **{f"pcfe/{ds}_gradcam": ("predict", [*MODELS, "classifier.name=resnet18", "classifier.image_size=32",
                                          f"data._target_={target}", "data.root={tmp}/data", "data.image_size=32",
                                          "data.batch_size=4", "data.num_workers=0",
                                          "callbacks.gradcam_figure.per_group=1"])
       for ds, target in BIG.items()},
}


def _run(name: str, tmp_path: Path, extra=()) -> Path:
    verb, overrides = OVERRIDES[name]
    out = tmp_path / "out"
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={out}", f"paths.log_dir={tmp_path}/logs", "trainer=cpu",
                       *[o.format(tmp=tmp_path) for o in overrides], *extra])
    run(cfg, verb)
    return out


# ---------------------------------------------------------------- tiny networks
class Normalised(nn.Module):
    """A tiny CNN on ImageNet-normalised [0, 1] inputs (so the wrapper's mapping matters)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _normalised_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(Normalised(), input_range=(0, 1), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      channels=3, num_classes=3)


class RegionOnly(nn.Module):
    """Sees only the top-left quarter of the image (the input is masked first, convolutions without bias), so its
    logits and its activations depend only on that quarter (plus the 1-pixel reach of its 3x3 convolution)."""

    def __init__(self, size: int = 32):
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1
        self.register_buffer("mask", mask)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1, bias=False), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.features(x * self.mask))


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- reference, localisation, invariance
def test_the_wrapper_gives_pytorch_grad_cams_maps_on_the_normalised_input():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clf, x, y = _normalised_classifier(), _images(4), torch.tensor([0, 2, 1, 2])
    ours = grad_cam(clf, x, y, layer="features.3")
    with torch.no_grad():
        normalised = clf.preprocess(x)
    cam = GradCAM(model=clf.net, target_layers=[clf.net.features[3]])
    try:
        direct = cam(input_tensor=normalised, targets=[ClassifierOutputTarget(int(t)) for t in y])
    finally:
        cam.activations_and_grads.release()
    assert ours.shape == (4, 16, 16) and 0 <= ours.min() and ours.max() <= 1
    assert ours.std() > 0.05  # not a flat map
    np.testing.assert_allclose(ours.numpy(), direct, atol=1e-5)
    # the prediction is the default target
    np.testing.assert_allclose(grad_cam(clf, x, clf(x).argmax(-1)).numpy(), grad_cam(clf, x).numpy(), atol=1e-6)


def test_cam_mass_concentrates_where_the_logit_looks():
    inside = []
    for seed in range(4):
        torch.manual_seed(seed)
        clf = Classifier(RegionOnly(), input_range=(-1, 1), num_classes=2)
        x = _images(8, size=32, seed=seed)
        with torch.no_grad():
            pred = clf(x).argmax(-1)
        cams = grad_cam(clf, x, pred)  # the default layer: the last conv
        region = torch.zeros(8, 32, 32, dtype=torch.bool)
        region[:, :16, :16] = True
        metric = CamRegionMass(["m"])
        metric.update(cams[:, None], region)
        inside.append(metric.compute()["m"].item())
        assert metric.compute()["uniform_map"].item() == pytest.approx(0.25)
    # a flat map puts 1/4 of its mass on the quarter; the 3x3 convolution's reach leaks a 1-pixel rim outside it
    assert min(inside) > 0.8, inside


def test_batch_of_one_gives_the_maps_of_a_batch_of_four():
    clf, x, y = _normalised_classifier(1), _images(4, seed=2), torch.tensor([1, 0, 2, 1])
    together = grad_cam(clf, x, y)
    alone = torch.cat([grad_cam(clf, x[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_grad_cam_works_under_no_grad_and_leaves_the_model_as_it_was():
    clf = _normalised_classifier()
    clf.train()
    with torch.no_grad():
        cams = grad_cam(clf, _images(2), torch.tensor([0, 1]))
    assert cams.std() > 0
    assert clf.training and all(p.requires_grad and p.grad is None for p in clf.parameters())
    assert not clf.net.features[3]._forward_hooks  # pytorch_grad_cam's hooks are released


def test_default_layers_per_architecture():
    import torchvision

    assert default_layer_name(SmallCNN(3, 2)) == "features.5"
    assert default_layer_name(torchvision.models.resnet18(num_classes=2)) == "layer4"
    assert isinstance(target_layer(SmallCNN(3, 2)), nn.Conv2d)


# ---------------------------------------------------------------- bad input
def test_unknown_layer_is_a_clear_error_listing_the_valid_names():
    clf = load_small_net("cnn", in_channels=3, num_classes=2)
    with pytest.raises(ConfigError, match=r"unknown Grad-CAM layer 'features\.9'.*features\.5"):
        grad_cam(clf, _images(1, 8), layer="features.9")
    with pytest.raises(ConfigError, match="no nn.Conv2d"):
        default_layer_name(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_bad_images_and_targets_are_refused():
    clf = _normalised_classifier()
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        grad_cam(clf, _images(2) * 3)
    with pytest.raises(ConfigError, match="one target per image"):
        grad_cam(clf, _images(2), torch.tensor([0]))
    with pytest.raises(ConfigError, match="NCHW"):
        grad_cam(clf, _images(2)[0])


def test_a_missing_model_names_the_experiment_that_makes_it(tmp_path):
    spec = {"path": str(tmp_path / "nowhere" / "last.ckpt"), "experiment": "digits/pcfe_retrain_pcfe_l0"}
    with pytest.raises(ConfigError, match=r"'pcfe_l0'.*equidiff fit experiment=digits/pcfe_retrain_pcfe_l0"):
        resolve_model_path("pcfe_l0", spec)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_model_path("erm", str(tmp_path / "run")) == tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_the_method_refuses_an_unknown_layer_and_target(tmp_path):
    def factory(weights_path):
        return load_small_net("cnn", weights_path, in_channels=3, num_classes=2)

    models = tiny_checkpoints(str(tmp_path), factory, erm={})
    with pytest.raises(ConfigError, match="unknown Grad-CAM layer 'head2'"):
        GradCamComparison(models, factory, layer="head2")
    with pytest.raises(ConfigError, match="'label' or 'prediction'"):
        GradCamComparison(models, factory, target="logit")
    with pytest.raises(ConfigError, match="empty"):
        GradCamComparison({}, factory)


# ---------------------------------------------------------------- regions, metric, figure pieces
@pytest.mark.parametrize("strength", [1.0, 0.1])
def test_the_digits_background_is_the_pixels_without_ink_whatever_the_colour(strength):
    from equidiff.data.embedded import digits_arrays
    from equidiff.data.spurious_digits import BACKGROUNDS

    gray = digits_arrays("test", split_seed=0)[0][:32]  # [N, 1, 8, 8] in [-1, 1]
    colour = torch.arange(32) % 2
    palette = torch.tensor(BACKGROUNDS)
    palette = palette.mean(0) + strength * (palette - palette.mean(0))  # strong and faint cues
    ink = (gray + 1) / 2
    x = (palette[colour][:, :, None, None] * (1 - ink) + ink) * 2 - 1
    bg = plain_background({"image": x})
    assert torch.equal(bg, gray[:, 0] <= -1 + 1e-6)
    assert 0.3 < bg.float().mean() < 0.8


def test_plain_background_on_the_benchmark_data():
    from equidiff.data.spurious_digits import spurious_digits_arrays

    a = spurious_digits_arrays("test")
    bg = plain_background({"image": a["image"][:64]})
    assert 0.3 < bg.float().mean() < 0.8 and bg.any(dim=(1, 2)).all()


def test_cam_region_mass_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    cam = torch.randint(0, 256, (6, 3, 5, 5), generator=g).to(torch.uint8)
    cam[2, 1] = 0  # an empty map is counted apart
    region = torch.rand(6, 5, 5, generator=g) > 0.5
    m = CamRegionMass(["a", "b", "c"])
    m.update(cam[:4], region[:4])
    m.update(cam[4:], region[4:])
    out = m.compute()
    c, r = cam.double(), region.double()[:, None]
    frac = (c * r).sum((2, 3)) / c.sum((2, 3))
    for i, n in enumerate("abc"):
        ok = ~frac[:, i].isnan()
        assert out[n].item() == pytest.approx(frac[ok, i].mean().item())
        assert out[f"empty_maps/{n}"].item() == (~ok).sum().item()
    assert out["uniform_map"].item() == pytest.approx(region.double().mean().item())
    with pytest.raises(ConfigError, match="cam"):
        m.update(cam[:, :2], region)


def test_model_group_accuracy_equals_worst_group_accuracy_per_model():
    from equidiff.metrics.groups import WorstGroupAccuracy

    g = torch.Generator().manual_seed(0)
    label, group = torch.randint(0, 2, (40,), generator=g), torch.randint(0, 4, (40,), generator=g)
    pred = torch.randint(0, 2, (40, 2), generator=g)
    ours = ModelGroupAccuracy(["a", "b"], 4)
    ours.update(pred[:25], label[:25], group[:25])
    ours.update(pred[25:], label[25:], group[25:])
    out = ours.compute()
    for i, n in enumerate("ab"):
        ref = WorstGroupAccuracy(4)
        ref.update(pred[:, i], label, group)
        r = ref.compute()
        assert out[f"wga/{n}"].item() == pytest.approx(r["worst_group_acc"].item())
        assert out[f"acc/{n}"].item() == pytest.approx((pred[:, i] == label).double().mean().item())
    with pytest.raises(ConfigError, match="group ids"):
        ours.update(pred, label, group + 4)


def test_rows_are_balanced_over_groups_and_fixed_by_the_seed():
    groups, seeds = [0, 1, 0, 1, 2, 0, 2, 1], list(range(10, 18))
    rows = balanced_rows(groups, seeds, 2, seed=0)
    assert len(rows) == 6 and [groups[seeds.index(s)] for s in rows] == [0, 0, 1, 1, 2, 2]
    assert rows == balanced_rows(groups[::-1], seeds[::-1], 2, seed=0)  # not the order the samples came in


def test_overlay_is_uint8_nhwc():
    out = cam_overlay(_images(2, 8)[:, :1], torch.rand(2, 8, 8))
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------- experiments end to end
def test_digits_gradcam_runs_end_to_end_and_writes_the_figure_and_metrics(tmp_path):
    out = _run("digits/pcfe_gradcam", tmp_path)
    assert (out / "gradcam.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["erm", "pgd_l2", "pgd_linf", "cfe_l2", "pcfe_l0"]
    for n in names:
        assert 0.0 <= metrics[f"cam_background/{n}"] <= 1.0
        assert 0.0 <= metrics[f"accuracy/wga/{n}"] <= metrics[f"accuracy/acc/{n}"] <= 1.0
    assert 0.0 < metrics["cam_background/uniform_map"] < 1.0
    from equidiff.callbacks.records import read_sample

    side = read_sample(out / "samples", 0)
    assert side["cam"].shape == (5, 8, 8) and side["cam"].dtype == np.uint8 and side["pred"].shape == (5,)
    assert side["background"].shape == (8, 8)


def test_digits_gradcam_without_its_models_names_the_experiments(tmp_path):
    cfg = compose_cfg(["experiment=digits/pcfe_gradcam", f"paths.output_dir={tmp_path}/out",
                       f"paths.log_dir={tmp_path}/logs", "trainer=cpu"])
    # Hydra wraps errors raised while building the method; the ConfigError is the cause
    with pytest.raises(Exception, match="equidiff fit experiment=digits/pcfe_erm") as info:
        run(cfg, "predict")
    assert isinstance(info.value, ConfigError) or isinstance(info.value.__cause__, ConfigError)


@pytest.mark.parametrize("name", ["pcfe/waterbirds_gradcam", "pcfe/spuco_animals_gradcam"])
def test_resnet_gradcam_experiments_run_offline(name, tmp_path):
    out = _run(name, tmp_path)
    assert (out / "gradcam.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy/wga/pcfe_l0" in metrics and not any(k.startswith("cam_background") for k in metrics)
