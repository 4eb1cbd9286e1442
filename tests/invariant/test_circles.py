"""The concentric-circles demonstration of seed 000 (Fig. 3.1) through the real configs: the 3-layer MLP on
make_circles (1,500 points), a small 2D diffusion model, and invariant sets of three query points."""

import json

import numpy as np
import pytest
import torch

from equidiff.callbacks.records import read_sample
from equidiff.classifiers import load_small_net
from equidiff.cli import run
from equidiff.data import CirclesDataModule
from tests.helpers import compose_cfg

COMMON = ["trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def circles(tmp_path_factory):
    root = tmp_path_factory.mktemp("circles")
    cache = root / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_cfg(["experiment=invariant/circles_mlp", f"paths.output_dir={root}/mlp", f"paths.cache_dir={cache}",
                         *COMMON]), "fit")
        # 1,500 of the experiment's 4,000 steps (about 20 s); samples 16 per query instead of 64
        run(compose_cfg(["experiment=invariant/circles_ddpm", f"paths.output_dir={root}/ddpm",
                         f"paths.cache_dir={cache}", "trainer.max_steps=1500", *COMMON]), "fit")
        run(compose_cfg(["experiment=invariant/circles", f"paths.output_dir={root}/sets", f"paths.cache_dir={cache}",
                         "data.samples_per_query=16", "data.batch_size=48", *COMMON]), "predict")
    finally:
        torch.set_num_threads(before)
    return root, cache


def test_mlp_test_accuracy(circles):
    _, cache = circles
    mlp = load_small_net("mlp", cache / "circles_mlp" / "model.safetensors", in_features=2, num_classes=2,
                         hidden=64, depth=3)
    x, y = CirclesDataModule(n_samples=1500, noise=0.1, factor=0.5, data_seed=0).arrays("test")
    with torch.no_grad():
        acc = (mlp(x).argmax(-1) == y).float().mean().item()
    print(f"circles MLP test accuracy {acc:.3f} (seed: 0.983)")
    assert acc >= 0.97


def test_invariant_points_keep_the_query_probability(circles):
    root, cache = circles
    out = root / "sets"
    mlp = load_small_net("mlp", cache / "circles_mlp" / "model.safetensors", in_features=2, num_classes=2,
                         hidden=64, depth=3)
    with np.load(out / "samples.npz") as z:
        seeds = z[z.files[-1]]  # points have no images: (labels, seeds)
    rows = [read_sample(out / "samples", int(s)) for s in seeds]
    assert len(rows) == 48 and sorted({int(r["query_index"]) for r in rows}) == [0, 1, 2]
    points = torch.tensor(np.stack([r["x"] for r in rows])).float()
    queries = torch.tensor(np.stack([r["query"] for r in rows])).float()
    converged = np.array([bool(r["converged"]) for r in rows])
    with torch.no_grad():
        dp = (mlp(points).softmax(-1)[:, 1] - mlp(queries).softmax(-1)[:, 1]).abs().numpy()
    print(f"circles: {converged.mean():.3f} converged, max |dp| {dp[converged].max():.4f} over them, "
          f"{(dp < 0.01).mean():.3f} of all within 0.01")
    assert converged.mean() >= 0.95
    assert (dp[converged] < 0.01).all()  # tau on the log-odds (1e-4) bounds |dp| by 0.0025
    assert (dp < 0.01).mean() >= 0.95
    # diverse, not collapsed onto the query: the points spread along the level curve
    assert json.loads((out / "metrics.json").read_text())["diversity"] > 0.3
    assert (out / "circles.png").stat().st_size > 10_000
