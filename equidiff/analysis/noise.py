"""Classifiers on forward-diffused or darkened images (seed 002, section 4.4 and 4.6; Figs. 4.5, 4.6, 4.9).

For a clean image x_0 and a training timestep t of a DDPM scheduler:

    noise     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (eq. 2.23, Fig. 4.5, 4.9)
    darkness  x   = sqrt(alpha_bar_t) x_0, in the [0, 1] pixel space            (Fig. 4.6)
              (``space="diffusion"``: the same factor in the [-1, 1] space, a contraction towards grey)

Timesteps are diffusers' training indices t in [0, T - 1] (``scheduler.alphas_cumprod[t]``), so t = 0
is one step of noise (std 0.01 for the linear 1e-4..0.02 schedule) and the seed's "t = 1000" is
t = 999. eps is drawn from each sample's own seed, once, and shared by every t and classifier
(common random numbers: the curves are smooth, and a sample's result does not depend on the batch
size or the number of processes). For every (classifier, t) the analysis accumulates the accuracy,
the marginal energy E(x) = -logsumexp f(x) and the joint energy E(x, y) = -f(x)[y] in sum-reduced
states, so the CSV is exact under DDP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from equidiff.analysis.plots import Series, plot_curves
from equidiff.analysis.report import (
    check_classifiers,
    check_display_names,
    log_to_loggers,
    num_classes_of,
    write_csv,
)
from equidiff.analysis.stats import GridMoments
from equidiff.diffusion.schedulers import alpha_bar
from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, marginal_energy
from equidiff.utils.rng import generators_for, randn_per_sample

log = logging.getLogger(__name__)

CORRUPTIONS = ("noise", "darkness")
SPACES = ("pixel", "diffusion")
PLOTS = ("accuracy", "energy")
COLUMNS = ("classifier", "t", "sqrt_alpha_bar", "n", "accuracy", "mean_marginal_energy", "std_marginal_energy",
           "mean_joint_energy", "std_joint_energy")
TITLES = {
    ("noise", "accuracy"): "Accuracy under forward-diffusion noise x_t (seed 002, Fig. 4.5)",
    ("darkness", "accuracy"): "Accuracy at darkness sqrt(alpha_bar_t) x_0 (seed 002, Fig. 4.6)",
    ("noise", "energy"): "Mean E(x, y) and E(x) under forward-diffusion noise (seed 002, Fig. 4.9)",
    ("darkness", "energy"): "Mean E(x, y) and E(x) at darkness sqrt(alpha_bar_t) x_0",
}


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """The grid as sorted distinct ints in [0, T - 1]; an empty grid or a step outside is a ConfigError."""
    try:
        ts = [int(t) for t in timesteps]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"timesteps must be a list of integers, got {timesteps!r}") from e
    if not ts:
        raise ConfigError("the timestep grid is empty: give at least one t, e.g. method.timesteps=[0,100,500]")
    if any(float(t) != float(v) for t, v in zip(ts, timesteps, strict=True)):
        raise ConfigError(f"timesteps must be integers, got {list(timesteps)}")
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad:
        raise ConfigError(f"timesteps {bad[:10]} are outside [0, {num_train_timesteps - 1}], the scheduler's "
                          f"training timesteps (diffusers indices: the paper's t = {num_train_timesteps} is "
                          f"t = {num_train_timesteps - 1} here)")
    return sorted(set(ts))


def noised(x_0: torch.Tensor, t: int, scheduler, eps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 2.23), through the scheduler's ``add_noise``."""
    timesteps = torch.full((x_0.shape[0],), int(t), dtype=torch.long, device=x_0.device)
    return scheduler.add_noise(x_0, eps, timesteps)


def darkened(x_0: torch.Tensor, t: int, scheduler, space: str = "pixel") -> torch.Tensor:
    """sqrt(alpha_bar_t) x_0 without the noise: towards black in [0, 1] pixels, or towards grey in [-1, 1].

    ``space="pixel"``: (x + 1) / 2 is scaled and mapped back, x' = s (x + 1) - 1 (s = sqrt(alpha_bar_t)).
    ``space="diffusion"``: x' = s x.
    """
    if space not in SPACES:
        raise ConfigError(f"unknown darkness space {space!r}; choose one of {SPACES}")
    s = alpha_bar(scheduler, t).sqrt().to(x_0.device, x_0.dtype)
    return s * (x_0 + 1) - 1 if space == "pixel" else s * x_0


