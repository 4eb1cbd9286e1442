"""GridMoments: a direct computation, any batching, and two DDP processes with uneven shards."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from equidiff.analysis import GridMoments, grid_moments


def _data(n=11, cells=4, values=2):
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, cells, (n,), generator=g)
    c[0] = 0  # make sure cell 0 has data
    return c, torch.randn(n, values, generator=g, dtype=torch.float64) * 3 + 5


def _direct(c, v, cells):
    out = {"count": [], "mean": [], "std": []}
    nan = torch.full((v.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(cells):
        rows = v[c == k]
        out["count"].append(len(rows))
        out["mean"].append(rows.mean(0) if len(rows) else nan)
        out["std"].append(rows.std(0) if len(rows) > 1 else nan)
    return out


def test_grid_moments_equals_a_direct_computation_under_any_batching():
    c, v = _data()
    want = _direct(c, v, 4)
    m = GridMoments(4, 2)
    for chunk in (slice(0, 1), slice(1, 5), slice(5, 11)):
        m.update(c[chunk], v[chunk])
    for got in (m.compute(), grid_moments(c, v, 4)):
        assert got["count"].tolist() == want["count"]
        for k in range(4):
            torch.testing.assert_close(got["mean"][k], want["mean"][k], equal_nan=True)
            torch.testing.assert_close(got["std"][k], want["std"][k], equal_nan=True)


def test_grid_moments_bad_input():
    m = GridMoments(3, 1)
    with pytest.raises(ValueError, match="cells must lie in 0..2"):
        m.update(torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected 1 value"):
        m.update(torch.tensor([0]), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="num_cells >= 1"):
        GridMoments(0)


def _ddp_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        c, v = _data()
        m = GridMoments(4, 2)
        m.update(c[rank::2], v[rank::2])  # 6 and 5 samples, as the unpadded eval sampler shards them
        out = m.compute()
        if rank == 0:
            results.update({k: t.tolist() for k, t in out.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (about 20 s); the CLI DDP tests cover the same end to end
def test_two_processes_with_uneven_shards_give_the_one_process_result():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2, join=True)
    c, v = _data()
    one = grid_moments(c, v, 4)
    assert results["count"] == one["count"].tolist()
    torch.testing.assert_close(torch.tensor(results["mean"], dtype=torch.float64), one["mean"], equal_nan=True)
    torch.testing.assert_close(torch.tensor(results["std"], dtype=torch.float64), one["std"], equal_nan=True)
