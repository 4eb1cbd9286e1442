"""Plots of the analyses (matplotlib's object API on the Agg canvas: no pyplot, no global backend state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from equidiff.utils.io import atomic_save


@dataclass
class Series:
    """One line: ``y`` against ``x``; lines of the same ``group`` share a colour."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    group: str = ""
    linestyle: str = "-"
    marker: str | None = None
    style: dict = field(default_factory=dict)


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    return Path(path)


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    """A CHW image in [-1, 1] -> HWC (or HW for one channel) in [0, 1] for imshow."""
    x = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def plot_curves(series: Sequence[Series], path: str | Path, *, title: str, xlabel: str, ylabel: str,
                xlim: tuple[float, float] | None = None, hline: float | None = None, hline_label: str | None = None,
                examples: Mapping[float, torch.Tensor] | None = None, examples_label: str | None = None) -> Path:
    """Lines (one colour per group) with a legend; optionally a strip of example images under the x-axis.

    Args:
        examples: ``{x: CHW image in [-1, 1]}`` drawn as thumbnails centred at ``x`` (what the input looks
            like there, as in the seed's Figs. 4.5 and 4.6).
    """
    examples = dict(examples or {})
    fig = Figure(figsize=(8, 6.4 if examples else 5))
    if examples:
        gs = fig.add_gridspec(2, 1, height_ratios=[5, 1.1], hspace=0.45)
        ax, strip = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    else:
        ax, strip = fig.add_subplot(1, 1, 1), None
    groups = list(dict.fromkeys(s.group or s.label for s in series))
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for s in series:
        ax.plot(s.x, s.y, label=s.label, color=colors[s.group or s.label], linestyle=s.linestyle, marker=s.marker,
                markersize=3, linewidth=1.6, **s.style)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1, label=hline_label)
    all_x = [float(v) for s in series for v in s.x]
    lo, hi = xlim if xlim is not None else (min(all_x), max(all_x))
    if hi <= lo:  # a single point
        lo, hi = lo - 0.5, hi + 0.5
    ax.set_xlim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    if strip is not None:
        # thumbnails centred at their x, on the main axis' scale (the end ones may overhang it)
        strip.set_xlim(lo, hi)
        strip.set_ylim(0, 1)
        strip.axis("off")
        width = (hi - lo) / (len(examples) * 1.25)
        for x, image in sorted(examples.items()):
            img = _to_hwc(image)
            shown = strip.imshow(img, extent=(x - width / 2, x + width / 2, 0.0, 1.0), aspect="auto",
                                 cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            shown.set_clip_on(False)
            strip.text(x, -0.06, f"t={x:g}", ha="center", va="top", fontsize=7)
        if examples_label:
            strip.set_title(examples_label, loc="left", fontsize=8, pad=3)
    return _save(fig, path)


def plot_class_stats(class_names: Sequence[str],
                     panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                     path: str | Path, *, title: str) -> Path:
    """Per-class mean (dot) and std (error bar), one colour per classifier, side by side per class.

    ``panels``: ``{y-axis label: {classifier label: (means [K], stds [K])}}``, one subplot each, stacked.
    """
    k = len(class_names)
    fig = Figure(figsize=(max(8, 0.8 * k), 4 * len(panels) + 0.6))
    axes = [fig.add_subplot(len(panels), 1, p + 1) for p in range(len(panels))]
    for p, (ax, (ylabel, stats)) in enumerate(zip(axes, panels.items(), strict=True)):
        n = len(stats)
        offsets = np.linspace(-0.3, 0.3, n) if n > 1 else np.zeros(1)
        for i, (label, (mean, std)) in enumerate(stats.items()):
            ax.errorbar(np.arange(k) + offsets[i], mean, yerr=std, fmt="o", markersize=4, capsize=3,
                        color=f"C{i % 10}", label=label)
        ax.set_xticks(np.arange(k))
        last = p == len(panels) - 1
        ax.set_xticklabels(class_names if last else [], rotation=30 if k > 6 else 0,
                           ha="right" if k > 6 else "center")
        if last:
            ax.set_xlabel("class")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    axes[0].set_title(title)
    return _save(fig, path)
