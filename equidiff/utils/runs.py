"""Run folders: the resolved config is saved, and a resumed predict must match it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write_bytes

# What may change between a run and its resumption without changing any sample.
RESUME_FREE_KEYS = ("trainer", "logger", "callbacks", "paths", "hydra", "ckpt_path", "task_name", "metrics", "verbs")
RESUME_FREE_DATA_KEYS = ("batch_size", "num_workers", "pin_memory", "num_samples")


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
    for k in RESUME_FREE_KEYS:
        c.pop(k, None)
    if isinstance(c.get("data"), dict):
        for k in RESUME_FREE_DATA_KEYS:
            c["data"].pop(k, None)
    # the weights behind the paths: retraining a cached model must not be resumed into old samples
    weights = {k: sig for k, v in _leaves(c) if isinstance(v, str) and (sig := _weights_signature(v))}
    if weights:
        c["_weights"] = weights
    return c


def save_run_config(cfg, output_dir: Path) -> None:
    """Write ``config.yaml`` (the full resolved config) and ``fingerprint.yaml`` (what defines the samples)."""
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_bytes(output_dir / "config.yaml", resolved.encode())
    fp = _fingerprint(cfg)
    if not (output_dir / "fingerprint.yaml").exists():
        atomic_write_bytes(output_dir / "fingerprint.yaml", OmegaConf.to_yaml(OmegaConf.create(fp)).encode())


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_resume_compatible(cfg, output_dir: Path) -> None:
    """Refuse to resume into a folder whose samples came from a different configuration."""
    path = output_dir / "fingerprint.yaml"
    if not path.exists():
        return
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    new = OmegaConf.to_container(OmegaConf.create(_fingerprint(cfg)), resolve=False)
    diffs = _diff(old, new)
    if diffs:
        shown = "\n  ".join(diffs[:10])
        why = (" (the weight files behind these paths changed since the samples were written)"
               if any(d.startswith("_weights") for d in diffs) else "")
        raise ConfigError(f"{output_dir} holds results of a different configuration{why}, so re-running would mix "
                          f"them:\n  {shown}\nChoose another paths.output_dir, or delete the folder to start over.")
