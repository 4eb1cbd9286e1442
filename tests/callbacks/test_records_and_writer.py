"""Per-seed records on disk: atomic writes, round trip, merge checks."""

import numpy as np
import pytest
import torch

from equidiff.callbacks import SampleWriter
from equidiff.errors import DataLayoutError
from equidiff.callbacks.records import completed_seeds, quantize, read_records, read_sample, write_sample
from equidiff.utils import atomic_write, to_uint8


def _record(seeds, channels=3):
    g = torch.Generator().manual_seed(0)
    n = len(seeds)
    return {
        "seed": torch.tensor(seeds),
        "index": torch.arange(n),
        "label": torch.tensor([s % 10 for s in seeds]),
        "image": torch.rand(n, channels, 6, 5, generator=g) * 2.2 - 1.1,  # also out of range: clamped
        "latent": torch.randn(n, 2, 3, generator=g),
        "loss": torch.rand(n, generator=g),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_write_read_round_trip(tmp_path, channels):
    rec = _record([3, 17], channels)
    for j in range(2):
        write_sample(tmp_path, rec, j)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.npz", "000003.png", "000017.npz", "000017.png"]
    back = read_sample(tmp_path, 17)
    assert np.array_equal(back["image_uint8"], to_uint8(rec["image"][1:2])[0].numpy())
    assert int(back["seed"]) == 17 and int(back["label"]) == 7
    np.testing.assert_array_equal(back["latent"], rec["latent"][1].numpy())
    # what metrics see in memory equals what comes back from disk
    q = quantize(rec)
    (batch,) = list(read_records(tmp_path, [3, 17]))
    torch.testing.assert_close(batch["image"], q["image"], rtol=0, atol=0)
    assert completed_seeds(tmp_path) == {3, 17}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_merge_writes_adm_npz_sorted_by_seed(tmp_path):
    w = SampleWriter(str(tmp_path))
    rec = _record([9, 2, 5])
    for j in range(3):
        write_sample(w.samples_dir, rec, j)
    w.merge_samples([2, 5, 9])
    with np.load(tmp_path / "samples.npz") as z:
        images, labels, seeds = z["arr_0"], z["arr_1"], z["arr_2"]
    assert images.dtype == np.uint8 and images.shape == (3, 6, 5, 3)  # NHWC
    assert seeds.tolist() == [2, 5, 9] and labels.tolist() == [2, 5, 9]
    np.testing.assert_array_equal(images[2], to_uint8(rec["image"][0:1])[0].permute(1, 2, 0).numpy())
    header = (tmp_path / "samples.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["seed", "index", "label"] and "loss" in header and "latent" not in header


def test_merge_refuses_missing_samples(tmp_path):
    w = SampleWriter(str(tmp_path))
    rec = _record([1, 2])
    write_sample(w.samples_dir, rec, 0)
    with pytest.raises(DataLayoutError, match="1 of 2 samples are missing"):
        w.merge_samples([1, 2])
    assert not (tmp_path / "samples.npz").exists()


def test_merge_refuses_a_sidecar_under_the_wrong_seed(tmp_path):
    w = SampleWriter(str(tmp_path))
    write_sample(w.samples_dir, _record([4]), 0)
    (w.samples_dir / "000004.npz").rename(w.samples_dir / "000008.npz")
    (w.samples_dir / "000004.png").rename(w.samples_dir / "000008.png")
    with pytest.raises(DataLayoutError, match="disagree"):
        w.merge_samples([8])
