"""Per-seed records on disk: atomic writes, round trip, merge checks."""

import numpy as np
import pytest
import torch

from equidiff.callbacks import SampleWriter
from equidiff.callbacks.records import (
    PNG_BYTES_KEY,
    check_sample,
    completed_seeds,
    quantize,
    read_records,
    read_sample,
    scan_samples,
    write_sample,
)
from equidiff.errors import DataLayoutError
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


# --------------------------------------------------------------------------- completeness (issue 13)
def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_scan_tells_whole_samples_from_damaged_and_half_written_ones(tmp_path):
    rec = _record(list(range(7)))
    for j in range(7):
        write_sample(tmp_path, rec, j)
    (tmp_path / "000001.png").unlink()  # half: the sidecar records a PNG
    _cut(tmp_path / "000002.png")  # cut short: no IEND
    _cut(tmp_path / "000003.npz")  # cut short: no zip directory
    (tmp_path / "000004.npz").write_bytes(b"not a zip")
    png5 = tmp_path / "000005.png"
    png5.write_bytes(png5.read_bytes()[:-12] + bytes(12))  # the size its sidecar records, but no IEND chunk
    complete, damaged = scan_samples(tmp_path, range(8))  # seed 7: never written, neither complete nor damaged
    assert complete == {0, 6}
    assert sorted(damaged) == [1, 2, 3, 4, 5]
    assert "000001.png is missing (its sidecar 000001.npz records one)" in damaged[1]
    assert "000002.png is not a whole PNG" in damaged[2]
    assert "000003.npz cannot be read" in damaged[3] and "000004.npz cannot be read" in damaged[4]
    assert "000005.png is not a whole PNG" in damaged[5]
    assert check_sample(tmp_path, 0) == (None, True)
    for s in (0, 6):  # every PNG lost: the sidecars still say there were images
        (tmp_path / f"00000{s}.png").unlink()
    assert scan_samples(tmp_path, [0, 6])[0] == set()


def test_a_sample_without_image_is_half_written_when_the_others_have_images(tmp_path):
    # sidecars of a record without images (and sidecars written before they recorded their PNG) hold no size
    rec = _record([0, 1, 2])
    for j in range(3):
        write_sample(tmp_path, rec, j)
    no_image = {k: v for k, v in rec.items() if k != "image"}
    write_sample(tmp_path / "plain", no_image, 0)
    assert scan_samples(tmp_path / "plain", [0]) == ({0}, {})  # a run without images: complete
    for s in (0, 1):  # rewrite 0 and 1 as old-format sidecars (no PNG size), then lose the PNG of 1
        side = dict(np.load(tmp_path / f"00000{s}.npz"))
        side.pop(PNG_BYTES_KEY)
        np.savez(tmp_path / f"00000{s}.npz", **side)
    (tmp_path / "000001.png").unlink()
    complete, damaged = scan_samples(tmp_path, [0, 1, 2])
    assert complete == {0, 2} and list(damaged) == [1] and "000001.png is missing" in damaged[1]


def test_reading_a_damaged_sample_names_the_file(tmp_path):
    rec = _record([3, 4])
    for j in range(2):
        write_sample(tmp_path, rec, j)
    _cut(tmp_path / "000003.png")
    with pytest.raises(DataLayoutError, match=r"000003\.png .* bytes, its sidecar records .* re-run the same command"):
        read_sample(tmp_path, 3)
    side = dict(np.load(tmp_path / "000003.npz"))  # an old-format sidecar, which records no PNG size
    side.pop(PNG_BYTES_KEY)
    np.savez(tmp_path / "000003.npz", **side)
    with pytest.raises(DataLayoutError, match=r"000003\.png .*image file is truncated"):  # PIL's bare message
        read_sample(tmp_path, 3)
    _cut(tmp_path / "000004.npz")
    with pytest.raises(DataLayoutError, match=r"000004\.npz"):
        read_sample(tmp_path, 4)


def test_merge_never_writes_a_samples_npz_without_images(tmp_path):
    w = SampleWriter(str(tmp_path))
    rec = _record([0, 1, 2])
    for j in range(3):
        write_sample(w.samples_dir, rec, j)
    w.merge_samples([0, 1, 2])
    good = (tmp_path / "samples.npz").read_bytes()
    assert PNG_BYTES_KEY not in read_sample(w.samples_dir, 0)  # an internal entry: not in records or samples.csv
    assert PNG_BYTES_KEY not in (tmp_path / "samples.csv").read_text()
    (w.samples_dir / "000001.png").unlink()
    with pytest.raises(DataLayoutError, match=r"000001\.png"):
        w.merge_samples([0, 1, 2])
    assert (tmp_path / "samples.npz").read_bytes() == good
    # an old-format sidecar (no PNG size) without its PNG, beside samples with images: refused too
    side = dict(np.load(w.samples_dir / "000001.npz"))
    side.pop(PNG_BYTES_KEY)
    np.savez(w.samples_dir / "000001.npz", **side)
    with pytest.raises(DataLayoutError, match=r"1 of 3 samples .* have no image \(missing: 000001\.png\)"):
        w.merge_samples([0, 1, 2])
    assert (tmp_path / "samples.npz").read_bytes() == good
    # records without images merge as labels and seeds
    plain = SampleWriter(str(tmp_path / "plain"))
    for j in range(3):
        write_sample(plain.samples_dir, {k: v for k, v in rec.items() if k != "image"}, j)
    plain.merge_samples([0, 1, 2])
    with np.load(tmp_path / "plain" / "samples.npz") as z:
        assert z.files == ["arr_0", "arr_1"] and z["arr_1"].tolist() == [0, 1, 2]


def test_derived_files_are_the_merged_outputs_and_every_callback_file_in_the_folder(tmp_path):
    from types import SimpleNamespace

    from equidiff.callbacks import ImageGrid, PredictMetrics, QueryGrid

    w = SampleWriter(str(tmp_path))
    callbacks = [w, PredictMetrics({}, str(tmp_path), filename="m.json"), ImageGrid(str(tmp_path), filename="g.png"),
                 QueryGrid(str(tmp_path / "elsewhere")), SimpleNamespace(output_dir=str(tmp_path), filename=None)]
    names = {p.name for p in w.derived_files(SimpleNamespace(callbacks=callbacks))}
    assert {"samples.npz", "samples.csv", "metrics.json", "grid.png", "m.json", "g.png"} <= names
    assert all(p.parent == tmp_path for p in w.derived_files(SimpleNamespace(callbacks=callbacks)))
