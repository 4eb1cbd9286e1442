"""Classifiers under forward-diffusion noise and darkness: exact values, files, invariance, bad input."""

import logging
import math

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from equidiff.analysis import NoiseAnalysis, check_timesteps, darkened, noised
from equidiff.analysis.noise import COLUMNS
from equidiff.analysis.report import read_csv
from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, marginal_energy
from tests.analysis.common import ArrayDataModule, LinearProbe, RecordingLogger, toy_data, trainer

TS = [0, 50, 300, 999]


@pytest.fixture(scope="module")
def scheduler():
    # google/ddpm-cifar10-32's schedule
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def probes():
    return {"a": LinearProbe(16, seed=0), "b": LinearProbe(16, seed=1, scale=0.3)}


def analyse(tmp_path, scheduler, *, batch_size=4, data=None, seed=0, logger=False, **kwargs):
    images, labels = data if data is not None else toy_data()
    kwargs.setdefault("timesteps", TS)
    model = NoiseAnalysis(probes(), scheduler, output_dir=str(tmp_path), **kwargs)
    dm = ArrayDataModule(images, labels, batch_size=batch_size, seed=seed)
    trainer(logger).test(model, datamodule=dm, verbose=False)
    return read_csv(tmp_path / f"{model.name}.csv"), model


def direct(scheduler, images, labels, seeds, t, corruption="noise", space="pixel"):
    """The analysis by hand: one sample at a time, eps from the sample's own generator."""
    ab = scheduler.alphas_cumprod[t].double()
    out = {}
    for name, clf in probes().items():
        correct, e_x, e_xy = [], [], []
        for x0, y, s in zip(images, labels, seeds, strict=True):
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(s)))
            if corruption == "noise":
                x = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float()
            elif space == "pixel":
                x = (2 * (ab.sqrt() * (x0 + 1) / 2) - 1).float()
            else:
                x = (ab.sqrt() * x0).float()
            logits = clf(x[None])
            correct.append(float(logits.argmax(-1).item() == y))
            e_x.append(marginal_energy(logits).item())
            e_xy.append(joint_energy(logits, y[None]).item())
        out[name] = {"accuracy": sum(correct) / len(correct), "mean_marginal_energy": sum(e_x) / len(e_x),
                     "mean_joint_energy": sum(e_xy) / len(e_xy),
                     "std_marginal_energy": torch.tensor(e_x, dtype=torch.float64).std().item()}
    return out


