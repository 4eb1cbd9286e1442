"""Atomic writers give files and folders the umask's modes (as a plain open() / mkdir() would)."""

import os
import stat

import pytest
import torch

from equidiff.utils.io import AtomicCheckpointIO, atomic_save, atomic_write, atomic_write_bytes, temp_dir_beside, umask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o077])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert umask() == mask


def test_files_and_folders_get_the_mode_open_and_mkdir_give(tmp_path, mask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a plain open() gives: the reference
    (tmp_path / "plain_dir").mkdir()
    assert _mode(plain) == 0o666 & ~mask

    atomic_write_bytes(tmp_path / "new" / "a.bin", b"a")  # the folder it creates, too
    atomic_save(tmp_path / "b.pt", lambda p: torch.save({"x": 1}, p))
    with atomic_write(tmp_path / "c.csv") as tmp, open(tmp, "w") as f:
        f.write("c")
    for name in ("new/a.bin", "b.pt", "c.csv"):
        assert _mode(tmp_path / name) == _mode(plain), name
    assert _mode(tmp_path / "new") == _mode(tmp_path / "plain_dir") == 0o777 & ~mask

    folder = temp_dir_beside(tmp_path / "model")
    assert folder.parent == tmp_path and _mode(folder) == _mode(tmp_path / "plain_dir")


def test_umask_0022_and_0002_by_number(tmp_path):
    for m, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775)):
        old = os.umask(m)
        try:
            atomic_write_bytes(tmp_path / f"{m:o}" / "f", b"x")
            assert (_mode(tmp_path / f"{m:o}" / "f"), _mode(tmp_path / f"{m:o}")) == (file_mode, dir_mode)
        finally:
            os.umask(old)


def test_checkpoint_io_is_atomic_and_replaces_a_symlink(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "epoch=1.ckpt"
    io.save_checkpoint({"step": 1}, target)
    (tmp_path / "last.ckpt").symlink_to(target.name)
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["step"] == 2
    assert io.load_checkpoint(target)["step"] == 1  # not written through the link
    assert _mode(tmp_path / "last.ckpt") == 0o666 & ~umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1.ckpt", "last.ckpt"]  # no temporary left

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"step": 3, "x": Unpicklable()}, tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1.ckpt", "last.ckpt"]


def test_save_pretrained_folder_has_the_umask_mode(tmp_path, mask):
    from equidiff.callbacks import SavePretrained

    class Module:
        def save_pretrained(self, path):
            os.makedirs(os.path.join(path, "unet"))
            with open(os.path.join(path, "unet", "config.json"), "w") as f:
                f.write("{}")

    out = SavePretrained(str(tmp_path / "model")).save(Module())
    assert _mode(out) == _mode(out / "unet") == 0o777 & ~mask
    assert _mode(out / "unet" / "config.json") == 0o666 & ~mask
