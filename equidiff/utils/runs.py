"""Run folders: a run owns its folder, records its configuration, and never mixes results of two.

* ``RunFolder``: the launching process of a run locks its output folder (``equidiff.utils.lock``) before its
  first write and releases it on every exit path. A run that fails before writing any result leaves the folder
  as it found it (no config.yaml, fingerprint.yaml, equidiff.log or empty folders of its own); a failed resume
  keeps every file that was there.
* ``fingerprint.yaml``: what defines the results (every setting that changes an output). It is written together
  with the run's first result (``FingerprintCommit``, a callback), so a run that fails before any result does
  not claim the folder for its configuration. ``check_resume_compatible`` refuses to resume into a folder whose
  fingerprint differs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write_bytes
from equidiff.utils.lock import LOCK_NAME, FolderLock

log = logging.getLogger(__name__)

# What may change between a run and its resumption without changing any result: an allowlist, so that every
# key not named here (a new option included) is part of the fingerprint.
# Top-level groups:
#   logger, callbacks  where and how results are reported (writer, metrics, grids, checkpoints); no callback
#                      changes a sample
#   metrics            recomputed over the whole set (resumed samples are read back), so metrics.json always
#                      describes the current metrics config
#   paths, hydra, task_name, verbs   locations and names (paths that define results, e.g. a model folder, are
#                      fingerprinted where they are used, resolved, with their weight files' signature)
RESUME_FREE_KEYS = ("logger", "callbacks", "metrics", "paths", "hydra", "task_name", "verbs")
# trainer keys that do not change an output. Fingerprinted (not listed): precision (bf16/fp16 change every
# image), sync_batchnorm, accumulate_grad_batches, gradient_clip_* (change what fit learns), plugins (may set
# a precision), and anything else.
#   accelerator, devices, num_nodes, strategy: results must not depend on where or on how many processes they
#       are computed (outputs are per sample seed; tests/methods check 1 vs 2 processes). cpu vs gpu kernels and
#       deterministic/benchmark algorithms differ at rounding level only, as batch sizes do (also resume-free).
#   max_*, min_*, limit_*_batches, fast_dev_run, overfit_batches, val/check/log intervals: how much of the work
#       a run does, not what one result is (a partial predict writes correct samples; a later run finishes).
#   the rest: reporting and run mechanics.
RESUME_FREE_TRAINER_KEYS = (
    "_target_", "accelerator", "devices", "num_nodes", "strategy", "deterministic", "benchmark",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "fast_dev_run", "overfit_batches",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
    "reload_dataloaders_every_n_epochs", "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
    "default_root_dir", "inference_mode", "profiler", "detect_anomaly", "barebones", "use_distributed_sampler",
)
# data keys that do not change an output: loader mechanics, and num_samples (item i of the seed set is seed + i
# whatever N is: more samples extend the set). Everything else (seed, labels, split, root, ...) is fingerprinted.
RESUME_FREE_DATA_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
                         "num_samples")
# fingerprints before version 2 did not hold the trainer (precision) and ckpt_path
FINGERPRINT_VERSION = 2
_V2_KEYS = ("trainer", "ckpt_path")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _weights_signature(value: str) -> str | None:
    """Size and modification time of the weight files a config value points to (a file or a model folder)."""
    p = Path(value)
    try:
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            files = [p]
        elif p.is_dir() and ((p / "model_index.json").exists() or (p / "config.json").exists()):
            files = sorted(f for f in p.glob("**/*")
                           if f.suffix in WEIGHT_SUFFIXES and len(f.relative_to(p).parts) <= 2)
        else:
            return None
        return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    except OSError:
        return None


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def _fingerprint(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    c = {k: v for k, v in c.items() if k not in RESUME_FREE_KEYS}
    for group, free in (("trainer", RESUME_FREE_TRAINER_KEYS), ("data", RESUME_FREE_DATA_KEYS)):
        if isinstance(c.get(group), dict):
            c[group] = {k: v for k, v in c[group].items() if k not in free}
    # the weights behind the paths: retraining a cached model must not be resumed into old samples
    weights = {k: sig for k, v in _leaves(c) if isinstance(v, str) and (sig := _weights_signature(v))}
    if weights:
        c["_weights"] = weights
    c["_version"] = FINGERPRINT_VERSION
    return c


def _fingerprint_yaml(cfg) -> bytes:
    return OmegaConf.to_yaml(OmegaConf.create(_fingerprint(cfg))).encode()


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _has_samples(output_dir: Path) -> bool:
    samples = output_dir / "samples"
    return (output_dir / "samples.npz").exists() or (samples.is_dir() and any(samples.iterdir()))


def check_resume_compatible(cfg, output_dir: Path) -> None:
    """Refuse to resume into a folder whose samples came from a different configuration."""
    path = output_dir / "fingerprint.yaml"
    if not path.exists():
        if _has_samples(output_dir):
            raise ConfigError(f"{output_dir} holds samples but no fingerprint.yaml, so nothing tells which "
                              "configuration made them, and re-running could mix them with others. Choose another "
                              "paths.output_dir, or delete the folder to start over.")
        return
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    new = OmegaConf.to_container(OmegaConf.create(_fingerprint(cfg)), resolve=False)
    if old.get("_version") is None:  # written by an earlier equidiff: compare what it recorded
        for k in (*_V2_KEYS, "_version"):
            new.pop(k, None)
            old.pop(k, None)
        log.warning("%s was written by an earlier equidiff that did not record trainer settings (precision) and "
                    "ckpt_path: they are not compared", path)
    diffs = _diff(old, new)
    if diffs:
        shown = "\n  ".join(diffs[:10])
        why = (" (the weight files behind these paths changed since the samples were written)"
               if any(d.startswith("_weights") for d in diffs) else "")
        raise ConfigError(f"{output_dir} holds results of a different configuration{why}, so re-running would mix "
                          f"them:\n  {shown}\nChoose another paths.output_dir, or delete the folder to start over.")


def save_run_config(cfg, output_dir: Path) -> None:
    """Write ``config.yaml``: the full resolved config of the latest run in the folder."""
    atomic_write_bytes(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())


class FingerprintCommit(Callback):
    """Write ``fingerprint.yaml`` (if the folder has none) right before the run's first result.

    Put first among the trainer's callbacks: Lightning calls ``on_predict_batch_end`` in callback order, so it
    runs before the sample writer writes a batch; ``on_save_checkpoint`` runs before a checkpoint file is written.
    ``commit()`` is also called when a verb finishes. Every DDP rank does it (the content is the same).
    """

    def __init__(self, cfg):
        super().__init__()
        self.path = Path(cfg.paths.output_dir) / "fingerprint.yaml"
        self.data = _fingerprint_yaml(cfg)
        self.committed = False

    def commit(self) -> None:
        if not self.committed:
            if not self.path.exists():
                atomic_write_bytes(self.path, self.data)
            self.committed = True

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None:
            self.commit()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.commit()


class RunFolder:
    """The output folder as the launching process of a run owns it: ``open()`` ... ``close(failed)``.

    ``open()`` creates the folder (remembering which directories it made), takes the lock and notes what is
    there. ``close(failed=True)`` of a run that wrote no result (no new file besides its own bookkeeping and
    logger files) undoes the run: its config.yaml (or the previous one back), fingerprint.yaml, equidiff.log and
    the empty folders it made. Files that were there before are never removed.
    """

    BOOKKEEPING = ("config.yaml", "fingerprint.yaml", "equidiff.log")
    LOG_DIRS = ("csv", "wandb", "lightning_logs")  # logger output: not a result

    def __init__(self, output_dir: str | os.PathLike, *, made_for_this_run: bool = False):
        self.path = Path(output_dir)
        self.made_for_this_run = made_for_this_run  # e.g. a Hydra sweep's job folder, created just before
        self.created: list[Path] = []
        self.lock = FolderLock(self.path)
        self.before: set[str] = set()
        self.old_config: bytes | None = None

    def open(self) -> RunFolder:
        missing, p = [], self.path.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
                self.created.append(d)
        if self.made_for_this_run and not any(self.path.iterdir()):
            self.created.append(self.path.absolute())
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_created_dirs()
            raise
        self.before = self._entries()
        with contextlib.suppress(FileNotFoundError):
            self.old_config = (self.path / "config.yaml").read_bytes()
        return self

    def _entries(self) -> set[str]:
        """Relative paths of every file and folder under the run folder (folders with a trailing '/')."""
        out = set()
        for root, dirs, files in os.walk(self.path):
            rel = Path(root).relative_to(self.path)
            out.update(f"{rel / d}/" for d in dirs)
            out.update(str(rel / f) for f in files)
        return out

    def _is_bookkeeping(self, rel: str) -> bool:
        name = Path(rel).name
        return (rel in self.BOOKKEEPING or name.startswith(LOCK_NAME) or name.startswith(".equidiff.clock.")
                or Path(rel).parts[0] in self.LOG_DIRS)

    def wrote_result(self) -> bool:
        return any(not e.endswith("/") and not self._is_bookkeeping(e) for e in self._entries() - self.before)

    def close(self, failed: bool) -> None:
        """Release the folder; after a failure without any result, leave it as ``open()`` found it."""
        revert = False
        try:
            revert = failed and not self.wrote_result()
            if revert:
                self._revert()
        except OSError as e:  # never hide the error that made the run fail
            log.warning("could not restore %s as it was before this run: %s", self.path, e)
        finally:
            self.lock.release()
            if revert:
                self._remove_created_dirs()

    def _revert(self) -> None:
        new = self._entries() - self.before
        for name in self.BOOKKEEPING:
            if name == "config.yaml" and self.old_config is not None:
                with contextlib.suppress(FileNotFoundError):
                    if (self.path / name).read_bytes() == self.old_config:
                        continue
                atomic_write_bytes(self.path / name, self.old_config)
            elif name in new:
                (self.path / name).unlink()
        for d in sorted((e for e in new if e.endswith("/")), key=len, reverse=True):
            with contextlib.suppress(OSError):
                (self.path / d).rmdir()  # only empty ones

    def _remove_created_dirs(self) -> None:
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds on an empty folder: never removes anything written