# ---------------------------------------------------------------- the corruptions
def test_noised_is_eq_2_23_and_the_schedulers_add_noise(scheduler):
    x0, eps = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    for t in (0, 10, 500, 999):
        ab = scheduler.alphas_cumprod[t]
        torch.testing.assert_close(noised(x0, t, scheduler, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)  # t = 0 is one step of noise


def test_darkened_goes_to_black_in_pixels_or_to_grey_in_diffusion_space(scheduler):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    s = scheduler.alphas_cumprod[400].sqrt()
    pixel = darkened(x0, 400, scheduler)
    torch.testing.assert_close((pixel + 1) / 2, s * (x0 + 1) / 2)  # [0, 1] pixels scaled towards 0
    torch.testing.assert_close(darkened(x0, 400, scheduler, space="diffusion"), s * x0)
    black = darkened(x0, 999, scheduler)
    assert ((black + 1) / 2).max() < 0.01  # sqrt(alpha_bar_999) = 0.006
    with pytest.raises(ConfigError, match="unknown darkness space"):
        darkened(x0, 1, scheduler, space="lab")


def test_check_timesteps():
    assert check_timesteps([500, 0, 10, 10], 1000) == [0, 10, 500]
    with pytest.raises(ConfigError, match="empty"):
        check_timesteps([], 1000)
    with pytest.raises(ConfigError, match=r"\[1000\] are outside \[0, 999\].*t = 999 here"):
        check_timesteps([0, 1000], 1000)
    with pytest.raises(ConfigError, match="outside"):
        check_timesteps([-1], 1000)
    with pytest.raises(ConfigError, match="integers"):
        check_timesteps([1.5], 1000)
    with pytest.raises(ConfigError, match="list of integers"):
        check_timesteps(["ten"], 1000)


# ---------------------------------------------------------------- exact values
@pytest.mark.parametrize("corruption,space", [("noise", "pixel"), ("darkness", "pixel"), ("darkness", "diffusion")])
def test_values_equal_a_direct_computation(tmp_path, scheduler, corruption, space):
    images, labels = toy_data()
    rows, _ = analyse(tmp_path, scheduler, seed=100, corruption=corruption, space=space)
    assert [r["classifier"] for r in rows] == ["a"] * len(TS) + ["b"] * len(TS)
    for r in rows:
        t = int(r["t"])
        want = direct(scheduler, images, labels, range(100, 100 + len(labels)), t, corruption, space)[r["classifier"]]
        assert int(r["n"]) == len(labels)
        assert float(r["accuracy"]) == want["accuracy"]
        assert float(r["sqrt_alpha_bar"]) == pytest.approx(scheduler.alphas_cumprod[t].sqrt().item(), rel=1e-7)
        for key in ("mean_marginal_energy", "mean_joint_energy", "std_marginal_energy"):
            assert float(r[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-6), (t, key)


def test_noise_depends_on_the_sample_seeds_and_darkness_does_not(tmp_path, scheduler):
    a, _ = analyse(tmp_path / "a", scheduler, seed=0)
    b, _ = analyse(tmp_path / "b", scheduler, seed=1000)
    assert [r["mean_marginal_energy"] for r in a] != [r["mean_marginal_energy"] for r in b]
    a, _ = analyse(tmp_path / "c", scheduler, seed=0, corruption="darkness")
    b, _ = analyse(tmp_path / "d", scheduler, seed=1000, corruption="darkness")
    assert a == b


def test_batch_size_does_not_change_the_csv(tmp_path, scheduler):
    one, _ = analyse(tmp_path / "one", scheduler, batch_size=1)
    four, _ = analyse(tmp_path / "four", scheduler, batch_size=4)
    assert len(one) == len(four) == 2 * len(TS)
    for r1, r4 in zip(one, four, strict=True):
        for key in ("classifier", "t", "sqrt_alpha_bar", "n", "accuracy"):
            assert r1[key] == r4[key]
        for key in COLUMNS[5:]:  # float64 sums in another order, of float32 logits
            assert float(r1[key]) == pytest.approx(float(r4[key]), rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- files and loggers
@pytest.mark.parametrize("plot", ["accuracy", "energy"])
def test_writes_csv_and_png_and_logs_them(tmp_path, scheduler, plot):
    logger = RecordingLogger()
    rows, model = analyse(tmp_path, scheduler, logger=logger, plot=plot, plot_t_max=300,
                          display_names={"a": "eps=0"})
    assert model.name == f"noise_{plot}"
    header = (tmp_path / f"noise_{plot}.csv").read_text().splitlines()[0]
    assert header.split(",") == list(COLUMNS)
    assert len(rows) == 2 * len(TS)
    with Image.open(tmp_path / f"noise_{plot}.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    # curves against t (step = t), the plot and the table
    steps = [s for _, s in logger.metrics]
    assert steps == TS
    first, _ = logger.metrics[0]
    assert first[f"noise_{plot}/accuracy/a"] == float(rows[0]["accuracy"])
    assert logger.images[f"noise_{plot}/plot"] == [str(tmp_path / f"noise_{plot}.png")]
    columns, data = logger.tables[f"noise_{plot}/table"]
    assert columns == list(COLUMNS) and len(data) == len(rows)
    # the thumbnails: the first image (dataset index 0), at grid points up to plot_t_max
    assert set(model.examples) == {0, 50, 300}


def test_csv_logger_gets_the_curves(tmp_path, scheduler):
    from lightning.pytorch.loggers import CSVLogger

    rows, _ = analyse(tmp_path, scheduler, logger=CSVLogger(tmp_path, name="csv", version=""))
    logged = read_csv(tmp_path / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in logged] == TS
    assert [float(r["noise_accuracy/accuracy/b"]) for r in logged] == [float(r["accuracy"]) for r in rows[len(TS):]]


def test_chance_level_far_out_and_full_accuracy_at_t0(tmp_path, scheduler):
    # a classifier that is right on clean data: label = argmax of its own logits
    images, _ = toy_data(n=40)
    labels = probes()["a"](images).argmax(-1)
    rows, _ = analyse(tmp_path, scheduler, data=(images, labels), timesteps=[0])
    assert float(rows[0]["accuracy"]) == 1.0
    assert math.isfinite(float(rows[0]["std_joint_energy"]))


# ---------------------------------------------------------------- bad input
def test_bad_input(tmp_path, scheduler, caplog):
    with pytest.raises(ConfigError, match="empty"):
        NoiseAnalysis(probes(), scheduler, [], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="outside"):
        NoiseAnalysis(probes(), scheduler, [0, 1000], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown corruption"):
        NoiseAnalysis(probes(), scheduler, TS, output_dir=str(tmp_path), corruption="blur")
    with pytest.raises(ConfigError, match="unknown plot"):
        NoiseAnalysis(probes(), scheduler, TS, output_dir=str(tmp_path), plot="loss")
    with pytest.raises(ConfigError, match="no classifiers"):
        NoiseAnalysis({}, scheduler, TS, output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        model = NoiseAnalysis(probes(), scheduler, TS, output_dir=str(tmp_path), display_names={"a": "A", "c": "x"})
    assert model.labels == {"a": "A", "b": "b"} and "['c'] that are not in method.classifiers" in caplog.text
    with pytest.raises(ConfigError, match="must be non-empty and contain no"):
        NoiseAnalysis({"eps.5": LinearProbe(16)}, scheduler, TS, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="no alphas_cumprod"):
        NoiseAnalysis(probes(), object(), TS, output_dir=str(tmp_path))
    images, labels = toy_data()
    with pytest.raises(ValueError, match=r"labels \[7\] are outside the classifier's 3 classes"):
        analyse(tmp_path, scheduler, data=(images, torch.full_like(labels, 7)))
