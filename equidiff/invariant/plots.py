"""The 2D concentric-circles figure of seed 000 (Fig. 3.1), from a finished invariant-sampling run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from equidiff.utils.io import atomic_write

log = logging.getLogger(__name__)


def probability_grid(classifier, lim: float = 1.6, n: int = 200, cls: int = 1):
    """p(cls | x) of ``classifier`` on an n x n grid over [-lim, lim]^2: (xs, ys, P)."""
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
    with torch.no_grad():
        p = classifier(pts).softmax(-1)[:, cls].reshape(n, n).numpy()
    return xs, xs, p


def circles_figure(path: Path, data_x: np.ndarray, data_y: np.ndarray, classifier, queries: list[dict],
                   test_accuracy: float | None = None) -> Path:
    """Fig. 3.1: (a) the data, (b) the probability heat map with the 0.5 boundary, (c...) one panel per query:
    its invariant set (orange; samples that did not converge within the budget as grey crosses) over the heat
    map, the query (black star) and its level curve; max |dp| is over the converged samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, p = probability_grid(classifier)
    n = 2 + len(queries)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
    ax = axes[0]
    ax.scatter(*data_x[data_y == 0].T, s=4, c="tab:blue", label="outer")
    ax.scatter(*data_x[data_y == 1].T, s=4, c="tab:pink", label="inner")
    ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, ls="--", color="k", lw=0.8))
    ax.set_title(f"(a) data, {len(data_x)} points")
    ax.legend(loc="lower right", fontsize=7)
    for k, ax in enumerate(axes[1:]):
        ax.contourf(xs, ys, p, levels=20, cmap="RdBu_r", vmin=0, vmax=1)
        ax.contour(xs, ys, p, levels=[0.5], colors="k", linewidths=1.0)
        if k == 0:
            acc = f", test acc {test_accuracy:.3f}" if test_accuracy is not None else ""
            ax.set_title(f"(b) MLP p(inner){acc}")
            continue
        q = queries[k - 1]
        ax.contour(xs, ys, p, levels=[q["p"]], colors="gold", linewidths=1.0, linestyles="--")
        conv = q.get("converged", np.ones(len(q["samples"]), dtype=bool))
        ax.scatter(*q["samples"][conv].T, s=6, c="tab:orange", label="invariant set")
        if (~conv).any():  # not below tau within the budget: shown, but not part of the set
            ax.scatter(*q["samples"][~conv].T, s=10, c="0.6", marker="x", linewidths=0.8, label="not converged")
        ax.scatter(*q["point"], marker="*", s=160, c="k", label="query")
        ax.set_title(f"({chr(ord('b') + k)}) p = {q['p']:.3f}, max |dp| = {q['max_dp']:.4f}"
                     + (f"\n{conv.sum()}/{len(conv)} converged" if (~conv).any() else ""), fontsize=9)
    for ax in axes:
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


class CirclesFigure(Callback):
    """After an invariant-sampling predict on circles, rank 0 draws Fig. 3.1 into ``<output_dir>/<filename>``.

    Reads every sample's sidecar (points ``x``, ``query``, ``query_index``) written by ``SampleWriter``;
    the classifier is the method's objective's classifier; ``data`` gives the training points of panel (a).
    """

    def __init__(self, output_dir: str, data, filename: str = "circles.png", cls: int = 1):
        super().__init__()
        self.output_dir, self.data, self.filename, self.cls = Path(output_dir), data, filename, cls

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from equidiff.callbacks.records import read_sample

        npz = self.output_dir / "samples.npz"
        if not npz.exists():
            return
        with np.load(npz) as z:
            seeds = z[z.files[-1]]
        classifier = pl_module.objective.classifier.cpu()
        by_query: dict[int, dict] = {}
        for s in seeds:
            side = read_sample(self.output_dir / "samples", int(s))
            q = by_query.setdefault(int(side["query_index"]), {"point": side["query"], "samples": [], "converged": []})
            q["samples"].append(side["x"])
            q["converged"].append(bool(side["converged"]) if "converged" in side else True)
        queries = []
        for q in (by_query[k] for k in sorted(by_query)):
            pts = torch.from_numpy(np.stack(q["samples"])).float()
            with torch.no_grad():
                p_query = classifier(torch.from_numpy(q["point"][None]).float()).softmax(-1)[0, self.cls].item()
                p_samples = classifier(pts).softmax(-1)[:, self.cls].numpy()
            conv = np.array(q["converged"], dtype=bool)
            dp = np.abs(p_samples - p_query)[conv]
            queries.append({"point": q["point"], "samples": pts.numpy(), "p": p_query, "converged": conv,
                            "max_dp": float(dp.max()) if len(dp) else float("nan")})
        x, y = self.data.arrays("train")
        xt, yt = self.data.arrays("test")
        with torch.no_grad():
            acc = (classifier(xt).argmax(-1) == yt).float().mean().item()
        path = circles_figure(self.output_dir / self.filename, x.numpy(), y.numpy(), classifier, queries, acc)
        log.info("circles figure (Fig. 3.1): %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="predict/circles", images=[str(path)])
