"""(query, seed) pairs for invariant sets, and the 2D point diffusion model's save / load round trip."""

import pytest
import torch
from diffusers import DDPMScheduler

from equidiff.data import DigitsDataModule
from equidiff.data.queries import QueryDataModule
from equidiff.diffusion.toy import PointBackbone, PointDenoiser, load_point_diffusion
from equidiff.errors import ConfigError


def test_queries_from_a_source_split_each_with_its_own_seeds():
    dm = QueryDataModule(source=DigitsDataModule(seed=0), split="test", query_indices=[3, 7], samples_per_query=3,
                         seed=10, batch_size=4)
    ds = dm.dataset("test")
    assert len(ds) == 6
    items = [ds[k] for k in range(6)]
    assert [it["query_index"] for it in items] == [0, 0, 0, 1, 1, 1]
    source = DigitsDataModule(seed=0).dataset("test")
    assert torch.equal(items[4]["query"], source[7]["image"]) and items[4]["source_index"] == 7


def test_points_and_given_targets():
    pts = QueryDataModule(points=[[0.1, 0.2]], samples_per_query=2, seed=0).dataset("test")
    assert torch.equal(pts[1]["query"], torch.tensor([0.1, 0.2]))
    tg = QueryDataModule(targets=[[1.0, 2.0], 3.0], samples_per_query=1, seed=0).dataset("test")
    assert torch.equal(tg[0]["target"], torch.tensor([1.0, 2.0])) and torch.equal(tg[1]["target"], torch.tensor([3.0]))


def test_bad_query_settings():
    with pytest.raises(ConfigError, match="exactly one"):
        QueryDataModule(points=[[0.0, 0.0]], targets=[[1.0]])
    with pytest.raises(ConfigError, match="exactly one"):
        QueryDataModule()
    with pytest.raises(ConfigError, match="samples_per_query"):
        QueryDataModule(points=[[0.0, 0.0]], samples_per_query=0)
    with pytest.raises(ConfigError, match="outside"):
        QueryDataModule(source=DigitsDataModule(seed=0), query_indices=[100_000])
    with pytest.raises(ConfigError, match="query_key"):
        QueryDataModule(source=DigitsDataModule(seed=0), query_indices=[0], query_key="x")
    with pytest.raises(ConfigError, match="predict split"):
        QueryDataModule(points=[[0.0, 0.0]], seed=0).dataset("train")


def test_point_model_round_trip_and_missing_folder(tmp_path):
    torch.manual_seed(0)
    denoiser = PointDenoiser(dim=2, hidden=16, depth=2, time_embed_dim=8)
    denoiser.save_pretrained(tmp_path / "m" / "denoiser")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(tmp_path / "m" / "scheduler")
    loaded = load_point_diffusion(str(tmp_path / "m"))
    x, t = torch.randn(5, 2), torch.tensor(17)
    torch.testing.assert_close(loaded(x, t), PointBackbone(denoiser, loaded.scheduler)(x, t))
    assert loaded.sample_shape == (2,)
    with pytest.raises(ConfigError, match="circles_ddpm"):
        load_point_diffusion(str(tmp_path / "empty"))
