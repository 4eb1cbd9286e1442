"""Convert a checkpoint once into a plain tensor-only file that loads without unpickling code.

    python -m equidiff.classifiers.convert IN OUT [--trust-pickle] [--format auto|robustness|state_dict]
    python -m equidiff.classifiers.convert --in-place FILE [FILE ...] [--trust-pickle] [--format ...]

OUT is written atomically as safetensors (``.safetensors``) or as a ``torch.save`` file of a flat
``{name: tensor}`` dict (any other suffix). ``--in-place`` writes each FILE over itself (OUT = IN, also
allowed as ``IN IN``), so a config that names the file (``conf/classifier/cifar10_l2_eps*.yaml`` name the
zoo's ``.pt`` files) loads the converted file unchanged; IN is read completely before OUT replaces it, and
an interrupted conversion leaves IN as it was. Without ``--trust-pickle``, IN is read with
``safe_torch_load``; with it, IN is unpickled with ``weights_only=False`` and ``pickle_module=dill``,
which runs whatever code the file holds: use it only for files from a source you trust (e.g. the
MadryLab robustness model zoo).

Formats: ``robustness`` keeps the key names of the checkpoint's ``model`` state dict
(``module.normalizer.*``, ``module.model.*``), so ``load_robustness`` reads OUT as it read IN, and drops
``module.attacker.*`` (copies of the same tensors); ``state_dict`` keeps every tensor of the
checkpoint's state dict as it is; ``auto`` picks ``robustness`` when the keys look like it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from equidiff.classifiers.loaders import checkpoint_state_dict
from equidiff.classifiers.safe_load import safe_torch_load
from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write


def _load_trusted(path: Path):
    import dill

    print(f"WARNING: --trust-pickle: unpickling {path} with weights_only=False runs any code it contains; "
          "do this only for files from a source you trust.", file=sys.stderr)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=dill)
    except Exception as e:
        raise ConfigError(
            f"could not unpickle {path} even with --trust-pickle: {type(e).__name__}: {e}. Files saved with "
            "old dill/Python versions (MadryLab robustness#71: 'an integer is required (got type bytes)') "
            "may need this conversion run once with the Python/dill versions they were saved with.") from e


def _is_robustness(keys) -> bool:
    return any(k.removeprefix("module.").startswith(("normalizer.", "attacker.")) for k in keys)


def extract(obj, fmt: str = "auto", *, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """A flat, contiguous, unshared ``{name: tensor}`` dict from a loaded checkpoint, and metadata strings."""
    state = checkpoint_state_dict(obj, source)
    if fmt == "auto":
        fmt = "robustness" if _is_robustness(state) else "state_dict"
    if fmt == "robustness":
        if not _is_robustness(state):
            raise ConfigError(f"{source} has no module.normalizer.* / module.attacker.* keys; it is not a "
                              "robustness checkpoint (use --format state_dict)")
        state = {k: v for k, v in state.items() if not k.removeprefix("module.").startswith("attacker.")}
    dropped = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        print(f"note: dropped {len(dropped)} non-tensor entries: {dropped[:5]}", file=sys.stderr)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    meta = {"format": fmt, "source": Path(source).name}
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
        meta["epoch"] = str(obj["epoch"])
    return tensors, meta


def save(tensors: dict[str, torch.Tensor], out: str | Path, metadata: dict | None = None) -> None:
    """Write ``tensors`` atomically: safetensors for ``.safetensors``, else ``torch.save``."""
    out = Path(out)
    with atomic_write(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)


def convert(src: str | Path, out: str | Path, fmt: str = "auto", *, trust_pickle: bool = False) -> dict:
    """Convert ``src`` into ``out`` (which may be ``src`` itself); returns the metadata written."""
    src = Path(src)
    obj = _load_trusted(src) if trust_pickle else safe_torch_load(src)
    tensors, meta = extract(obj, fmt, source=str(src))
    del obj  # everything needed is in the cloned tensors; nothing refers to src any more
    save(tensors, out, meta)
    return {**meta, "tensors": len(tensors)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m equidiff.classifiers.convert",
                                description=__doc__.split("\n")[0])
    p.add_argument("paths", metavar="IN OUT | FILE", type=Path, nargs="+",
                   help="IN OUT, or with --in-place one or more files converted over themselves")
    p.add_argument("--in-place", action="store_true", help="write each FILE over itself")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle IN with weights_only=False and dill (runs code in it; trusted files only)")
    p.add_argument("--format", choices=("auto", "robustness", "state_dict"), default="auto")
    args = p.parse_args(argv)
    if args.in_place:
        jobs = [(path, path) for path in args.paths]
    elif len(args.paths) == 2:
        jobs = [tuple(args.paths)]
    else:
        p.error(f"give IN OUT, or --in-place FILE [FILE ...] (got {len(args.paths)} path(s) without --in-place)")
    for src, out in jobs:
        try:
            meta = convert(src, out, args.format, trust_pickle=args.trust_pickle)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out} ({meta['tensors']} tensors, format {meta['format']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
