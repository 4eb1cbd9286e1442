"""Atomic file writes: a reader (or a resumed job) never sees half a file.

Files and folders get the mode a plain ``open()`` / ``mkdir()`` would give them (``0o666`` / ``0o777``
less the process's umask): ``tempfile.mkstemp`` / ``mkdtemp`` create theirs ``0o600`` / ``0o700``, and a
rename keeps that, which would hide the results from the group on a shared cluster.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # elsewhere os.umask is the only reader, and it sets the mask: set it back at once, under a lock
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory, so ``os.replace`` is atomic on POSIX (and replaces a
    symlink at ``path`` rather than writing through it). The file gets the umask's mode before the rename.
    If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # after the body: a writer may have replaced the file at tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def atomic_save(path: str | os.PathLike, save_fn: Callable[[Path], None]) -> None:
    """Call ``save_fn(tmp_path)`` and rename the result onto ``path``."""
    with atomic_write(path) as tmp:
        save_fn(tmp)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty folder next to ``path`` (same file system, so it can be renamed onto ``path``), with the
    umask's folder mode. For writers that build a whole folder and swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, dir_mode())
    return tmp


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing local checkpoints through :func:`atomic_write`.

    Lightning's own save goes through an fsspec transaction whose temporary file is in the system temp
    folder; when that is another file system than the checkpoint's (a node's /tmp and a shared scratch),
    the final step is a copy, and a job killed during it leaves a truncated ``last.ckpt`` that resume
    cannot read. Here the temporary file sits beside the checkpoint and is renamed onto it. Remote paths
    (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        import torch

        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))