class NoiseAnalysis(L.LightningModule):
    """``equidiff test``: accuracy, E(x) and E(x, y) of each classifier at each timestep of a grid.

    ``test_step`` corrupts the batch at every t (``noised`` or ``darkened``), runs every classifier and
    adds per-sample values to the (classifier, t) cells of a sum-reduced ``GridMoments``. At the end,
    rank 0 writes ``<name>.csv`` (one row per classifier and t, columns ``COLUMNS``) and ``<name>.png``
    (one line per classifier) into ``output_dir`` and sends the curves (step = t), the plot and the
    table to the loggers.

    Args:
        classifiers: ``{name: classifier}`` taking images in [-1, 1].
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (e.g. ``DDPMScheduler`` from a config).
        timesteps: the grid of training timesteps, in [0, T - 1].
        output_dir: where the CSV and PNG go.
        corruption: "noise" (x_t) or "darkness" (sqrt(alpha_bar_t) x_0).
        space: for darkness, "pixel" ([0, 1], towards black: the seed's reading) or "diffusion".
        plot: what the PNG shows, "accuracy" or "energy" (the CSV always holds both).
        name: file stem (default ``<corruption>_<plot>``).
        title: plot title (default names the seed's figure).
        display_names: ``{name: label}`` for the legend (default: the names).
        plot_t_max: cut the plot's x-axis here (the seed cuts Fig. 4.5 at 500, Fig. 4.9 at 300).
        num_examples: thumbnails of the first image (dataset index 0) under the x-axis (0: none).
    """

    def __init__(self, classifiers: Mapping[str, nn.Module], scheduler, timesteps: Sequence[int], *,
                 output_dir: str, corruption: str = "noise", space: str = "pixel", plot: str = "accuracy",
                 name: str | None = None, title: str | None = None, display_names: Mapping[str, str] | None = None,
                 plot_t_max: int | None = None, num_examples: int = 6):
        super().__init__()
        if corruption not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
        if space not in SPACES:
            raise ConfigError(f"unknown darkness space {space!r}; choose one of {SPACES}")
        if plot not in PLOTS:
            raise ConfigError(f"unknown plot {plot!r}; choose one of {PLOTS}")
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ConfigError(f"the scheduler {type(scheduler).__name__} has no alphas_cumprod; use a diffusers "
                              f"DDPMScheduler/DDIMScheduler")
        self.classifiers = nn.ModuleDict(check_classifiers(classifiers))
        self.labels = check_display_names(list(self.classifiers), display_names)
        self.scheduler = scheduler
        self.timesteps = check_timesteps(timesteps, len(scheduler.alphas_cumprod))
        self.corruption, self.space, self.plot = corruption, space, plot
        self.output_dir = Path(output_dir)
        self.name = name or f"{corruption}_{plot}"
        self.title = title or TITLES[(corruption, plot)]
        self.plot_t_max = plot_t_max
        shown = [t for t in self.timesteps if plot_t_max is None or t <= plot_t_max]
        picks = torch.linspace(0, len(shown) - 1, min(num_examples, len(shown))).round().long().unique().tolist()
        self.example_ts = [shown[i] for i in picks] if num_examples > 0 and shown else []
        self.examples: dict[int, torch.Tensor] = {}
        # one cell per (classifier, t); values: correct, E(x), E(x, y)
        self.stats = GridMoments(len(self.classifiers) * len(self.timesteps), 3)

    def corrupt(self, x_0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        if self.corruption == "noise":
            return noised(x_0, t, self.scheduler, eps)
        return darkened(x_0, t, self.scheduler, self.space)

    def on_test_epoch_start(self) -> None:
        self.stats.reset()
        self.examples = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        x_0, y = batch["image"], batch["label"]
        # 1. eps ~ N(0, I) from each sample's own seed, shared by every t and classifier
        eps = randn_per_sample(x_0.shape[1:], generators_for(batch["seed"]), device=x_0.device, dtype=x_0.dtype)
        first = (batch["index"] == 0).nonzero().flatten()
        for j, t in enumerate(self.timesteps):
            # 2. x_t (eq. 2.23) or sqrt(alpha_bar_t) x_0
            x = self.corrupt(x_0, t, eps)
            if len(first) and t in self.example_ts:
                self.examples[t] = x[first[0]].detach().cpu()
            # 3. every classifier's accuracy and energies at t
            for i, clf in enumerate(self.classifiers.values()):
                logits = clf(x)
                values = torch.stack([(logits.argmax(-1) == y).double(), marginal_energy(logits).double(),
                                      joint_energy(logits, y).double()], dim=1)
                self.stats.update(torch.full_like(y, i * len(self.timesteps) + j), values)

    def rows(self) -> list[dict]:
        """One dict per (classifier, t) with ``COLUMNS`` (collective under DDP: every rank calls it)."""
        res = self.stats.compute()
        sqrt_ab = alpha_bar(self.scheduler, torch.tensor(self.timesteps)).sqrt().tolist()
        out = []
        for i, name in enumerate(self.classifiers):
            for j, t in enumerate(self.timesteps):
                c = i * len(self.timesteps) + j
                mean, std = res["mean"][c].tolist(), res["std"][c].tolist()
                out.append({"classifier": name, "t": t, "sqrt_alpha_bar": sqrt_ab[j], "n": int(res["count"][c]),
                            "accuracy": mean[0], "mean_marginal_energy": mean[1], "std_marginal_energy": std[1],
                            "mean_joint_energy": mean[2], "std_joint_energy": std[2]})
        return out

    def on_test_epoch_end(self) -> None:
        rows = self.rows()
        if not self.trainer.is_global_zero:
            return
        csv_path = write_csv(self.output_dir / f"{self.name}.csv", COLUMNS, rows)
        png_path = self.make_plot(rows)
        log.info("%s: wrote %s and %s", self.name, csv_path, png_path)
        for logger in self.trainer.loggers:
            for t in self.timesteps:
                at_t = [r for r in rows if r["t"] == t]
                metrics = {f"{self.name}/{key}/{r['classifier']}": r[key] for r in at_t
                           for key in ("accuracy", "mean_marginal_energy", "mean_joint_energy")}
                logger.log_metrics(metrics, step=t)
        log_to_loggers(self.trainer, images={f"{self.name}/plot": png_path},
                       tables={f"{self.name}/table": (COLUMNS, [[r[c] for c in COLUMNS] for r in rows])})

    def make_plot(self, rows: list[dict]) -> Path:
        series = []
        for name, label in self.labels.items():
            mine = [r for r in rows if r["classifier"] == name]
            ts = [r["t"] for r in mine]
            if self.plot == "accuracy":
                series.append(Series(label, ts, [100 * r["accuracy"] for r in mine]))
            else:
                series.append(Series(f"{label}: E(x, y)", ts, [r["mean_joint_energy"] for r in mine], group=name))
                series.append(Series(f"{label}: E(x)", ts, [r["mean_marginal_energy"] for r in mine], group=name,
                                     linestyle="--"))
        k = None
        try:
            k = num_classes_of(self.classifiers)
        except ConfigError:
            pass
        hi = self.timesteps[-1] if self.plot_t_max is None else min(self.plot_t_max, self.timesteps[-1])
        lo = self.timesteps[0]
        what = "x_t" if self.corruption == "noise" else f"sqrt(alpha_bar_t) x_0 ({self.space} space)"
        return plot_curves(
            series, self.output_dir / f"{self.name}.png", title=self.title,
            xlabel="timestep t (diffusers index)",
            ylabel="accuracy (%)" if self.plot == "accuracy" else "mean energy",
            xlim=(lo, hi) if hi > lo else None,
            hline=100 / k if self.plot == "accuracy" and k else None, hline_label="chance" if k else None,
            examples={t: self.examples[t] for t in self.example_ts if t in self.examples},
            examples_label=f"{what}, first test image",
        )
