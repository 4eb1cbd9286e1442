"""The prediction record: what a ``predict_step`` returns and what writers and metrics read.

A record is a dict of per-sample batched values: ``seed`` (int64 [B], required), ``image``
(float [B, C, H, W] in [-1, 1], optional) and any other tensors with first dimension B
(``label``, ``index``, latents, per-sample metrics...). The image is stored as a PNG, the rest
in a per-sample ``.npz`` sidecar, so a record read back from disk equals the in-memory one
after ``quantize`` (images are rounded to uint8 once, in one place).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equidiff.utils.images import to_uint8, uint8_to_float
from equidiff.utils.io import atomic_write_bytes

SEED_WIDTH = 6


def check_record(record: dict) -> int:
    """Validate a record and return its batch size."""
    if not isinstance(record, dict) or "seed" not in record:
        raise ValueError("predict_step must return a dict with at least a 'seed' entry (one per sample)")
    b = len(record["seed"])
    for k, v in record.items():
        if isinstance(v, torch.Tensor | np.ndarray | list | tuple) and len(v) != b:
            raise ValueError(f"record entry {k!r} has {len(v)} rows, expected one per sample ({b})")
    return b


def quantize(record: dict) -> dict:
    """The record as it will be on disk: the image rounded to uint8 and mapped back to [-1, 1]."""
    out = dict(record)
    if "image" in record:
        u8 = to_uint8(record["image"])
        out["image_uint8"] = u8
        out["image"] = uint8_to_float(u8).to(record["image"].device)
    return out


def sample_paths(samples_dir: Path, seed: int) -> tuple[Path, Path]:
    stem = f"{int(seed):0{SEED_WIDTH}d}"
    return samples_dir / f"{stem}.png", samples_dir / f"{stem}.npz"


def completed_seeds(samples_dir: Path) -> set[int]:
    """Seeds whose sidecar exists (the sidecar is written last, so it marks a finished sample)."""
    if not samples_dir.is_dir():
        return set()
    return {int(p.stem) for p in samples_dir.glob("*.npz") if p.stem.isdigit()}


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def write_sample(samples_dir: Path, record: dict, j: int, *, image_key: str = "image") -> None:
    """Write sample ``j`` of ``record`` atomically: PNG first, then the sidecar (its completion mark)."""
    seed = int(record["seed"][j])
    png, npz = sample_paths(samples_dir, seed)
    if image_key in record:
        u8 = to_uint8(record[image_key][j : j + 1])[0].permute(1, 2, 0).cpu().numpy()
        if u8.shape[2] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels to be written as PNG, got {u8.shape[2]}")
        buf = io.BytesIO()
        Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8).save(buf, format="PNG")
        atomic_write_bytes(png, buf.getvalue())
    side = {k: _to_numpy(v)[j] for k, v in record.items()
            if k not in (image_key, "image_uint8") and isinstance(v, torch.Tensor | np.ndarray | list | tuple)}
    buf = io.BytesIO()
    np.savez(buf, **side)
    atomic_write_bytes(npz, buf.getvalue())


def read_sample(samples_dir: Path, seed: int) -> dict:
    """Read one written sample back: ``image_uint8`` (C, H, W) if a PNG exists, plus the sidecar."""
    png, npz = sample_paths(samples_dir, seed)
    with np.load(npz, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    if png.exists():
        arr = np.asarray(Image.open(png))
        out["image_uint8"] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def read_records(samples_dir: Path, seeds, batch_size: int = 256):
    """Yield batched records (torch tensors) of written samples, in the order of ``seeds``."""
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        rows = [read_sample(samples_dir, s) for s in seeds[start : start + batch_size]]
        rec = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        if "image_uint8" in rec:
            rec["image"] = uint8_to_float(rec["image_uint8"])
        yield rec
